"""Shared fixtures: tiny offline BLIP-2 checkpoints (built once per session) and the coco-mini photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from threads, and OpenMP's spin-waiting threads slow a busy 2-core machine 3x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> Path:
    from tests import tiny

    return tiny.opt_model(tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    from tests import tiny

    return tiny.t5_model(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def tiny_retrieval_model_dir(tmp_path_factory) -> Path:
    from tests import tiny

    return tiny.retrieval_model(tmp_path_factory.mktemp("tiny-itm"))


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    if not COCO_MINI.is_dir():
        pytest.skip(f"coco-mini photos not found at {COCO_MINI}")
    return COCO_MINI


# ---------------------------------------------------------------------------------------------------------------
# Training tests (tests/training.py holds the builders and helpers)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """A Q-Former tokenizer, a tiny OPT, and a 12-image caption set (COCO format), built once."""
    from tests import training

    return training.build_assets(tmp_path_factory.mktemp("train-assets"), COCO_MINI)


@pytest.fixture(scope="module")
def one_thread():
    """Two threads on two shared cores spin against other jobs; one thread is faster and steadier here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
