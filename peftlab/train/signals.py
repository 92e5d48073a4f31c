"""Graceful stop on SIGTERM and Ctrl-C (SIGINT).

While :func:`peftlab.train.train` runs on the main thread, SIGTERM and SIGINT are caught:

* before the first optimizer step a signal stops at once: nothing was trained, and the run
  directory holds what it held;
* from then on the signal is noted and the loop stops at the next step boundary
  (:func:`check`): it writes a checkpoint of the last finished step (unless one is there) and
  the adapter so far, records ``status: interrupted`` in summary.json, prints where, and raises
  :class:`TrainingInterrupted` — a ``SystemExit`` whose code is 128 + the signal number (143
  for SIGTERM, 130 for SIGINT), so ``peftlab train`` exits with that status and no traceback;
* a second signal exits at once; the newest checkpoint stays, and ``--resume`` continues
  from it.

Under torchrun the launcher passes the signal to every process; they agree on it with one
all-reduce per step, so all of them stop after the same step.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading

from peftlab.train import checkpoint, fsdp, rundir

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(SystemExit):
    """Training stopped on SIGTERM/SIGINT; ``code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message


class _State:
    installed = False
    deferring = False  # True from the first step boundary on
    signum = 0  # the signal waiting for the next step boundary


_state = _State()


def graceful(fn):
    """Decorator: SIGTERM and SIGINT stop ``fn``'s training loop gracefully (module docstring).
    Handlers are installed only on the main thread, and restored when ``fn`` exits."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _state.installed or threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        _state.installed, _state.deferring, _state.signum = True, False, 0
        for s in SIGNALS:
            signal.signal(s, _handler)
        try:
            return fn(*args, **kwargs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _state.installed, _state.deferring, _state.signum = False, False, 0

    return wrapper


def _handler(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if _state.deferring and not _state.signum:
        _state.signum = signum
        _say(f"{name} received: stopping after this step (send it again to exit at once)")
        return
    if _state.signum:
        msg = (
            f"second signal ({name}): exiting at once; the newest checkpoint stays, and "
            f"`peftlab train --resume` continues from it"
        )
    else:
        msg = f"stopped by {name} before the first training step; nothing was trained"
    _say(msg)
    raise TrainingInterrupted(signum, msg)


def check(run) -> None:
    """At a step boundary: stop here if a signal arrived (saving a checkpoint, the adapter and
    the summary, then raising :class:`TrainingInterrupted`); otherwise return."""
    _state.deferring = True
    signum = _state.signum
    acc = run.accelerator
    if acc.num_processes > 1:  # every process stops after the same step
        import torch

        flag = acc.reduce(torch.tensor([signum], device=acc.device), reduction="sum")
        signum = (signum or signal.SIGTERM) if int(flag.item()) else 0
    if signum:
        _stop(run, signum)


def _stop(run, signum: int) -> None:
    cfg, acc, out, state = run.cfg, run.accelerator, run.out, run.state
    step, name = state["step"], signal.Signals(signum).name
    last = checkpoint.latest(out)
    if step and (last is None or checkpoint.step_of(last) != step):
        last = checkpoint.save(
            acc,
            out,
            step,
            run.unwrapped,
            run.optimizer,
            run.scheduler,
            state,
            cfg.keep_checkpoints,
        )
    msg = (
        f"stopped by {name} after step {step} of {run.total_steps}: checkpoint {last}, "
        f"adapter so far in {out / 'adapter'}; continue with `peftlab train --resume {out}`"
        if step
        else f"stopped by {name} before the first training step; nothing was trained"
    )
    if step:  # every process: under FSDP the adapter is gathered first
        fsdp.save_adapter(acc, run.unwrapped, out / "adapter")
    if acc.is_main_process:
        summary = {
            "status": "interrupted",
            "signal": name,
            "output_dir": str(out),
            "steps": step,
            "total_steps": run.total_steps,
            "checkpoint": str(last) if last else None,
            "final_loss": state["last_loss"],
            "method": cfg.method,
            "model": cfg.model,
        }
        rundir.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
        _say(msg)
    raise TrainingInterrupted(signum, msg)


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not one per process
        print(f"peftlab train: {msg}", file=sys.stderr, flush=True)
