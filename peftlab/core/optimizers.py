"""The optimizers peftlab trains with, one row each: what its state costs and what builds it.

The trainer's factory (:func:`peftlab.train.optim.make_optimizer`) builds from this table and
the memory estimator (:mod:`peftlab.select.estimator`) prices from it, so a name one accepts the
other knows. State bytes per trainable parameter:

- AdamW: two float32 moments, ``2 · 4 = 8``.
- 8-bit AdamW (Dettmers et al. 2022, https://arxiv.org/abs/2110.02861): two moments in blockwise
  8 bits, each with one float32 absmax per block of 256, ``2 · (1 + 4/256)``; its update also
  makes one temporary the size of the largest trainable tensor.
- Paged AdamW (QLoRA paper §3): the same state in CUDA unified memory, which the driver pages out
  to CPU RAM only when the GPU runs short, so it is counted as GPU memory. Paging needs CUDA:
  elsewhere the factory falls back to torch AdamW (:func:`optimizer_used`), and so does the
  estimate.
"""

from __future__ import annotations

import dataclasses

from peftlab.core.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """One optimizer peftlab can build and estimate."""

    name: str
    state_bytes: float
    """Bytes of optimizer state per trainable parameter."""
    bnb_class: str | None = None
    """The ``bitsandbytes.optim`` class that builds it; None: torch's (fused) AdamW."""
    paged: bool = False
    """Needs CUDA (unified memory); elsewhere :func:`optimizer_used` gives torch AdamW."""
    step_temporary: bool = False
    """The update makes one temporary the size of the largest trainable tensor (8-bit state is
    dequantized per tensor); torch's fused AdamW updates in place."""


_EIGHT_BIT = 2 * (1 + 4 / 256)

OPTIMIZERS: dict[str, Optimizer] = {
    o.name: o
    for o in (
        Optimizer("adamw", 8.0),
        Optimizer("adamw_8bit", _EIGHT_BIT, "AdamW8bit", step_temporary=True),
        Optimizer("paged_adamw", 8.0, "PagedAdamW32bit", paged=True),
        Optimizer("paged_adamw_32bit", 8.0, "PagedAdamW32bit", paged=True),
        Optimizer(
            "paged_adamw_8bit", _EIGHT_BIT, "PagedAdamW8bit", paged=True, step_temporary=True
        ),
    )
}
"""Every optimizer by name ("paged_adamw" is "paged_adamw_32bit")."""


def get_optimizer(name: str) -> Optimizer:
    """The row of ``name``.

    Raises:
        ConfigError: ``name`` is not in :data:`OPTIMIZERS`; the message lists the names.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer={name!r} is invalid: optimizer must be one of {tuple(OPTIMIZERS)}"
        )
    return OPTIMIZERS[name]


def optimizer_used(name: str, cuda: bool) -> Optimizer:
    """The optimizer that actually runs for ``name``: a paged one without CUDA (``cuda`` false:
    some parameter is not on a CUDA device) is torch AdamW."""
    spec = get_optimizer(name)
    return OPTIMIZERS["adamw"] if spec.paged and not cuda else spec
