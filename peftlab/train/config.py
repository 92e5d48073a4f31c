"""``TrainConfig``: every knob of a training run, validated, with YAML and ``key=value`` overrides.

The keys DESIGN.md fixes (model, method, method_args, data, max_steps/epochs, batch_size,
grad_accum, lr, seed, eval_every, save_every, output_dir) plus the usual rest. Attribute
docstrings are the help text; unknown keys are an error that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from peftlab.core.config import ConfigError, MethodConfig, check, config_from_dict
from peftlab.data.sources import parse_sources
from peftlab.train.optim import OPTIMIZERS  # the names make_optimizer accepts


@dataclasses.dataclass
class TrainConfig:
    """One training run: model, method, data, hyperparameters and where to write."""

    model: str = "smollm2-135m"
    """Bundled name (smollm2-135m, minilm-l6), local Hugging Face directory, or .gguf path."""
    method: str = "lora"
    """A registered method name (see `peftlab methods`)."""
    method_args: dict = dataclasses.field(default_factory=dict)
    """Options of the method's config, e.g. {r: 16, alpha: 32, target_modules: all-linear}."""
    data: str | list | dict = "builtin:sort"
    """builtin:<task> (sort, reverse, arith, max, upper); a .json/.jsonl/.csv/.tsv/.parquet/
    .arrow file, a glob of them, or a directory written by Dataset.save_to_disk; or a mixture:
    a list of {path, weight, name, columns, column_names, split}."""
    columns: dict | None = None
    """Column roles, e.g. {prompt: question, response: answer} (also system, history,
    messages) or {text: "#1 String", text_pair: "#2 String", label: Quality}; default:
    recognised formats (Alpaca, messages, ShareGPT, prompt/completion, question/answer)."""
    column_names: list | None = None
    """Column names of headerless .csv/.tsv files, e.g. [source, label, mark, sentence]."""
    eval_data: str | dict | None = None
    """The test set: a file scored once, after training, and reported apart (summary.json
    "test", metrics.jsonl test_ keys); never used to choose anything during training."""
    eval_size: int = 64
    """Validation examples, evaluated during training (eval_ keys): held out from data, or
    the first of validation_data."""
    validation_data: str | dict | None = None
    """A separate validation file; default: hold out eval_size examples of data."""
    test_size: int | None = None
    """Without eval_data: hold out this many examples of data as the test split (default:
    no test split). With eval_data: use its first test_size examples (default: all)."""
    data_size: int | None = None
    """Use at most this many training examples (built-in tasks generate this many; default 2000)."""
    text_column: str = "text"
    """Column with the input text (classification); columns.text overrides it."""
    label_column: str = "label"
    """Column with the class label (classification); columns.label overrides it."""
    max_length: int = 256
    """Examples longer than this many tokens are cut (and counted in the summary)."""

    max_steps: int | None = None
    """Optimizer steps to run; set this or epochs (default: 1 epoch)."""
    epochs: float | None = None
    """Passes over the training data; set this or max_steps."""
    batch_size: int = 8
    """Examples per process per micro-batch; global batch = batch_size × grad_accum × processes."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalized by the tokens of all of them."""
    lr: float = 2.0e-4
    """Peak learning rate."""
    lr_schedule: str = "cosine"
    """After warmup: "cosine" (to min_lr_ratio × lr), "linear" or "constant"."""
    warmup_steps: int | None = None
    """Linear warmup from 0 over this many steps (overrides warmup_ratio)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps."""
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of lr."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) on matrices; biases, norms and vectors get none."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    optimizer: str = "adamw"
    """"adamw" (torch), or bitsandbytes "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"
    (paged: CUDA only; elsewhere torch AdamW with a warning)."""
    seed: int = 0
    """Seeds adapter init, data order, dropout and the built-in task generator."""

    eval_every: int = 0
    """Evaluate every this many steps (0: only before and after training)."""
    eval_before: bool = True
    """Evaluate once before the first step (the baseline the final numbers are compared with)."""
    eval_exact_match: bool | None = None
    """Greedy-generate answers and score exact match (default: on for built-in tasks)."""
    eval_batch_size: int | None = None
    """Batch size for evaluation (default: batch_size)."""
    save_every: int = 0
    """Write a resumable checkpoint every this many steps (0: none)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_every: int = 1
    """Append a line to metrics.jsonl every this many steps."""
    output_dir: str = "runs/run"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, adapter/, summary.json."""
    overwrite: bool = False
    """Replace a run already in output_dir (otherwise that is an error)."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute."""
    mixed_precision: str = "no"
    """"no", "bf16" (CPU or recent GPU) or "fp16" (CUDA only; loss scaling by accelerate)."""
    tensorboard: bool = False
    """Also log metrics to TensorBoard under output_dir/tensorboard (needs `tensorboard`)."""
    progress: bool = True
    """Show a progress bar with loss, lr and tokens/s."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # YAML reads "2e-4" as a string; accept it
            v = getattr(self, f.name)
            if isinstance(v, str) and ("float" in str(f.type) or "int" in str(f.type)):
                try:
                    num = float(v)
                    setattr(
                        self, f.name, int(num) if "int" in str(f.type) and num.is_integer() else num
                    )
                except ValueError:
                    pass
        pos_int = "a positive integer"
        for key in ("batch_size", "grad_accum", "max_length", "log_every", "keep_checkpoints"):
            v = getattr(self, key)
            check(isinstance(v, int) and v > 0, key, v, pos_int)
        for key in ("eval_every", "save_every", "eval_size", "seed"):
            v = getattr(self, key)
            check(isinstance(v, int) and v >= 0, key, v, "a non-negative integer")
        check(
            self.test_size is None or (isinstance(self.test_size, int) and self.test_size >= 0),
            "test_size",
            self.test_size,
            "null (eval_data: all of it; otherwise no test split) or a non-negative integer",
        )
        check(
            self.data_size is None or (isinstance(self.data_size, int) and self.data_size > 0),
            "data_size",
            self.data_size,
            "null (all the data; builtin tasks: 2000) or a positive integer",
        )
        for key in ("max_steps", "warmup_steps", "eval_batch_size"):
            v = getattr(self, key)
            check(
                v is None or (isinstance(v, int) and v >= 0),
                key,
                v,
                "null or a non-negative integer",
            )
        check(
            self.max_steps is None or self.epochs is None,
            "max_steps",
            self.max_steps,
            f"null when epochs is set (epochs={self.epochs}); set one of them",
        )
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        check(
            self.epochs is None or (isinstance(self.epochs, int | float) and self.epochs > 0),
            "epochs",
            self.epochs,
            "a positive number",
        )
        check(
            isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0,
            "lr",
            self.lr,
            "a positive number, e.g. 2.0e-4",
        )
        check(
            self.lr_schedule in ("cosine", "linear", "constant"),
            "lr_schedule",
            self.lr_schedule,
            '"cosine", "linear" or "constant"',
        )
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "non-negative")
        check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            self.max_grad_norm,
            "null or a positive number",
        )
        check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        check(
            self.mixed_precision in ("no", "bf16", "fp16"),
            "mixed_precision",
            self.mixed_precision,
            '"no", "bf16" or "fp16"',
        )
        check(
            isinstance(self.method_args, dict),
            "method_args",
            self.method_args,
            "a mapping of the method's options, e.g. {r: 8}",
        )
        # the structure of data, columns and column_names; the files are read by train()
        parse_sources(self.data, "data", self.columns, self.column_names)
        for key in ("validation_data", "eval_data"):
            if getattr(self, key) is not None:
                parse_sources(getattr(self, key), key, self.columns, self.column_names)
        self.method_config()  # unknown method / bad method option: fail before loading anything

    def method_config(self) -> MethodConfig:
        """The method's config built from ``method`` and ``method_args``."""
        try:
            return config_from_dict({**self.method_args, "method": self.method})
        except ConfigError as e:
            where = "method" if "unknown method" in str(e) else "method_args"
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"method_args: {e}") from None

    def data_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`peftlab.data.load_task_data` this config sets."""
        return {
            "eval_size": self.eval_size,
            "eval_data": self.eval_data,
            "data_size": self.data_size,
            "seed": self.seed,
            "text_column": self.text_column,
            "label_column": self.label_column,
            "validation_data": self.validation_data,
            "test_size": self.test_size,
            "columns": self.columns,
            "column_names": self.column_names,
        }

    @property
    def data_is_builtin(self) -> bool:
        """Whether every training source is a built-in task (exact match is on by default)."""
        return all(s.builtin for s in parse_sources(self.data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; an unknown key is an error that lists the known keys."""
        if not isinstance(d, dict):
            raise ConfigError(
                f"a training config must be a mapping of keys to values, got {type(d).__name__}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {', '.join(known)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML file and apply ``key=value`` overrides."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(apply_overrides(d, overrides or []))


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``d`` with each ``key=value`` (dotted keys reach into mappings) set.

    Values are parsed as YAML scalars: ``lr=1e-3``, ``method_args.r=8``,
    ``method_args.target_modules=[q_proj,v_proj]``, ``eval_data=null``.
    """
    d = dict(d)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must look like key=value, e.g. lr=1e-3 or method_args.r=8"
            )
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = value
    return d
