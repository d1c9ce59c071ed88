"""Image bytes from where files are not: an http(s) URL or standard input ("-").

  is_url(text)           an http:// or https:// address (the only schemes fetched)
  fetch_url(url)         the body, bounded in size (streamed, cut off past MAX_URL_BYTES) and in time (connect and
                         read timeouts, a total deadline); at most MAX_REDIRECTS redirects, to http(s) only
  read_stdin()           all of standard input, bounded as a file is

Failures are one-line `InputError`s ("cannot fetch URL: ..."), so a URL that fails is one failed input and the
others go on, as a file that cannot be read. The bytes are decoded by `images.load_image_bytes`, with the same
pixel limit (decompression-bomb guard) as files. The standard library's urllib does the work: proxies set in the
environment (http_proxy, https_proxy, no_proxy) are honoured as urllib honours them.
"""

from __future__ import annotations

import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO

from blip2cli import __version__
from blip2cli.errors import InputError
from blip2cli.files import MAX_INPUT_BYTES

MAX_URL_BYTES = 50 * 1024 * 1024  # a 50 MB photo is already huge; a body past this is cut off, not downloaded
CONNECT_TIMEOUT = 10.0  # seconds to connect, and then for each read (urllib uses one socket timeout for both)
DEADLINE = 60.0  # seconds for the whole download: a server trickling a byte every few seconds is cut off too
MAX_REDIRECTS = 5
_SCHEMES = ("http://", "https://")
_CHUNK = 1 << 16


def is_url(text: str) -> bool:
    return text[:8].lower().startswith(_SCHEMES)


def url_scheme(text: str) -> str | None:
    """The scheme of something spelled like a URL ("ftp" for ftp://host/x), else None."""
    scheme, sep, _ = text.partition("://")
    return scheme.lower() if sep and scheme.isalpha() else None


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def http_error_302(self, req, fp, code, msg, headers):  # type: ignore[no-untyped-def]
        target = urllib.parse.urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        if not is_url(target):  # urllib itself would follow ftp://
            raise InputError(f"cannot fetch URL: redirected to a non-http(s) address {target}: {req.full_url}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def fetch_url(url: str) -> bytes:
    """The body of `url` (module docstring), or an InputError naming the URL and why."""
    if not is_url(url):
        raise InputError(f"cannot fetch URL: only http:// and https:// are fetched: {url}")
    opener = urllib.request.build_opener(_Redirects)  # + ProxyHandler from the environment, as urlopen has
    deadline = time.monotonic() + DEADLINE
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"blip2cli/{__version__}"})  # may refuse it
        with opener.open(request, timeout=CONNECT_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_URL_BYTES:
                raise InputError(_too_large(url, int(length)))
            return _read_bounded(response, MAX_URL_BYTES, url, deadline)
    except InputError:
        raise
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise InputError(f"cannot fetch URL: too many redirects (limit {MAX_REDIRECTS}): {url}") from None
        raise InputError(f"cannot fetch URL: HTTP {exc.code} {exc.reason}: {url}") from None
    except urllib.error.URLError as exc:
        raise InputError(f"cannot fetch URL: {_reason(exc.reason)} (offline or unreachable?): {url}") from None
    except (TimeoutError, socket.timeout):
        raise InputError(f"cannot fetch URL: no answer within {CONNECT_TIMEOUT:g} s: {url}") from None
    except (OSError, ValueError) as exc:  # a connection reset mid-body, a malformed address, a bad status line
        raise InputError(f"cannot fetch URL: {_reason(exc)}: {url}") from None


def read_stdin() -> bytes:
    """All of standard input as bytes (an image piped in: `cat x.jpg | blip2 caption -`)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise InputError("cannot read standard input: it is closed")
    return _read_bounded(stream, MAX_INPUT_BYTES, "-", None)


def _read_bounded(stream: BinaryIO, limit: int, name: str, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    read = getattr(stream, "read1", stream.read)  # read1: what has arrived, so a trickle still meets the deadline
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise InputError(f"cannot fetch URL: download took longer than {DEADLINE:g} s: {name}")
        chunk = read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise InputError(_too_large(name, None, limit))
        chunks.append(chunk)


def _too_large(name: str, size: int | None, limit: int = MAX_URL_BYTES) -> str:
    stated = f"{size / 1e6:.1f} MB, " if size is not None else ""
    what = "standard input is" if name == "-" else f"cannot fetch URL: {name} is"
    return f"{what} too large ({stated}limit {limit / 1e6:.0f} MB)"


def _reason(reason: object) -> str:
    """"[Errno 111] Connection refused" -> "connection refused"; a timeout -> "timed out"."""
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    text = getattr(reason, "strerror", None) or str(reason)
    return str(text).strip().splitlines()[0][:160] if text else type(reason).__name__
