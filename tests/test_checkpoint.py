"""Step folders under faults (issue 10): a save the disk cannot hold leaves no `.step-N.tmp/`, says so in one line
(exit 1) and `--resume auto` goes on from the last complete step; Ctrl-C says which checkpoint is saved (exit 130)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from tests.training import RECIPE, sets_for

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(assets, out: Path, *extra: str):
    sets = sets_for(assets, 4, **{"train.save_every": 2, "train.keep_last": 0})
    return runner.invoke(app, ["pretrain", "--stage", "1", str(RECIPE), "--out", str(out), "--json", *sets, *extra])


def _error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_save_on_a_full_disk_is_cleaned_up_and_resume_auto_continues(assets, tmp_path, monkeypatch):
    from blip2cli.train import checkpoint

    real = checkpoint.write_run_dir

    def full_at_step_4(folder, model, recipe, weights):
        if "00000004" in folder.name:
            (folder / "model.safetensors.tmp").write_bytes(b"\0" * 1000)  # what a cut-off save leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, model, recipe, weights)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "write_run_dir", full_at_step_4)
        line = _error_line(_run(assets, out), 1)
    assert "no space left on" in line and "MB needed" in line and "step-00000004" in line
    assert sorted(p.name for p in out.iterdir() if "step" in p.name) == ["step-00000002"]  # no .step-00000004.tmp
    resumed = _run(assets, out, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at step 2" in resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["step"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_auto_ignores_and_removes_partial_folders(tmp_path):
    from blip2cli.train.checkpoint import TrainerState, find_resume

    done = tmp_path / "step-00000002"
    done.mkdir()
    TrainerState(step=2).write(done)
    (tmp_path / ".step-00000004.tmp").mkdir()
    (tmp_path / ".step-00000004.tmp" / "trainer_state.json").write_text("{}")
    assert find_resume(tmp_path, "auto") == done
    assert not (tmp_path / ".step-00000004.tmp").exists()


def test_ctrl_c_says_what_was_saved(assets, tmp_path, monkeypatch):
    from blip2cli.train import loop

    real = loop._Logger.__call__

    def interrupt_at_3(self, record):
        if record.get("step") == 3:
            raise KeyboardInterrupt
        return real(self, record)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(loop._Logger, "__call__", interrupt_at_3)
        line = _error_line(_run(assets, out), 130)
    assert f"the last checkpoint is {out / 'step-00000002'} (step 2)" in line and "--resume auto" in line
    resumed = _run(assets, out, "--resume", "auto")
    assert resumed.exit_code == 0 and "resuming at step 2" in resumed.stderr


def test_ctrl_c_before_any_checkpoint(tmp_path):
    from blip2cli.train.checkpoint import interrupted

    assert "no checkpoint saved yet" in str(interrupted(tmp_path))
    assert interrupted(tmp_path).exit_code == 130


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_errors_are_recognised(code):
    from blip2cli.files import is_disk_full

    assert is_disk_full(OSError(code, "x"))
    assert not is_disk_full(OSError(errno.EACCES, "x"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(KeyboardInterrupt())


def test_a_library_error_on_a_disk_with_no_space_left_is_a_full_disk(tmp_path, monkeypatch):
    """torch.save on a full disk says only "[enforce fail at inline_container.cc] unexpected pos 576 vs 534"."""
    import shutil
    from collections import namedtuple

    from blip2cli import files

    usage = namedtuple("usage", "total used free")
    cryptic = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    assert files.is_disk_full(cryptic, tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    assert not files.is_disk_full(cryptic, tmp_path)


def test_resume_choices(tmp_path):
    from blip2cli.errors import UsageError
    from blip2cli.train.checkpoint import TrainerState, find_resume

    assert find_resume(tmp_path, None) is None and find_resume(tmp_path, "auto") is None
    for step in (3, 12):
        folder = tmp_path / f"step-{step:08d}"
        folder.mkdir()
        TrainerState(step=step).write(folder)
    (tmp_path / ".step-00000015.tmp").mkdir()  # a save that never finished is ignored
    assert find_resume(tmp_path, "auto") == tmp_path / "step-00000012"
    with pytest.raises(UsageError, match="already holds checkpoints"):
        find_resume(tmp_path, None)
    with pytest.raises(UsageError, match="not a step folder"):
        find_resume(tmp_path, str(tmp_path / "step-00000003"))  # no weights in it
