"""How many CPU threads a run's torch uses: the config's `threads`, an int or "auto".

Two oneDNN/OpenMP threads on two cores that another process also wants lose far more than a
core's share: every parallel region waits for its slowest thread, so a preempted thread stalls
the others, while one thread degrades only by its share (figures: README, benchmarks/shared_cores). "auto" therefore counts the cores this process may use
(`os.sched_getaffinity`, a container's CPU quota, OMP_NUM_THREADS when set) and subtracts what
other processes keep busy over a short sample of /proc/stat; a core counts as taken when more
than half of it is.

bf16 results depend on the thread count, so callers resolve once per run, record the number and
reuse it (`tracking.lifecycle.runs` logs it and a resumed run applies the original count).
"""

from __future__ import annotations

import os
import time
from typing import Union

import torch

AUTO = "auto"
SAMPLE_S = 0.25  # long enough for 100 Hz jiffies to resolve a quarter of a core on 2 cores
TORCH_DEFAULT = torch.get_num_threads()  # what a process that never sets it uses (today's default)

Threads = Union[int, str]
_pinned_auto: int | None = None  # what "auto" means in this process, once fixed (search workers)
_interop_set = False


def _cgroup_cpus() -> float | None:
    """A container's CPU quota (cgroup v2 cpu.max), in CPUs; None when unlimited or unknown."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """CPUs this process may run on (affinity, a container's quota), capped by OMP_NUM_THREADS
    when the user set it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpus()
    if quota is not None:
        cores = min(cores, max(1, int(quota + 0.5)))
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        cores = min(cores, int(omp))
    return max(1, cores)


def _cpu_busy_ticks(cpus: set[int], count_niced: bool) -> tuple[int, int]:
    """(busy ticks, all ticks) summed over `cpus` from /proc/stat.

    Niced time counts as busy only when this process is niced too: a `nice 19` loop yields
    its core to a normal-priority run, but competes as an equal with a niced one.
    """
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                continue
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
            busy += user + system + irq + softirq + steal + (nice if count_niced else 0)
            total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def _own_ticks() -> int:
    t = os.times()  # this process's own CPU time, in seconds; ticks below at 100 Hz
    return round((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


def busy_cores(sample_s: float = SAMPLE_S) -> float | None:
    """How many of our CPUs other processes kept busy during `sample_s` (None: unknown here)."""
    if not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"):
        return None
    cpus, niced = os.sched_getaffinity(0), os.nice(0) > 0
    b0, t0, own0 = *_cpu_busy_ticks(cpus, niced), _own_ticks()
    time.sleep(sample_s)
    b1, t1, own1 = *_cpu_busy_ticks(cpus, niced), _own_ticks()
    if t1 <= t0:
        return None
    others = max(0, (b1 - b0) - (own1 - own0))  # our own threads (logging, metrics) are not load
    return len(cpus) * others / (t1 - t0)


def resolve(setting: Threads, sample_s: float = SAMPLE_S) -> int:
    """An int is honoured exactly; "auto" is the usable cores that others leave free (>= 1)."""
    if setting != AUTO:
        return int(setting)
    if _pinned_auto is not None:
        return _pinned_auto
    cores = usable_cores()
    busy = busy_cores(sample_s)
    if busy is None:
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def pin_auto(n: int | None) -> None:
    """From now on "auto" means `n` in this process (a search worker's share of the cores)."""
    global _pinned_auto
    _pinned_auto = n


def apply(n: int) -> None:
    """Sets torch's intra-op threads to `n`. Inter-op threads: 1, set once per process (torch
    allows it only before any inter-op work); nothing here runs operators in parallel."""
    global _interop_set
    if n < 1:
        raise ValueError(f"threads={n}: at least 1")
    if not _interop_set:
        _interop_set = True
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # inter-op work already started in this process: keep its pool
            pass
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
