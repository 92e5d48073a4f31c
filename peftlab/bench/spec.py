"""What a comparison runs: :class:`CompareConfig` (the user's settings) → :func:`~peftlab.bench.
runner.plan` → one :class:`RunSpec` per method and seed (one worker's orders).

A spec travels as JSON (``runs/<name>.spec.json`` for the worker, every spec in ``plan.json``)
with exactly the keys of :class:`RunSpec`, so directories written before these types existed
still load and resume: :meth:`RunSpec.fingerprint_of` hashes the same keys the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from peftlab.core.config import ConfigError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = {"causal-lm": "builtin:sort"}
DEFAULT_SEEDS = 3
"""Runs per method of a non-quick comparison: the fewest that give a 95% interval worth
reading (t(0.975, 2) = 4.3)."""
"""Default data per model kind; classification has no built-in task, so it needs ``data``."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """Training budget shared by every method; the defaults are sized for a 2-core CPU."""

    steps: int
    batch_size: int
    max_length: int
    eval_size: int
    new_tokens: int = 16
    repeats: int = 3


FULL = Budget(steps=25, batch_size=8, max_length=64, eval_size=32, new_tokens=12, repeats=3)
"""`peftlab compare`: ≤ 20 min for every method on the bundled SmolLM2 on a 2-core CPU."""
QUICK = Budget(steps=6, batch_size=4, max_length=64, eval_size=8, new_tokens=8, repeats=2)
"""`peftlab compare --quick`: ≤ 5 min."""


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """The settings of one comparison: everything that decides its runs' numbers, and where
    they go. ``None`` budget fields take :data:`FULL`'s (or, with ``quick``, :data:`QUICK`'s)."""

    methods: tuple[str, ...] | None = None
    """Registry names; None: every registered method (each applies to both model kinds)."""
    model: str = DEFAULT_MODEL
    """Bundled name, HF directory or GGUF path."""
    data: str | None = None
    """``builtin:<task>`` or a data file; None: the built-in task of the model's kind."""
    steps: int | None = None
    """Optimizer steps per run."""
    batch_size: int | None = None
    max_length: int | None = None
    quick: bool = False
    """Take the small budget :data:`QUICK` instead of :data:`FULL`."""
    seeds: int | None = None
    """Runs per method, with seeds ``seed``, ``seed+1``, …; None: :data:`DEFAULT_SEEDS` (3,
    so every figure has a 95% interval), 1 with ``quick``."""
    seed: int = 0
    lr: float | None = None
    """One learning rate for every method; None: each method's own prior
    (``MethodSpec.tuning.lr``: low-rank 1e-3, virtual tokens 1e-2, full fine-tuning 5e-5)."""
    lr_full: float | None = None
    """Learning rate of the methods that train the base weights (full fine-tuning), over
    ``lr`` and the prior; None: ``lr`` if given, else the method's prior."""
    tune: tuple[str, ...] = ()
    """Keys searched per method (``lr``, ``r``, ``num_virtual_tokens``, …; see
    :mod:`peftlab.bench.tune`) on the validation split before the measured runs; empty: no
    search."""
    method_args: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Method name → options, e.g. ``{"lora": {"r": 16}}``."""
    train_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Training-config keys for every run, e.g. ``{"data_size": 2000}``."""
    device: str | None = None
    """None: cuda when available, else cpu."""
    threads: int | None = None
    """Torch threads per run; None: chosen from the machine's load before each run
    (:func:`peftlab.bench.load.choose_threads`)."""
    jobs: int = 1
    """Methods run side by side (each its search, then its runs, in its own workers); more
    than 1 finishes sooner on a machine with cores to spare, and its timings are marked
    unreliable (each run shared the machine with another). Threads per run default to the
    cores divided among the jobs."""
    out: str | Path = "compare-out"
    """Output directory; rerunning with the same one resumes."""

    def __post_init__(self) -> None:
        if not isinstance(self.jobs, int) or isinstance(self.jobs, bool) or self.jobs < 1:
            raise ConfigError(f"jobs={self.jobs!r} is invalid: jobs must be an integer ≥ 1")
        if self.seeds is None:
            object.__setattr__(self, "seeds", 1 if self.quick else DEFAULT_SEEDS)
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise ConfigError(f"seeds={self.seeds!r} is invalid: seeds must be at least 1")
        for key in ("lr", "lr_full"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, int | float) and 0 < v < float("inf")):
                raise ConfigError(f"{key}={v!r} is invalid: a learning rate is a finite number > 0")
        tune = (self.tune,) if isinstance(self.tune, str) else tuple(self.tune or ())
        if any(not isinstance(k, str) or not k for k in tune) or len(set(tune)) != len(tune):
            raise ConfigError(
                f"tune={list(tune)!r} is invalid: give distinct key names, e.g. --tune lr,r"
            )
        object.__setattr__(self, "tune", tune)
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} is invalid: steps must be at least 1")
        # Lists and None are accepted for convenience and stored in one form.
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "method_args", dict(self.method_args or {}))
        object.__setattr__(self, "train_overrides", dict(self.train_overrides or {}))
        for key in ("streaming", "packing"):
            if self.train_overrides.get(key) not in (None, False, "false", "False"):
                raise ConfigError(
                    f"--train {key}={self.train_overrides[key]!r} is not supported by compare "
                    f"(its baselines and identical batches per method need the examples in "
                    f"memory, unpacked); use peftlab train for a {key} run"
                )

    def budget(self) -> Budget:
        """The shared budget: :data:`QUICK` or :data:`FULL` with the given sizes on top."""
        base = QUICK if self.quick else FULL
        return dataclasses.replace(
            base,
            steps=self.steps or base.steps,
            batch_size=self.batch_size or base.batch_size,
            max_length=self.max_length or base.max_length,
        )


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """How a run times inference (see :func:`peftlab.bench.inference.time_inference`)."""

    new_tokens: int
    repeats: int
    max_prompt_length: int


RUN_INFO_KEYS = (
    "method", "method_args", "model", "kind", "data", "seed", "steps", "batch_size",
    "max_length", "lr", "fingerprint",
)  # fmt: skip
"""The spec fields every result JSON repeats in its run_info, succeeded or failed."""

_FINGERPRINT_KEYS = (
    *(k for k in RUN_INFO_KEYS if k != "fingerprint"),
    "inference",
    "train_overrides",
    "device",
)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One worker's orders: train and measure ``method`` with ``seed`` on the shared budget."""

    name: str
    """``<method>``, or ``<method>-seed<k>`` when the comparison has several seeds."""
    method: str
    method_args: dict[str, Any]
    model: str
    kind: str
    """"causal-lm" or "classification"."""
    data: str
    seed: int
    steps: int
    batch_size: int
    max_length: int
    lr: float
    device: str
    threads: int | None
    inference: InferenceSettings
    train_overrides: dict[str, Any]
    """Training-config keys on top of the budget (evaluation schedule, no checkpoints, …)."""
    run_dir: str
    """The run's training directory."""
    result_path: str
    """Where the worker writes the run's :class:`~peftlab.results.RunResult` JSON."""
    fingerprint: str = ""
    """:meth:`fingerprint_of` this spec: refuses mixing settings in one output directory."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunSpec:
        return cls(**{**data, "inference": InferenceSettings(**data["inference"])})

    @staticmethod
    def fingerprint_of(data: dict) -> str:
        """Hash of everything that decides a run's numbers (not paths), from its JSON form."""
        blob = json.dumps({k: data.get(k) for k in _FINGERPRINT_KEYS}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fingerprinted(self) -> RunSpec:
        """This spec with its :attr:`fingerprint` filled in."""
        return dataclasses.replace(self, fingerprint=self.fingerprint_of(self.to_json()))

    def run_info(self) -> dict:
        """The fields of :data:`RUN_INFO_KEYS`, for the result's run_info."""
        return {k: json_copy(getattr(self, k)) for k in RUN_INFO_KEYS}

    def train_config(self) -> dict:
        """The :func:`peftlab.train.train` config of the run: the budget plus its method."""
        return {
            "model": self.model,
            "method": self.method,
            "method_args": dict(self.method_args),
            "data": self.data,
            "max_steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
            "max_length": self.max_length,
            "output_dir": self.run_dir,
            **self.train_overrides,
        }


def json_copy(value: Any) -> Any:
    """A deep copy of a JSON-like value (dicts, lists, scalars)."""
    return json.loads(json.dumps(value)) if isinstance(value, dict | list) else value
