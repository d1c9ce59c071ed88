"""CPU threads: `blip2 --threads N` wins, OMP_NUM_THREADS is honoured when set, else the physical cores (not
hyper-threads, within the affinity mask and cgroup quota), shared among one machine's processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blip2cli import threads

ROOT = Path(__file__).resolve().parents[1]


def _topology(root: Path, cores: list[tuple[int, int]]) -> Path:
    for cpu, (package, core) in enumerate(cores):
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)


def test_hyper_threads_are_not_counted(tmp_path, four_cpus):
    sys_cpu = _topology(tmp_path, [(0, 0), (0, 0), (0, 1), (0, 1)])  # two cores, two siblings each
    assert threads.physical_cores(sys_cpu) == 2
    assert threads.physical_cores(_topology(tmp_path / "b", [(0, 0), (1, 0), (0, 1), (1, 1)])) == 4  # two sockets


def test_unknown_topology_counts_cpus(tmp_path, four_cpus):
    assert threads.physical_cores(tmp_path / "absent") == 4


def test_cgroup_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(cpu_max) is None
    cpu_max.write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(cpu_max) == 2
    assert threads.cgroup_cpu_limit(tmp_path / "absent") is None


def test_choice_order(monkeypatch):
    monkeypatch.setattr(threads, "physical_cores", lambda: 8)
    assert threads.choose(3, {"OMP_NUM_THREADS": "1"}) == (3, "--threads")
    assert threads.choose(None, {"OMP_NUM_THREADS": "1"}) == (None, "OMP_NUM_THREADS")
    assert threads.choose(None, {}) == (8, "physical cores")
    assert threads.choose(None, {"LOCAL_WORLD_SIZE": "4"}) == (2, "physical cores")  # torchrun: 4 processes


def test_configure_sets_the_environment_for_torch_and_children(monkeypatch):
    monkeypatch.setattr(threads, "physical_cores", lambda: 8)
    monkeypatch.setitem(sys.modules, "torch", type("FakeTorch", (), {"set_num_threads": staticmethod(lambda n: None)}))
    environ: dict[str, str] = {}
    assert threads.configure(None, environ) == 8 and environ["OMP_NUM_THREADS"] == "8"
    assert "OMP_WAIT_POLICY" not in environ  # torch already loaded: too late to change how OpenMP waits
    kept = {"OMP_NUM_THREADS": "3"}
    assert threads.configure(None, kept) is None and kept == {"OMP_NUM_THREADS": "3"}
    assert threads.configure(1, kept) == 1 and kept["OMP_NUM_THREADS"] == "1"


def _cpu_threads(*args: str, **env: str) -> int:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONPATH": str(ROOT)} | env
    out = subprocess.run([sys.executable, "-m", "blip2cli", *args, "env", "--json"], capture_output=True, text=True,
                         env=environ, timeout=120, check=True).stdout
    return json.loads(out)["cpu_threads"]


def test_the_cli_sets_torchs_threads():
    assert _cpu_threads("--threads", "1", OMP_NUM_THREADS="2") == 1  # the flag wins, before torch loads


def test_idle_threads_sleep_while_training_unless_told_otherwise(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    environ: dict[str, str] = {"OMP_NUM_THREADS": "2"}
    threads.configure(None, environ, passive=True)
    assert environ == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    active = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.configure(1, active, passive=True)
    assert active == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    inference = {"OMP_NUM_THREADS": "2"}  # decoding: OpenMP's own short spin between its many small regions
    threads.configure(None, inference)
    assert inference == {"OMP_NUM_THREADS": "2"}
