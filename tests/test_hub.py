"""Hub ids through the CLI, offline: `--revision` and `--cache-dir` read a Hugging Face cache laid out as
huggingface_hub lays it out (models--org--name/refs/BRANCH, snapshots/COMMIT/), HF_HUB_CACHE is the default, and
an unreachable hub (HF_ENDPOINT at a closed local port) is one line within seconds, not a minute of retries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny-org/blip2-tiny"
MAIN, DEV = "a" * 40, "b" * 40  # the commits refs/main and refs/dev point at


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_opt_dir: Path, tiny_retrieval_model_dir: Path) -> Path:
    """A cache holding REPO at two commits: the captioning model on main, the retrieval model on dev."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / ("models--" + REPO.replace("/", "--"))
    for commit, branch, model in ((MAIN, "main", tiny_opt_dir), (DEV, "dev", tiny_retrieval_model_dir)):
        shutil.copytree(model, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return cache


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


def test_cache_dir_and_revision_pick_the_snapshot(hub_cache: Path, photo: Path) -> None:
    for revision in ("main", MAIN):
        result = runner.invoke(app, ["caption", str(photo), "--model", REPO, "--cache-dir", str(hub_cache),
                                     "--revision", revision, "--max-new-tokens", "3", "--json"])
        assert result.exit_code == 0, result.output
        assert '"caption"' in result.stdout
    # main is the OPT model: it answers and cannot index; dev is the retrieval model: it indexes and cannot answer
    ask = ["ask", str(photo), "what colour?", "--model", REPO, "--cache-dir", str(hub_cache), "--max-new-tokens", "2"]
    index = ["index", str(photo), "--index", str(hub_cache.parent / "index"), "--model", REPO, "--cache-dir",
             str(hub_cache), "--json"]
    assert runner.invoke(app, ask).exit_code == 0
    assert runner.invoke(app, [*ask, "--revision", "dev"]).exit_code == 2
    assert runner.invoke(app, index).exit_code == 2
    result = runner.invoke(app, [*index, "--revision", DEV])
    assert result.exit_code == 0, result.output
    assert '"added": 1' in result.stdout


def test_a_revision_not_in_the_cache_is_one_line(hub_cache: Path, photo: Path) -> None:
    result = runner.invoke(app, ["caption", str(photo), "--model", REPO, "--cache-dir", str(hub_cache),
                                 "--revision", "v9"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert f"{REPO} at revision v9 is not in the Hugging Face cache ({hub_cache})" in lines[0]
    assert "HF_HUB_OFFLINE is set" in lines[0] and f"hf download {REPO}" in lines[0] and "--cache-dir" in lines[0]


def test_revision_needs_a_hub_id(tiny_opt_dir: Path, photo: Path) -> None:
    result = runner.invoke(app, ["caption", str(photo), "--model", str(tiny_opt_dir), "--revision", "main"])
    assert result.exit_code == 2
    assert "is not a hub id" in result.output


def test_eval_and_capfilt_take_the_options() -> None:
    for command in (["eval", "caption"], ["eval", "vqa"], ["eval", "retrieval"], ["capfilt"], ["search"],
                    ["ask"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
        assert "--revision" in result.output and "--cache-dir" in result.output, command


# ---------------------------------------------------------------------------------------------------------------
# In a fresh process: huggingface_hub reads HF_HUB_OFFLINE, HF_ENDPOINT and HF_HUB_CACHE when it is imported.


def _blip2(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")
             and not k.lower().endswith("_proxy")}
    clean.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "blip2cli", *args], env=clean, capture_output=True, text=True,
                          timeout=300)
    return done, time.monotonic() - start


CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, a connect is refused at once


def test_unreachable_hub_uses_the_default_cache(hub_cache: Path, photo: Path) -> None:
    """HF_HUB_CACHE is where hub ids are found without --cache-dir; with the hub unreachable the cache serves."""
    done, _ = _blip2("caption", str(photo), "--model", REPO, "--max-new-tokens", "3", HF_ENDPOINT=CLOSED,
                     HF_HUB_CACHE=str(hub_cache))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(photo))  # path<TAB>caption
    assert "Retrying" not in done.stderr


def test_unreachable_hub_is_one_line_within_seconds(tmp_path: Path, photo: Path) -> None:
    """Before: huggingface_hub retried each tokenizer file 5 times ("Retrying in 8s", 54 s) and then raised."""
    empty = tmp_path / "empty-cache"
    done, seconds = _blip2("pretrain", str(ROOT / "recipes" / "tiny_cpu.yaml"), "--out", str(tmp_path / "run"),
                           "--set", "model.qformer.tokenizer=bert-base-uncased", HF_ENDPOINT=CLOSED,
                           HF_HUB_CACHE=str(empty))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "bert-base-uncased is not in the Hugging Face cache" in lines[0]
    assert f"the hub ({CLOSED}) cannot be reached" in lines[0]
    assert "--set model.qformer.tokenizer=DIR" in lines[0] and "hf download bert-base-uncased" in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0]
    assert seconds < 40, f"{seconds:.0f} s"  # the process with its imports; the retries alone took 54 s

    done, seconds = _blip2("caption", str(photo), "--model", "tiny-org/not-cached", HF_ENDPOINT=CLOSED,
                           HF_HUB_CACHE=str(empty))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "hf download tiny-org/not-cached" in lines[0], done.stderr
    assert "--cache-dir" in lines[0]
    assert seconds < 40, f"{seconds:.0f} s"
