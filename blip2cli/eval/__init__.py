"""The paper's benchmarks, scored exactly as the paper scored them.

`caption` (pycocoevalcap scorers built explicitly), `vqa` (official VQAv2 rules, LAVIS mode, OK-VQA, GQA),
`retrieval` (LAVIS two-stage ITC -> ITM protocol and recall@k), `datasets` (official file readers). This module
holds what a model run shares: resumable per-item predictions and the files written to `--out`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from blip2cli.errors import UsageError
from blip2cli.files import atomic_write_text
from blip2cli.jsonl import JsonlLog, read_jsonl

T = TypeVar("T")


def run_resumable(
    items: Sequence[T],
    key: Callable[[T], Hashable],
    key_field: str,
    predict: Callable[[list[T]], list[dict[str, Any]]],
    batch_size: int,
    log: Path | None,
    description: str,
) -> dict[Hashable, dict[str, Any]]:
    """Predict in batches, appending each record to `log` (JSONL) as it comes; records already there are reused."""
    from blip2cli.render import progress

    done = {record[key_field]: record for record in read_jsonl(log)} if log else {}
    todo = [item for item in items if key(item) not in done]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    writer = JsonlLog(log) if log else None
    try:
        for batch in progress(batches, len(batches), description):
            for record in predict(batch):
                done[record[key_field]] = record
                if writer:
                    writer.write(record)
    finally:
        if writer:
            writer.close()
    return done


def check_run(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume a run in `out` that was started with other settings (its predictions would be mixed in)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise UsageError(
                f"--out: {out} holds a run with other settings ({', '.join(changed)}); use another folder or delete it"
            )
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")  # issue 10


def resume_log(out: Path | None, settings: dict[str, Any], name: str = "predictions.jsonl") -> Path | None:
    """The log a model run appends to and resumes from (None without --out), once `check_run` accepts `out`."""
    if out is None:
        return None
    check_run(out, settings)
    return out / name


def write_outputs(out: Path, record: dict[str, Any], predictions: list[dict[str, Any]] | dict[str, Any] | None) -> None:
    """`scores.json` (the --json record) and `predictions.json` (official result format, rescorable)."""
    out.mkdir(parents=True, exist_ok=True)
    # issue 10: temp + rename, so a full disk leaves the previous files (never a 0-byte one) and says so in one line
    atomic_write_text(out / "scores.json", json.dumps(record, indent=2) + "\n")
    if predictions is not None:
        atomic_write_text(out / "predictions.json", json.dumps(predictions, ensure_ascii=False) + "\n")
