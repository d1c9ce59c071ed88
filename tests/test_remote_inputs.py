"""Images from standard input ("-") and http(s) URLs, through the CLI, on tiny offline models.

URLs are served by a real `http.server` on 127.0.0.1 in a thread (no mock, no network): a good JPEG, a redirect, a
404, a bomb PNG, a body over the size limit, a slow server, a redirect loop, and a closed port.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.data import fetch
from tests.test_retrieval_cli import fake_model, indexed  # noqa: F401  (fixtures: an index and a fake encoder)

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _jpeg(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, "JPEG")
    return buffer.getvalue()


def _bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A valid PNG header claiming 1.6 G pixels, with a few bytes of data: PIL would try to allocate 4.8 GB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GOOD = _jpeg()
BIG_LIMIT = 100_000  # the test's size limit (fetch.MAX_URL_BYTES is 50 MB)


class _Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}  # more paths a test serves

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def _send(self, body: bytes, status: int = 200, length: bool = True, **headers: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path
        if path in self.files:
            self._send(self.files[path])
        elif path == "/good.jpg":
            self._send(GOOD, Content_Type="image/jpeg")
        elif path == "/redirect":
            self._send(b"", 302, Location="/good.jpg")
        elif path == "/loop":
            self._send(b"", 302, Location="/loop")
        elif path == "/to-file":
            self._send(b"", 302, Location="file:///etc/passwd")
        elif path == "/bomb.png":
            self._send(_bomb_png(), Content_Type="image/png")
        elif path == "/big-declared":  # says how big it is: refused before the body is read
            self._send(b"\0" * (BIG_LIMIT + 1))
        elif path == "/big-streamed":  # no Content-Length, a body that never ends: cut off at the limit
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif path == "/slow":  # no answer at all for longer than the read timeout
            time.sleep(3)
            self._send(GOOD)
        elif path == "/trickle":  # headers at once, then a byte now and then: only the total deadline stops it
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif path == "/text":
            self._send(b"<html>not an image</html>", Content_Type="text/html")
        else:
            self._send(b"not found", 404)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits a test can reach in a second; a proxy in the environment must not take our 127.0.0.1 requests."""
    monkeypatch.setattr(fetch, "MAX_URL_BYTES", BIG_LIMIT)
    monkeypatch.setattr(fetch, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(fetch, "DEADLINE", 1.5)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed: connection refused


def invoke(*args: str, model: Path, input: bytes | None = None):
    return runner.invoke(app, [*args, "--model", str(model), "--device", "cpu"], input=input)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# URLs


def test_caption_urls_each_failure_is_one_failed_input(tiny_opt_dir: Path, server: str, small_limits: None) -> None:
    refused = f"http://127.0.0.1:{_closed_port()}/x.jpg"
    urls = [f"{server}/good.jpg", f"{server}/redirect", f"{server}/missing.jpg", f"{server}/bomb.png",
            f"{server}/big-declared", f"{server}/big-streamed", f"{server}/loop", f"{server}/to-file", refused,
            f"{server}/text"]  # fmt: skip
    result = invoke("caption", *urls, "--json", model=tiny_opt_dir)
    assert result.exit_code == 1, result.output
    records = {r["image"]: r for r in json_lines(result.stdout)}
    assert list(records) == urls  # records keep the URL as "image", in input order
    assert isinstance(records[urls[0]]["caption"], str)
    assert records[urls[1]]["caption"] == records[urls[0]]["caption"]  # the redirect reaches the same image
    errors = {url: records[url].get("error", "") for url in urls[2:]}
    assert errors[urls[2]].startswith("cannot fetch URL: HTTP 404")
    assert errors[urls[3]].startswith("image too large: 1,600,000,000 pixels")
    assert "too large" in errors[urls[4]] and "limit 0 MB" not in errors[urls[4]]
    assert errors[urls[5]].startswith(f"cannot fetch URL: {urls[5]} is too large")
    assert errors[urls[6]].startswith("cannot fetch URL: too many redirects")
    assert errors[urls[7]].startswith("cannot fetch URL: redirected to a non-http(s) address file:///etc/passwd")
    assert errors[urls[8]].startswith("cannot fetch URL: ") and "refused" in errors[urls[8]].lower()
    assert errors[urls[9]] == f"not an image: {urls[9]}"
    assert all("\n" not in e and url in e for url, e in errors.items())
    assert "8 of 10 images failed" in result.stderr


def test_slow_servers_are_cut_off(tiny_opt_dir: Path, server: str, small_limits: None) -> None:
    start = time.monotonic()
    result = invoke("caption", f"{server}/slow", f"{server}/trickle", "--json", model=tiny_opt_dir)
    elapsed = time.monotonic() - start
    assert result.exit_code == 1, result.output
    slow, trickle = json_lines(result.stdout)
    assert slow["error"] == f"cannot fetch URL: no answer within 1 s: {server}/slow"
    assert trickle["error"] == f"cannot fetch URL: download took longer than 1.5 s: {server}/trickle"
    assert elapsed < 30  # model load included; the trickle alone would take 10 s


def test_ask_url_and_batch_urls(tiny_opt_dir: Path, server: str, small_limits: None, tmp_path: Path) -> None:
    result = invoke("ask", f"{server}/good.jpg", "what is it?", "--json", model=tiny_opt_dir)
    assert result.exit_code == 0, result.output
    [record] = json_lines(result.stdout)
    assert record["image"] == f"{server}/good.jpg" and isinstance(record["answer"], str)

    batch = tmp_path / "questions.jsonl"
    lines = [{"image": f"{server}/good.jpg", "question": "what?"}, {"image": f"{server}/gone.jpg", "question": "what?"}]
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "answers.jsonl"
    result = invoke("ask", "--batch", str(batch), "--out", str(out), "--json", model=tiny_opt_dir)
    assert result.exit_code == 1, result.output
    good, gone = json_lines(result.stdout)
    assert good["image"] == f"{server}/good.jpg" and "answer" in good  # a URL is not joined to the file's folder
    assert gone["error"].startswith("cannot fetch URL: HTTP 404")
    # --out resume: the URL is the key, so only the failed one is asked again
    result = invoke("ask", "--batch", str(batch), "--out", str(out), "--json", model=tiny_opt_dir)
    assert "1 questions already answered" in result.stderr
    assert [r["image"] for r in json_lines(result.stdout)] == [f"{server}/gone.jpg"]


def test_caption_out_resume_keys_urls(tiny_opt_dir: Path, server: str, small_limits: None, tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    url = f"{server}/good.jpg"
    assert invoke("caption", url, "--out", str(out), model=tiny_opt_dir).exit_code == 0
    result = invoke("caption", url, "--out", str(out), model=tiny_opt_dir)
    assert result.exit_code == 0 and "1 of 1 images already captioned" in result.stderr
    assert json.loads(out.read_text().splitlines()[-1])["image"] == url


def test_malformed_urls_are_one_failed_input(tiny_opt_dir: Path, small_limits: None) -> None:
    urls = ["http://[::1/x.jpg", "http:///x.jpg"]  # urllib refuses the first when parsing, the second when opening
    result = invoke("caption", *urls, "--json", model=tiny_opt_dir)
    assert result.exit_code == 1, result.output
    records = json_lines(result.stdout)
    assert [r["image"] for r in records] == urls
    assert all(r["error"].startswith("cannot fetch URL: ") and r["error"].endswith(r["image"]) for r in records)


def test_other_schemes_are_usage_errors(tiny_opt_dir: Path) -> None:
    for args in (["caption", "ftp://example.com/x.jpg"], ["ask", "file:///tmp/x.jpg", "what?"]):
        result = invoke(*args, model=tiny_opt_dir)
        assert result.exit_code == 2, result.output
        assert "unsupported URL scheme" in result.stderr and "only http:// and https://" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Standard input


def test_caption_and_ask_read_stdin(tiny_opt_dir: Path, tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo)
    result = invoke("caption", "-", str(photo), "--json", model=tiny_opt_dir, input=GOOD)
    assert result.exit_code == 0, result.output
    piped, named = json_lines(result.stdout)
    assert piped["image"] == "-" and isinstance(piped["caption"], str) and named["image"] == str(photo)

    result = invoke("ask", "-", "what is it?", "--json", model=tiny_opt_dir, input=GOOD)
    assert result.exit_code == 0, result.output
    assert json_lines(result.stdout)[0]["image"] == "-"


def test_stdin_failures_are_one_line(tiny_opt_dir: Path) -> None:
    result = invoke("caption", "-", model=tiny_opt_dir, input=b"")
    assert result.exit_code == 1 and "standard input is empty" in result.stderr
    result = invoke("caption", "-", "--json", model=tiny_opt_dir, input=_bomb_png())
    assert result.exit_code == 1
    assert json_lines(result.stdout)[0]["error"].startswith("image too large: 1,600,000,000 pixels")
    result = invoke("ask", "-", "--chat", model=tiny_opt_dir, input=GOOD)
    assert result.exit_code == 2 and "--chat reads its questions from standard input" in result.stderr


def test_stdin_terminal_is_refused(tiny_opt_dir: Path) -> None:
    """A real terminal on stdin: `blip2 caption -` says to pipe an image in instead of waiting for one."""
    pty = pytest.importorskip("pty")
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "blip2cli", "caption", "-", "--model", str(tiny_opt_dir)],
                              stdin=secondary, capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    finally:
        os.close(primary)
        os.close(secondary)
    assert proc.returncode == 2, proc.stderr
    assert "standard input is a terminal" in proc.stderr


def test_cat_into_caption_subprocess(tiny_opt_dir: Path, tmp_path: Path) -> None:
    """`cat x.jpg | python -m blip2cli caption - --model TINY` in a real shell pipe."""
    photo = tmp_path / "x.jpg"
    photo.write_bytes(GOOD)
    command = f"cat '{photo}' | '{sys.executable}' -m blip2cli caption - --model '{tiny_opt_dir}' --device cpu"
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()  # not a terminal: "-<TAB>caption"
    image, caption = line.split("\t")
    assert image == "-" and caption.strip()


def test_index_says_it_reads_local_files_only(tmp_path: Path, server: str) -> None:
    result = runner.invoke(app, ["index", f"{server}/good.jpg", "--index", str(tmp_path / "idx")])
    assert result.exit_code == 2 and "this command reads local files only" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# search --image


def test_search_image_from_url_and_stdin(indexed, server: str, small_limits: None) -> None:  # noqa: F811
    photos, idx, _ = indexed
    target = photos / "img0005.png"
    _Handler.files["/query.png"] = target.read_bytes()
    for image, stdin in ((f"{server}/query.png", None), ("-", target.read_bytes())):
        result = runner.invoke(app, ["search", "--image", image, "--index", str(idx), "--json"], input=stdin)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout.splitlines()[0])["path"] == str(target)  # the query finds itself first
    result = runner.invoke(app, ["search", "--image", f"{server}/missing.png", "--index", str(idx)])
    assert result.exit_code == 2 and "--image: cannot fetch URL: HTTP 404" in result.stderr
