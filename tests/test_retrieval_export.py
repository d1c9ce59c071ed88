"""The `blip2 search --html` page: thumbnails link to the original files, paths break only between their parts,
the page names the query, the model and the index, and every image has alt text."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from blip2cli.retrieval.export import write_html
from blip2cli.retrieval.rank import Hit


def _photo(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / name)
    return folder / name


def test_the_page_links_names_and_describes(tmp_path):
    long_dir = tmp_path / "holiday-photos-2024-with-a-long-name"
    first = _photo(long_dir, "beach & sea #1.png")
    second = _photo(tmp_path, "dog.png")
    hits = [Hit(1, str(first), 1.5, 0.4, 1.1), Hit(2, str(second), 0.9, 0.3, 0.6, ("/backup/dog.png",))]
    page = tmp_path / "hits.html"
    write_html(page, hits, "a red square", model="Salesforce/blip2-itm-vit-g", index=tmp_path / "pics.idx")
    text = page.read_text()
    assert f'<a href="{first.resolve().as_uri()}"><img src="data:image/jpeg;base64,' in text  # & -> %26, # -> %23
    assert 'alt="beach &amp; sea #1.png"' in text and 'alt="dog.png"' in text
    assert "a red square" in text and "model Salesforce/blip2-itm-vit-g" in text
    assert f"index {tmp_path}/pics.idx" in text
    assert '<div class="name" title="' + str(first).replace("&", "&amp;") + '">beach &amp; sea #1.png</div>' in text
    assert "<span>holiday-photos-2024-with-a-long-name</span>/<wbr></div>" in text  # the folders, below the name
    assert 'same file: <span></span>/<wbr><span>backup</span>/<wbr><span class="file">dog.png</span>' in text
    assert "break-all" not in text and re.search(r"\.path span \{ white-space: nowrap; \}", text)


def test_long_file_names_wrap_between_words_only(tmp_path):
    name = "a_long_camera-roll_name.jpeg"
    write_html(tmp_path / "hits.html", [Hit(1, str(tmp_path / name), 0.5, 0.5, None)], "cat")
    assert ">a_<wbr>long_<wbr>camera-<wbr>roll_<wbr>name.jpeg</div>" in (tmp_path / "hits.html").read_text()


def test_an_image_query_page_has_alt_text_for_the_query(tmp_path):
    query = _photo(tmp_path, "query.png")
    page = tmp_path / "hits.html"
    write_html(page, [Hit(1, str(query), 1.0, 1.0, None)], image=query)
    assert 'alt="query image query.png"' in page.read_text()


def test_an_unreadable_hit_keeps_its_link_and_path(tmp_path):
    gone = tmp_path / "gone.jpg"
    page = tmp_path / "hits.html"
    write_html(page, [Hit(1, str(gone), 0.5, 0.5, None)], "cat")
    text = page.read_text()
    assert "cannot read image" in text and gone.as_uri() in text and '<div class="name" title="' in text
    assert ">gone.jpg</div>" in text
