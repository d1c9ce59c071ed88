"""blip2cli.jsonl: resumable logs that tell the truth (issue #10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip2cli.errors import UsageError
from blip2cli.jsonl import ResumeLog, settings_path


def key(record: dict) -> str | None:
    return record.get("image")


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_rerun_that_changes_nothing_adds_nothing(tmp_path: Path) -> None:
    out = tmp_path / "caps.jsonl"
    for _ in range(3):
        with ResumeLog(out, key) as log:
            log.write({"image": "a", "error": "broken"})
            log.write({"image": "b", "caption": "x"})
    assert lines(out) == [{"image": "a", "error": "broken"}, {"image": "b", "caption": "x"}]
    assert ResumeLog(out, key).pending(["a", "b"], str) == ["a"]  # failures are retried, successes skipped


def test_a_failure_that_now_succeeds_replaces_its_error_record(tmp_path: Path) -> None:
    out = tmp_path / "caps.jsonl"
    out.write_text('{"image": "a", "error": "broken"}\n{"image": "b", "caption": "x"}\n')
    with ResumeLog(out, key) as log:
        log.write({"image": "a", "caption": "fixed"})
        log.write({"image": "c", "error": "other"})
    assert lines(out) == [{"image": "b", "caption": "x"}, {"image": "a", "caption": "fixed"},
                          {"image": "c", "error": "other"}]  # fmt: skip
    assert not list(tmp_path.glob(".*.tmp"))


def test_settings_are_recorded_and_a_mismatch_refused(tmp_path: Path) -> None:
    out = tmp_path / "caps.jsonl"
    ResumeLog(out, key, {"model": "m1"}).open().close()
    assert json.loads(settings_path(out).read_text()) == {"model": "m1"}
    ResumeLog(out, key, {"model": "m1"})  # same settings: fine
    with pytest.raises(UsageError, match=r'other settings \(model: "m1" there, "m2" now\)'):
        ResumeLog(out, key, {"model": "m2"})
    with pytest.raises(UsageError, match=r"other settings \(decoding\);"):
        ResumeLog(out, key, {"model": "m1", "decoding": {"num_beams": 5}})  # a long value: named, not shown


def test_creating_a_log_writes_nothing(tmp_path: Path) -> None:
    ResumeLog(tmp_path / "new" / "caps.jsonl", key, {"model": "m"})
    assert not (tmp_path / "new").exists()
