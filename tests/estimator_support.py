"""What the estimator's test files share: each method's small test options, and the
allocator's measured peak of a training step (CPU) that predictions are compared with."""

from __future__ import annotations

import pytest
import torch

import peftlab

ARGS = {
    "full": {},
    "lora": {"r": 4},
    "dora": {"r": 4},
    "qlora": {"r": 4},
    "adapter": {"bottleneck": 8},
    "prefix": {"num_virtual_tokens": 5, "reparam_hidden": 16},
    "ptuning-v2": {"num_virtual_tokens": 5},
    "prompt": {"num_virtual_tokens": 5},
    "vera": {"r": 4},
}


def _config(method):
    if method not in peftlab.methods():
        pytest.skip(f"method {method!r} is not registered in this install")
    return peftlab.config_from_dict({"method": method, **ARGS.get(method, {})})


def _allocator_peak_of(model, opt, step):
    """Peak live tensor bytes of one ``step()``, from the profiler's allocation events, plus
    what was live before it (weights, optimizer states)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # the optimizer creates its states in the first step
    before = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_floating_point())
    before += sum(
        p.numel() * p.element_size() for p in model.parameters() if not p.is_floating_point()
    )
    before += sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return before + peak
