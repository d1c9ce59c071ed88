"""train.checkpoint: which step folder --resume picks."""

from __future__ import annotations

import pytest


pytestmark = pytest.mark.usefixtures("one_thread")


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
