"""Machine load detection: a CPU-bound neighbour is seen, and threads are chosen around it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from peftlab.bench import load


def test_choose_threads_leaves_busy_cores_alone():
    quiet = load.Load(cores=2, loadavg_1m=0.1, other_busy_cores=0.05, steal=0.0)
    busy = load.Load(cores=2, loadavg_1m=1.2, other_busy_cores=1.0, steal=0.0)
    assert not quiet.loaded and busy.loaded
    assert load.choose_threads(quiet) == 2
    assert load.choose_threads(busy) == 1
    assert load.choose_threads(load.Load(2, 4.0, 3.5, 0.0)) == 1  # never below one
    assert load.choose_threads(busy, requested=2) == 2  # the user's choice wins
    assert load.changed(quiet, busy) and not load.changed(quiet, quiet)


def test_snapshot_sees_a_cpu_bound_neighbour():
    # A neighbour outside our process tree: the intermediate process exits at once, so the
    # spinner is re-parented and is not our child (children are our own work, not load).
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', "
        "'import time\\nt=time.time()\\nwhile time.time()-t<8: pass'], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid)"
    )
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    try:
        time.sleep(0.5)  # let it start
        seen = load.snapshot(window=1.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # It spins one full core; other work on the machine can only add to that.
    assert seen.other_busy_cores >= 0.7 and seen.loaded
    assert {"cores", "loadavg_1m", "other_busy_cores", "steal", "loaded"} <= set(seen.to_dict())
