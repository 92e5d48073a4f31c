"""Machine load: is anything else competing for the CPU while compare measures?

A comparison's timings are only as good as the machine is quiet. Before and during a run we
read:

- **load** — the 1-minute load average (``os.getloadavg``) and the CPU time *other*
  processes used over a short window: the machine's busy jiffies (``/proc/stat``) less the CPU
  seconds of this process tree (``psutil``), per second of wall time, i.e. busy cores;
- **steal** — the share of CPU time the hypervisor gave to other guests (``/proc/stat``
  ``steal``; 0 where the kernel does not report it).

From that, :func:`choose_threads` picks how many intra-op threads a worker should use: the
cores not busy with other work (at least 1). OpenMP threads that spin against another
CPU-bound process are what turn a 5-minute comparison into an hour; fewer threads degrade
gracefully instead. :func:`snapshot` is recorded in every result, and a comparison whose load
changed between phases marks its timings as unreliable rather than reporting them as findings.
"""

from __future__ import annotations

import dataclasses
import os
import time

BUSY_THRESHOLD = 0.5
"""Other processes' busy cores at or above which the machine counts as loaded."""


@dataclasses.dataclass(frozen=True)
class Load:
    """The machine's load at one moment."""

    cores: int
    loadavg_1m: float
    other_busy_cores: float
    """CPU time used by processes outside this process tree, per second of wall time."""
    steal: float
    """Share of CPU time stolen by the hypervisor over the window (0–1)."""

    @property
    def loaded(self) -> bool:
        return self.other_busy_cores >= BUSY_THRESHOLD or self.steal >= 0.1

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "loaded": self.loaded}


def _own_tree_seconds() -> float:
    """CPU seconds used so far by this process and its live children."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        total += t.user + t.system
    return total


def _stat_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs from /proc/stat; zeros where unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0, 0, 0
    v = [int(x) for x in fields[1:9]] + [0] * 8
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return user + nice + system + irq + softirq, steal, sum(v[:8])


def snapshot(window: float = 0.5) -> Load:
    """Measure the load over ``window`` seconds: the machine's busy CPU time (``/proc/stat``)
    less what this process tree used, per second, and the steal share."""
    cores = os.cpu_count() or 1
    b0, s0, t0 = _stat_ticks()
    own0, w0 = _own_tree_seconds(), time.perf_counter()
    time.sleep(window)
    b1, s1, t1 = _stat_ticks()
    own1, w1 = _own_tree_seconds(), time.perf_counter()
    if t1 > t0:  # jiffies over all CPUs: busy share × cores = busy cores
        busy = (b1 - b0) / (t1 - t0) * cores - (own1 - own0) / (w1 - w0)
        steal = (s1 - s0) / (t1 - t0)
    else:  # no /proc/stat: the load average less our own share is the best we have
        busy, steal = os.getloadavg()[0] - (own1 - own0) / (w1 - w0), 0.0
    return Load(cores, os.getloadavg()[0], round(max(0.0, busy), 3), round(steal, 4))


def choose_threads(load: Load, requested: int | None = None) -> int:
    """Intra-op threads for a worker: ``requested`` if given, else the cores not busy with
    other work, rounded down, at least 1."""
    if requested is not None:
        return max(1, int(requested))
    free = load.cores - load.other_busy_cores
    return max(1, min(load.cores, int(free + 0.25)))


def changed(before: Load, after: Load) -> bool:
    """Whether the machine's load changed enough between two phases that their timings cannot
    be compared (one quiet and one loaded, or a busy-core difference of half a core)."""
    return (
        before.loaded != after.loaded
        or abs(before.other_busy_cores - after.other_busy_cores) >= BUSY_THRESHOLD
    )
