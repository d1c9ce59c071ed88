"""The stage-1 health metrics (losses.itc_accuracy, losses.itm_accuracy) and the stuck-run warning
(train/health.py): chance levels, and one warning naming the causes after the configured number of steps."""

from __future__ import annotations

import math

import pytest
import torch

from blip2cli.config import TrainConfig
from blip2cli.errors import UsageError
from blip2cli.model import losses
from blip2cli.train.health import StuckWatch

PRIOR = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)


def test_chance_levels():
    assert losses.itm_prior_loss() == pytest.approx(0.636514, abs=1e-6)
    assert losses.itc_chance_loss(8) == pytest.approx(math.log(8))
    # The prior really is ITM's loss for constant logits at log(1/3) vs log(2/3), and ITC's for equal sims.
    logits = torch.tensor([[math.log(2 / 3), math.log(1 / 3)]]).repeat(12, 1)
    assert float(losses.itm_loss(logits, 4)) == pytest.approx(PRIOR, abs=1e-6)
    img = torch.nn.functional.normalize(torch.ones(8, 2, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.ones(8, 4), dim=-1)
    assert float(losses.itc_loss(img, txt, torch.tensor(0.07)).loss) == pytest.approx(math.log(8), abs=1e-5)


def test_itc_accuracy_counts_rows_whose_best_match_is_a_positive():
    sim = torch.eye(4)
    assert float(losses.itc_accuracy(sim, sim)) == 1.0
    wrong = sim[[1, 0, 2, 3]]  # images 0 and 1 prefer each other's text
    assert float(losses.itc_accuracy(wrong, sim)) == pytest.approx((0.5 + 1.0) / 2)
    ids = torch.tensor([5, 5, 6, 7])  # multi-positive: 0 and 1 share an image, so the swap is right
    assert float(losses.itc_accuracy(wrong, sim, ids)) == 1.0


def test_itm_accuracy_is_balanced_so_the_prior_scores_one_half():
    B = 4
    no_match = torch.tensor([[1.0, 0.0]]).repeat(3 * B, 1)  # what a run stuck at its prior predicts
    assert float(losses.itm_accuracy(no_match, B)) == 0.5
    perfect = torch.cat([torch.tensor([[0.0, 1.0]]).repeat(B, 1), no_match[: 2 * B]])
    assert float(losses.itm_accuracy(perfect, B)) == 1.0
    assert float(losses.itm_accuracy(torch.tensor([[0.0, 1.0]]).repeat(3 * B, 1), B)) == 0.5


def _records(itm: float, itc: float, steps: int, every: int = 10) -> list[dict]:
    return [{"step": s, "itm": itm, "itc": itc, "lr": 1e-3} for s in range(every, steps + 1, every)]


def test_stuck_run_warns_once_after_the_configured_steps():
    watch = StuckWatch(50, contrastive_batch=8)
    said = [(r["step"], watch(r)) for r in _records(PRIOR + 0.001, math.log(8), 120)]
    warnings = [(s, w) for s, w in said if w]
    assert len(warnings) == 1 and warnings[0][0] == 50
    message = warnings[0][1]
    assert "ITM at its prior" in message and "ITC at chance (ln 8" in message
    assert "init_std" in message and "learning rate" in message and "augment" in message


def test_a_learning_run_never_warns_and_a_dip_restarts_the_count():
    watch = StuckWatch(50, contrastive_batch=8)
    assert not any(watch(r) for r in _records(0.45, 1.2, 200))
    watch = StuckWatch(50, contrastive_batch=8)
    flat, dip = {"itm": PRIOR, "itc": 1.0}, {"itm": 0.5, "itc": 1.0}
    seq = [flat] * 4 + [dip] + [flat] * 4  # 40 flat steps, a dip, 40 flat steps: never 50 in a row
    assert not any(watch({"step": 10 * (i + 1), **r}) for i, r in enumerate(seq))
    assert watch({"step": 100, **flat}) and watch({"step": 200, **flat}) is None  # 50 in a row now; once only


def test_only_itc_stuck_is_named_alone_and_zero_steps_never_warns():
    watch = StuckWatch(20, contrastive_batch=16)
    message = next(m for r in _records(0.3, math.log(16) - 0.01, 40) if (m := watch(r)))
    assert "ITC at chance (ln 16" in message and "ITM at its prior" not in message
    watch = StuckWatch(20, contrastive_batch=16)
    message = next(m for r in _records(PRIOR, 1.0, 40) if (m := watch(r)))
    assert "ITM at its prior" in message and "ITC is learning" in message
    watch = StuckWatch(0, contrastive_batch=8)
    assert not any(watch(r) for r in _records(PRIOR, math.log(8), 1000))
    with pytest.raises(UsageError, match="stuck_warning_steps"):
        TrainConfig(stuck_warning_steps=-1)
