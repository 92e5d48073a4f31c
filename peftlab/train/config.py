"""``TrainConfig``: every knob of a training run, validated, with YAML and ``key=value`` overrides.

The keys, in groups: what to train (``model``, ``method``, ``method_args``), on what
(``data``, ``eval_data``, ``eval_size``, ``data_size``, ``text_column``, ``label_column``,
``max_length``), how long and how (``max_steps`` or ``epochs``, ``batch_size``,
``grad_accum``, ``lr`` and its schedule, ``weight_decay``, ``max_grad_norm``, ``optimizer``,
``seed``), when to evaluate, save and log (``eval_every``, ``save_every``, ``log_every``, ...),
where to write (``output_dir``, ``overwrite``) and the runtime (``gradient_checkpointing``,
``chunked_loss``, ``packing``, ``streaming`` and ``shuffle_buffer``, ``mixed_precision``,
``distributed``, ``tensorboard``, ``progress``). Each attribute's docstring below is its help text;
``configs/<method>.yaml`` are example files with every knob commented. An unknown key is an error that lists the known ones. Overrides follow
:mod:`peftlab.core.overrides` (``method_args.r=8``).

Every bad value is a one-line :class:`ConfigError` naming the key, the value and what is
allowed, and nothing is silently replaced. First each key's type is checked against its
annotation by :func:`peftlab.core.config.check_fields`, the same check as method configs: a
list where a number belongs, a boolean for an integer, NaN or infinity, null for a key that
needs a value are refused. The one string read as a number is a float in exponent form without
a dot: PyYAML (YAML 1.1) reads ``lr: 1e-3`` as the string ``"1e-3"``, which is taken as
``1e-3`` as YAML 1.2 and the overrides read it; ``lr: "0.001"`` or ``batch_size: "8"`` are
refused. Then the values: counts that must be positive (``max_steps``, ``batch_size``,
``grad_accum``, ...), counts where 0 means "off" (``eval_every``, ``save_every``, ...), names
that may not be empty, and the allowed ``lr_schedule``, ``optimizer`` and ``mixed_precision``.
An empty config file is refused (it would train the default model on the default task).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from peftlab.core import overrides
from peftlab.core.config import ConfigError, MethodConfig, check, check_fields, config_from_dict
from peftlab.data.sources import parse_sources
from peftlab.methods.lora import LoRAConfig
from peftlab.pooling import POOLINGS
from peftlab.train.checkpointing import check_spec as check_checkpointing
from peftlab.train.fsdp import check_spec as check_distributed
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
    pooling: str = "auto"
    """Classification: how the token states become one vector for the head — auto (what the
    checkpoint declares: mean for a sentence-transformers model, else the [CLS] pooler),
    cls or mean. See peftlab/pooling.py."""
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
    head_lr: float | None = 1e-2
    """Classification: learning rate of the classification head (new and random on a loaded
    encoder), whatever the method's lr; null: lr, like the rest. A new linear head needs a
    larger step than the adapters: on frozen MiniLM mean features, 48 steps of AdamW reach
    SST-2 dev accuracy 0.64 at 1e-3 and 0.78 at 1e-2. See peftlab/train/optim.py."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (LoRA-family methods): the lora_B factors (and, as in peft, the other trained
    vectors) train at this multiple of lr, e.g. 16; null: one lr for A and B."""
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
    eval_test: bool = True
    """Score the test split once, after training (false: a compare search trial, which must
    neither see nor pay for the test split)."""
    eval_exact_match: bool | None = None
    """Greedy-generate answers and score exact match (default: on for built-in tasks)."""
    eval_batch_size: int | None = None
    """Batch size for evaluation (default: batch_size)."""
    answer_extractor: str = "exact"
    """How exact match reads an answer from a generation and its reference: "exact" (the whole
    text), "####" (after the last ####), "last-number", or "regex:<pattern>"."""
    metric: str | None = None
    """A user metric "module:function" (higher is better), called as function(predictions,
    references) on the greedy generations of each evaluation; it becomes the run's quality."""
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

    gradient_checkpointing: bool | list | dict = False
    """Recompute activations in backward (less memory, up to ~30% more compute): false, true
    (every layer), [layer indices], {every: k} (layers 0, k, 2k, ...), optionally with
    offload: true (checkpointed inputs kept in CPU memory; GPU only), e.g.
    {every: 2, offload: true}. See peftlab/train/checkpointing.py."""
    chunked_loss: bool = True
    """Causal LMs: compute the output head and the loss over chunks of tokens, never the whole
    [batch, length, vocabulary] logits (same loss and gradients); false: the plain loss."""
    packing: bool = False
    """Causal LMs: pack several training examples into each row of max_length tokens (each
    with its own position ids, attention never crossing from one example to another, the
    loss only on response tokens), so batches hold far less padding; batch_size then counts
    rows. Evaluation stays unpacked. Not for classification models or virtual-token methods.
    See peftlab/data/packing.py."""
    streaming: bool = False
    """Read the training data as a stream (datasets' IterableDataset): records are parsed and
    tokenized as batches need them, so files larger than memory train. Order: a buffer shuffle
    of shuffle_buffer records, reseeded every epoch; validation: the first eval_size examples
    of the file (or validation_data); data_size caps the training records. Needs max_steps;
    no packing, no built-in tasks. See peftlab/data/stream.py."""
    shuffle_buffer: int = 10_000
    """Streaming: records each source's shuffle buffer holds (more: a better shuffle, more
    memory)."""
    mixed_precision: str = "no"
    """"no", "bf16" (CPU or recent GPU) or "fp16" (CUDA only; loss scaling by accelerate)."""
    distributed: dict = dataclasses.field(default_factory=lambda: {"strategy": "ddp"})
    """Several processes (torchrun / accelerate launch): {strategy: ddp} replicates the model
    on every process (DistributedDataParallel); {strategy: fsdp} shards parameters, gradients
    and optimizer states across them (FSDP2; 2+ processes). See peftlab/train/fsdp.py."""
    tensorboard: bool = False
    """Also log metrics to TensorBoard under output_dir/tensorboard (needs `tensorboard`)."""
    progress: bool = True
    """Show a progress bar with loss, lr and tokens/s."""

    def __post_init__(self) -> None:
        """Check every key: its type (from the annotation, :func:`check_fields`), then its value.

        Raises:
            ConfigError: the first bad key, on one line naming the key, the value and what is
                allowed. A value that cannot work is refused, never replaced.
        """
        check_fields(self, tuples=False)  # lists stay lists: the config is written as YAML
        for key in _POSITIVE:
            v = getattr(self, key)
            check(v is None or v > 0, key, v, f"{_NULL_OR[key]}a positive integer")
        for key in _NON_NEGATIVE:
            v = getattr(self, key)
            check(v is None or v >= 0, key, v, f"{_NULL_OR[key]}a non-negative integer")
        check(
            self.test_size is None or self.test_size >= 0,
            "test_size",
            self.test_size,
            "null (eval_data: all of it; otherwise no test split) or a non-negative integer",
        )
        for key in _NON_EMPTY:
            v = getattr(self, key)
            check(
                not isinstance(v, str) or v.strip() != "",
                key,
                v,
                f"{_NULL_OR[key]}a non-empty string",
            )
        check(
            self.max_steps is None or self.epochs is None,
            "max_steps",
            self.max_steps,
            f"null when epochs is set (epochs={self.epochs}); set one of them",
        )
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        check(self.epochs is None or self.epochs > 0, "epochs", self.epochs, "a positive number")
        check(self.lr > 0, "lr", self.lr, "a positive number, e.g. 2.0e-4")
        check(
            self.head_lr is None or self.head_lr > 0,
            "head_lr",
            self.head_lr,
            "null (the head trains at lr) or a positive number, e.g. 1.0e-2",
        )
        check(
            self.loraplus_lr_ratio is None or self.loraplus_lr_ratio >= 1,
            "loraplus_lr_ratio",
            self.loraplus_lr_ratio,
            "null (off) or a number >= 1 (B's lr / A's lr, e.g. 16)",
        )
        _one_of("lr_schedule", self.lr_schedule, _SCHEDULES)
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "non-negative")
        check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            self.max_grad_norm,
            "null (no clipping) or a positive number",
        )
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("mixed_precision", self.mixed_precision, _PRECISIONS)
        _one_of("pooling", self.pooling, POOLINGS)
        self.distributed = check_distributed(
            self.distributed, self.method, self.mixed_precision, self.optimizer
        )
        check(
            isinstance(self.chunked_loss, bool), "chunked_loss", self.chunked_loss, "true or false"
        )
        check_checkpointing(self.gradient_checkpointing)
        self._check_metrics()
        # the structure of data, columns and column_names; the files are read by train()
        sources = parse_sources(self.data, "data", self.columns, self.column_names)
        if self.streaming:
            self._check_streaming([s.path for s in sources if s.builtin])
        for key in ("validation_data", "eval_data"):
            if getattr(self, key) is not None:
                parse_sources(getattr(self, key), key, self.columns, self.column_names)
        method = self.method_config()  # unknown method / bad option: fail before loading
        check(
            self.loraplus_lr_ratio is None or isinstance(method, LoRAConfig),
            "loraplus_lr_ratio",
            self.loraplus_lr_ratio,
            f"null with method {self.method!r}: LoRA+ sets the lr of lora_B factors, which "
            f"only LoRA-family methods (lora, dora, qlora) have",
        )
        check(
            not (self.packing and hasattr(method, "num_virtual_tokens")),
            "packing",
            self.packing,
            f"false with method {self.method!r}: its virtual tokens would lead only the first "
            f"of the examples packed in a row",
        )

    def _check_metrics(self) -> None:
        """The answer extractor names one; the user metric loads (before any training)."""
        from peftlab.train import metrics

        try:
            metrics.check_extractor(self.answer_extractor)
            if self.metric is not None:
                metrics.load_user_metric(self.metric)
        except metrics.MetricError as e:
            raise ConfigError(str(e)) from None

    def _check_streaming(self, builtin: list[str]) -> None:
        """A stream needs a length (max_steps), files (built-in tasks are generated in
        memory) and no packing (it places examples by their lengths, all known up front)."""
        check(
            self.max_steps is not None,
            "streaming",
            self.streaming,
            "false without max_steps: a stream's length is unknown until it is read; set "
            "max_steps=N",
        )
        check(
            not builtin,
            "streaming",
            self.streaming,
            f"false with data {builtin}: built-in tasks are generated in memory, not read",
        )
        check(
            not self.packing,
            "packing",
            self.packing,
            "false with streaming: packing places examples by their lengths, all known up "
            "front, and a stream's are not",
        )

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
        unknown = sorted(set(d) - set(known), key=str)  # YAML keys may be numbers, not names
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {', '.join(known)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML file and apply ``key=value`` overrides.

        Raises:
            ConfigError: ``path`` is missing or a directory, is not UTF-8 YAML, is not a
                mapping, or is empty (an empty file would train the default model on the
                default task; an override ``model=...`` makes it a config again).
        """
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"{path} is a directory; give a YAML config file, or use --resume {path} to "
                f"continue the run in it"
            )
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():  # /dev/null, a pipe: nothing to read a config from twice
            raise ConfigError(
                f"config file {path} is not a regular file; give a YAML file (an empty one "
                f"takes every key from the key=value overrides)"
            )
        data = path.read_bytes()
        try:
            d = yaml.safe_load(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise ConfigError(
                f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it "
                f"as UTF-8"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
        overrides = overrides or []
        if d is None or d == {}:
            if not any(o.partition("=")[0].strip() == "model" for o in overrides):
                raise ConfigError(
                    f"config file {path} is empty; write at least `model: NAME` (and the "
                    f"method, data and length), e.g. starting from configs/lora.yaml"
                )
            d = {}
        if not isinstance(d, dict):
            raise ConfigError(
                f"{path}: a training config must be a mapping of keys to values "
                f"(`model: smollm2-135m`), not a {type(d).__name__}"
            )
        return cls.from_dict(apply_overrides(d, overrides))


_SCHEDULES = ("cosine", "linear", "constant")
_PRECISIONS = ("no", "bf16", "fp16")
_POSITIVE = (
    "batch_size",
    "grad_accum",
    "max_length",
    "log_every",
    "keep_checkpoints",
    "max_steps",
    "data_size",
    "eval_batch_size",
    "shuffle_buffer",
)
"""Integer keys that must be positive (or null, where the annotation allows it)."""
_NON_NEGATIVE = ("eval_every", "save_every", "eval_size", "seed", "warmup_steps")
"""Integer keys where 0 means "none" or "off" (see each key's docstring)."""
_NON_EMPTY = (
    "model",
    "method",
    "data",
    "eval_data",
    "text_column",
    "label_column",
    "output_dir",
    "metric",
)
"""String keys that name something; an empty one names nothing (``output_dir: ""`` would be
the current directory)."""
_NULL_OR = {
    f.name: "null or " if "None" in str(f.type) else "" for f in dataclasses.fields(TrainConfig)
}
"""How the messages of keys that may be null begin."""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, on one line."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    check(value in allowed, key, value, "one of " + ", ".join(repr(a) for a in allowed))


def apply_overrides(d: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Return ``d`` with each ``key=value`` (dotted keys reach into mappings) set.

    Values are parsed as YAML: ``lr=1e-3``, ``method_args.r=8``,
    ``method_args.target_modules=[q_proj,v_proj]``, ``eval_data=null``
    (see :mod:`peftlab.core.overrides`).
    """
    return overrides.apply_overrides(d, items)
