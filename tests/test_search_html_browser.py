"""`blip2 search --html` as a browser shows it (issue 12): headless Chromium renders the page of a tiny index, a
script in a copy of the page reports what the browser laid out and decoded, and a screenshot shows the thumbnails.

Skipped without a Chromium binary (`apt-get install chromium`, or Google Chrome)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.retrieval import indexer
from tests.test_retrieval_cli import FakeModel

BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome"))), None)
pytestmark = [pytest.mark.slow,  # two browser starts: 5-15 s on a busy 2-core machine
              pytest.mark.skipif(BROWSER is None, reason="no Chromium binary (apt-get install chromium)")]
WIDTH, HEIGHT = 1000, 1400
COLOURS = {"red": (220, 20, 20), "green": (20, 160, 20), "blue": (20, 20, 220), "orange": (250, 150, 0),
           "purple": (130, 0, 130), "teal": (0, 130, 130)}
NAMES = {  # long names without spaces, names with spaces and characters that URLs and HTML escape, plain names
    "red": "a_really_long_file_name_without_any_spaces_red_from_the_camera_roll_0000.jpeg",
    "green": "IMG_0001.jpg",
    "blue": "beach & sea #2 100%.png",
    "orange": "holiday-in-the-mountains-with-the-whole-family-and-the-dog-0003.jpg",
    "purple": "IMG_0004.jpg",
    "teal": "DSC 0005 (copy).jpg",
}

# Appended to a copy of the page: what the browser decoded and laid out, as JSON in <pre id="report">.
PROBE = """<script>
window.addEventListener("load", () => {
  const rect = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const chars = (e) => {  // each visible character of e with the top of its line box
    const out = [], walker = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
    for (let node; (node = walker.nextNode()); ) {
      for (let i = 0; i < node.length; i++) {
        const range = document.createRange(); range.setStart(node, i); range.setEnd(node, i + 1);
        const r = range.getClientRects();
        out.push([node.data[i], r.length ? r[0].top : null]);
      }
    }
    return out;
  };
  const cards = [...document.querySelectorAll(".hit")].map((card) => {
    const img = card.querySelector("img"), name = card.querySelector(".name"), folder = card.querySelector(".path");
    return {
      img: img && {alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
                   rect: rect(img)},
      href: card.querySelector("a") && card.querySelector("a").href,
      title: name.title, name: name.textContent, nameChars: chars(name),
      nameClipped: name.scrollWidth > name.clientWidth, card: rect(card),
      folderParts: [...folder.querySelectorAll("span")].map(
        (s) => ({text: s.textContent, lines: s.getClientRects().length, rect: rect(s)})),
      folderBox: rect(folder),
    };
  });
  const report = {title: document.title, heading: document.querySelector("h1").textContent,
                  sub: document.querySelector(".sub").textContent, cards};
  const pre = document.createElement("pre"); pre.id = "report"; pre.textContent = JSON.stringify(report);
  document.body.appendChild(pre);
});
</script>"""


def _browser(*args: str, profile: Path) -> str:
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--force-device-scale-factor=1", f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def page(tmp_path, monkeypatch):
    """A tiny index of six pictures (a colour each, a white disc) in a folder with spaces and accents, searched
    with --html through the CLI (a fake embedding model: the page, not the ranking, is under test)."""
    monkeypatch.setattr(indexer, "load_encoder", lambda name, *a, **k: FakeModel(name))
    photos = tmp_path / "my photos" / "holiday 2024 — Île de Ré"
    photos.mkdir(parents=True)
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        im = Image.new("RGB", (320 + 60 * i, 240), rgb)
        ImageDraw.Draw(im).ellipse((30, 30, 150, 150), fill="white")
        im.save(photos / NAMES[colour], quality=95) if NAMES[colour].endswith((".jpg", ".jpeg")) else im.save(
            photos / NAMES[colour])
    runner = CliRunner()
    built = runner.invoke(app, ["index", str(tmp_path / "my photos"), "--index", str(tmp_path / "idx"),
                                "--model", "fake/blip2-itm"])
    assert built.exit_code == 0, built.output
    html = tmp_path / "hits.html"
    found = runner.invoke(app, ["search", "a red square", "--index", str(tmp_path / "idx"), "-k", "6", "--json",
                                "--html", str(html)])
    assert found.exit_code == 0, found.output
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(hits) == 6
    return html, hits, tmp_path


def test_the_page_in_a_browser(page):
    html, hits, tmp_path = page
    probe = tmp_path / "probe.html"
    probe.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    dom = _browser("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile")
    found = re.search(r'<pre id="report">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    report = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))

    assert "a red square" in report["title"] and "a red square" in report["heading"]  # the page names the query,
    assert "model fake/blip2-itm" in report["sub"] and f"index {tmp_path / 'idx'}" in report["sub"]  # model, index
    cards = report["cards"]
    assert len(cards) == len(hits)
    for card, hit in zip(cards, hits):
        name = Path(hit["path"]).name
        img = card["img"]
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, card  # the thumbnail decoded
        assert max(img["width"], img["height"]) == 256  # the inlined thumbnail, not the full picture
        assert img["alt"] == name
        link = urlparse(card["href"])  # a file:// URI of the original, percent-encoded (& # % and spaces)
        assert link.scheme == "file" and unquote(link.path) == hit["path"] and Path(unquote(link.path)).is_file()
        assert card["title"] == hit["path"]
        assert card["name"] == name and not card["nameClipped"]  # the whole name is shown, nothing cut off
        _breaks_only_between_words(card["nameChars"], name)
        assert [p["text"] for p in card["folderParts"]] == hit["path"].split("/")[:-1]
        for part in card["folderParts"]:  # each folder name whole on one line, inside the card
            assert part["lines"] == 1 or part["text"] == "", part
            assert part["rect"][2] <= card["folderBox"][2] + 0.5, part
    long = next(c for c in cards if c["name"] == NAMES["red"])
    assert len({top for _, top in long["nameChars"] if top is not None}) > 1  # the long name did wrap, at "_"s

    shot = tmp_path / "shot.png"
    _browser(f"--screenshot={shot}", html.as_uri(), profile=tmp_path / "profile")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    for card, hit in zip(cards, hits):
        left, top, right, bottom = (round(v) for v in card["img"]["rect"])
        assert bottom <= HEIGHT, "a card is below the screenshot: make the window taller"
        box = pixels[top + 2 : bottom - 2, left + 2 : right - 2].reshape(-1, 3)
        colour = next(c for c, n in NAMES.items() if n == Path(hit["path"]).name)
        near = lambda rgb: (np.abs(box - rgb).sum(axis=1) < 60).mean()  # noqa: E731  share of pixels near rgb
        assert near(COLOURS[colour]) > 0.25, (hit["path"], near(COLOURS[colour]))  # the picture's own colour
        assert near((255, 255, 255)) > 0.03  # and its white disc: a rendered picture, not a blank box
        others = [near(rgb) for c, rgb in COLOURS.items() if c != colour]
        assert max(others) < 0.02, hit["path"]  # each card shows its own file


def _breaks_only_between_words(chars: list[list], name: str) -> None:
    """Where the browser wrapped the name, the line ends after "_" or "-" or at a space, never inside a word."""
    prev_char, prev_top, space = None, None, False
    for char, top in chars:
        if char.isspace() or top is None:
            space = True
            continue
        if prev_top is not None and top > prev_top + 1:  # a new line starts at this character
            assert space or prev_char in "_-", f"{name!r} broken between {prev_char!r} and {char!r}"
        prev_char, prev_top, space = char, top, False
