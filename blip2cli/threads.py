"""How many CPU threads torch computes with, chosen before torch loads.

`blip2 --threads N` wins; otherwise OMP_NUM_THREADS when it is set (OpenMP and torch read it themselves, so it is
left alone); otherwise the physical cores this process may run on (its CPU affinity and cgroup quota), shared
among the processes of one machine under torchrun / accelerate launch. Hyper-threads are not counted: two threads
on one core's siblings contend for the same arithmetic units.

Training (`passive`) sets OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning) unless it is
set: on a 2-core machine busy with other jobs, two spinning threads made tiny pretraining 7x slower than one
thread, and passive ones about as fast as one (the README gives the measurements); its data-loading workers need
the cores that spinning threads hold. Inference keeps OpenMP's default (a short spin, then sleep): a decoding step
is hundreds of short parallel regions with a few microseconds of Python between them, and a sleeping thread's
wake-up costs more than many of them. Beam-5 captions of 8 images ran 1.2-2.3x slower with passive threads
(benchmark model, 2 cores), `blip2 caption` of 16 images end to end 1.1-1.2x.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")


def physical_cores(sys_cpu: Path = SYS_CPU) -> int:
    """Distinct (package, core) pairs among the CPUs this process may use; the CPU count where topology is unknown."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (macOS, some containers): count the CPU itself
    limit = cgroup_cpu_limit()
    return max(1, min(len(cores), limit) if limit else len(cores))


def cgroup_cpu_limit(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """CPUs' worth of time a cgroup-v2 quota allows (`quota period`, rounded up), or None without a quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def choose(requested: int | None, environ: MutableMapping[str, str] = os.environ) -> tuple[int | None, str]:
    """(threads to set, why): --threads, else None when OMP_NUM_THREADS is set (honoured as it is), else the
    physical cores divided among this machine's processes (LOCAL_WORLD_SIZE, set by torchrun and accelerate)."""
    if requested is not None:
        return requested, "--threads"
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None, "OMP_NUM_THREADS"
    local = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, physical_cores() // max(1, local)), "physical cores"


def configure(requested: int | None = None, environ: MutableMapping[str, str] = os.environ,
              passive: bool = False) -> int | None:
    """Apply `choose`: OMP_NUM_THREADS for torch (read when it loads) and for child processes, and
    `torch.set_num_threads` when torch is already loaded; with `passive` (training), OMP_WAIT_POLICY=PASSIVE
    unless set. Returns the count set, or None when left to OMP_NUM_THREADS."""
    if passive and "torch" not in sys.modules:  # read once, when OpenMP starts with torch
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads, _ = choose(requested, environ)
    if threads is None:
        return None
    environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads
