"""Every bad value of the training config is a one-line error naming the key, the value and what
is allowed, and every CLI path error is one line (#17): wrong types (one generic check driven
by the annotations, shared with method configs), strings for numbers, values that cannot
work, bad config files, and `python -m peftlab.cli train/compare` with bad paths."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import peftlab
from peftlab.cli import main
from peftlab.core.config import ConfigError, check_fields
from peftlab.train import TrainConfig
from peftlab.train.optim import OPTIMIZERS
from tests.tiny_lm import save_tiny_lm

ROOT = Path(__file__).resolve().parents[2]


def _refused(kw: dict, key: str) -> str:
    """The error TrainConfig(**kw) raises: one line, naming ``key`` and its value first."""
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{key}={kw[key]!r} is invalid: {key} must be "), msg
    return msg


# ---- types: the generic check, for every key ---------------------------------------------------

INF, NAN = float("inf"), float("nan")
# Values of the wrong type for each annotation TrainConfig uses (add a row for a new one).
WRONG = {
    "str": [None, 1, 2.5, True, ["a"], {"a": 1}],
    "str | None": [1, True, ["a"], {"a": 1}],
    "int": [None, True, False, "8", "1e3", 8.0, 8.5, [8], {"n": 8}, INF, NAN],
    "int | None": [True, "8", 8.0, [8], INF],
    "float": [None, True, "0.1", "abc", "1e-3x", [1e-3], {"lr": 1}, INF, -INF, NAN],
    "float | None": [True, "16", [16], {"x": 1}, INF, -INF, NAN],
    "bool": [None, 1, 0, "true", "yes", [True]],
    "bool | None": [1, "false", [False]],
    "dict": [None, "r=8", 8, ["r", 8], True],
    "list[str]": [None, "a", 1, [1], ["a", None]],
    "list[str] | None": ["a", 1, [1], ["a", None]],
    "dict[str, str]": [None, "a", ["a"], {"a": 1}],
    "dict[str, str] | None": ["a", ["a"], {"a": 1}],
    "bool | list | dict": [1, "true", 2.5, "every=2"],  # null: off, as false
    "str | list | dict": [None, 1, 2.5, True],
    "dict | None": ["a", 1, ["a"], True],
    "list | None": ["a", 1, {"a": 1}, True],
    "str | dict | None": [1, 2.5, True, ["a"]],
}


def _fields():
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        yield f.name, str(f.type), hints[f.name]


@pytest.mark.parametrize("key,annotation,hint", list(_fields()), ids=lambda x: str(x))
def test_every_key_refuses_wrong_types(key, annotation, hint):
    """lists for scalars, strings for numbers, booleans for integers, infinities, NaN and
    nulls for keys that need a value: one line naming the key, the value and the type."""
    assert annotation in WRONG, f"add wrong values for {annotation!r} to WRONG"
    for value in WRONG[annotation]:
        msg = _refused({key: value}, key)
        assert " not " in msg, msg  # says what was given: "..., not a boolean."


def test_the_type_check_is_the_method_configs_one():
    """One function checks both kinds of config: the same words for the same mistake."""
    with pytest.raises(ConfigError) as train_err:
        TrainConfig(seed=True)
    with pytest.raises(ConfigError) as method_err:
        peftlab.LoRAConfig(r=True)
    assert str(train_err.value).endswith("must be an integer, not a boolean.")
    assert str(method_err.value).endswith("must be an integer, not a boolean.")

    @dataclasses.dataclass
    class Plain:
        n: int
        x: float | None
        names: list[str]

    p = Plain(1, "2e-3", ["a"])
    check_fields(p, tuples=False)
    assert (p.x, p.names) == (2e-3, ["a"]) and type(p.names) is list
    with pytest.raises(ConfigError, match=r"^x=inf is invalid: x must be a finite number or null"):
        check_fields(Plain(1, INF, []))


# ---- strings for numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,key,expected",
    [
        ("lr: 1e-3", "lr", 1e-3),  # PyYAML reads these as strings; taken as YAML 1.2 floats
        ("lr: 2E-4", "lr", 2e-4),
        ("lr: 1.5e-3", "lr", 1.5e-3),
        ("weight_decay: 1e-2", "weight_decay", 1e-2),
        ("max_grad_norm: 1e0", "max_grad_norm", 1.0),
        ("epochs: 2e0", "epochs", 2.0),
        ("warmup_ratio: 5e-2", "warmup_ratio", 0.05),
        ("lr: 0.001", "lr", 0.001),
    ],
)
def test_yaml_exponent_floats_are_numbers(tmp_path, text, key, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: m\n{text}\n")
    cfg = TrainConfig.load(path)
    value = getattr(cfg, key)
    assert value == expected and isinstance(value, float)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # config.yaml holds the number


def test_exponent_floats_inside_method_args(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nmethod_args: {dropout: 5e-2, r: 4}\n")
    assert TrainConfig.load(path).method_config().dropout == 0.05


@pytest.mark.parametrize(
    "text,key",
    [
        ('lr: "0.001"', "lr"),  # quoted: a string the user meant as one
        ("lr: abc", "lr"),
        ("lr: 1e-3x", "lr"),
        ('batch_size: "8"', "batch_size"),
        ("max_steps: 1e3", "max_steps"),  # a float where an integer belongs
        ("max_steps: 10.0", "max_steps"),
        ("seed: 0x", "seed"),
        ('eval_size: ""', "eval_size"),
    ],
)
def test_other_strings_for_numbers_are_refused(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: m\n{text}\n")
    with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid: {key} must be ") as e:
        TrainConfig.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text,key,kind",
    [
        ("batch_size: true", "batch_size", "a boolean"),
        ("eval_every: false", "eval_every", "a boolean"),
        ("lr: .inf", "lr", "infinite"),
        ("lr: -.inf", "lr", "infinite"),
        ("lr: .nan", "lr", "NaN"),
        ("epochs: .inf", "epochs", "infinite"),
        ("seed: null", "seed", "null"),
        ("model: null", "model", "null"),
        ("lr: ~", "lr", "null"),
        ("max_steps: [10]", "max_steps", "a list"),
        ("lr: {value: 1}", "lr", "a mapping"),
        ("overwrite: yes please", "overwrite", "a string"),
        ("method_args: [r, 8]", "method_args", "a list"),
        ("method_args: r=8", "method_args", "a string"),
    ],
)
def test_yaml_values_of_the_wrong_kind(tmp_path, text, key, kind):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: m\n{text}\n")
    with pytest.raises(
        ConfigError, match=rf"^{key}=.* is invalid: {key} must be .*, not {kind}\.$"
    ):
        TrainConfig.load(path)


# ---- values that cannot work -----------------------------------------------------------------

BAD_VALUES = [
    ("batch_size", 0, "a positive integer"),
    ("batch_size", -4, "a positive integer"),
    ("grad_accum", 0, "a positive integer"),
    ("max_length", 0, "a positive integer"),
    ("log_every", 0, "a positive integer"),
    ("keep_checkpoints", 0, "a positive integer"),
    ("max_steps", 0, "null or a positive integer"),
    ("max_steps", -5, "null or a positive integer"),
    ("data_size", 0, "null or a positive integer"),
    ("eval_batch_size", 0, "null or a positive integer"),
    ("eval_every", -1, "a non-negative integer"),
    ("save_every", -1, "a non-negative integer"),
    ("eval_size", -1, "a non-negative integer"),
    ("seed", -1, "a non-negative integer"),
    ("warmup_steps", -1, "null or a non-negative integer"),
    ("epochs", 0, "a positive number"),
    ("epochs", -1.5, "a positive number"),
    ("lr", 0, "a positive number, e.g. 2.0e-4"),
    ("lr", -1e-3, "a positive number, e.g. 2.0e-4"),
    ("warmup_ratio", 1, "in [0, 1)"),
    ("warmup_ratio", -0.1, "in [0, 1)"),
    ("min_lr_ratio", 1.5, "in [0, 1]"),
    ("weight_decay", -0.1, "non-negative"),
    ("max_grad_norm", 0, "null (no clipping) or a positive number"),
    ("model", "", "a non-empty string"),
    ("data", " ", "a non-empty string"),
    ("eval_data", "", "null or a non-empty string"),
    ("text_column", "", "a non-empty string"),
    ("output_dir", "", "a non-empty string"),  # "" would be the current directory
]


@pytest.mark.parametrize("key,value,allowed", BAD_VALUES)
def test_values_that_cannot_work_are_refused(key, value, allowed):
    assert _refused({key: value}, key).endswith(f"must be {allowed}.")


def test_zero_means_off_where_documented():
    cfg = TrainConfig(eval_every=0, save_every=0, eval_size=0, seed=0, warmup_steps=0)
    assert (cfg.eval_every, cfg.save_every, cfg.eval_size, cfg.warmup_steps) == (0, 0, 0, 0)
    assert TrainConfig(warmup_ratio=0, min_lr_ratio=1, weight_decay=0, max_grad_norm=None)


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("optimizer", "sgd", OPTIMIZERS),
        ("optimizer", "AdamW", OPTIMIZERS),
        ("lr_schedule", "step", ("cosine", "linear", "constant")),
        ("lr_schedule", "", ("cosine", "linear", "constant")),
        ("mixed_precision", "fp32", ("no", "bf16", "fp16")),
        ("mixed_precision", "bfloat16", ("no", "bf16", "fp16")),
    ],
)
def test_unknown_choices_list_the_allowed(key, value, allowed):
    msg = _refused({key: value}, key)
    assert msg.endswith("must be one of " + ", ".join(repr(a) for a in allowed) + ".")


def test_max_steps_and_epochs_exclude_each_other():
    with pytest.raises(ConfigError, match=r"^max_steps=5 is invalid: .*epochs=2.*set one of"):
        TrainConfig(max_steps=5, epochs=2)
    assert TrainConfig().epochs == 1.0 and TrainConfig(max_steps=5).epochs is None


# ---- config files ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n", "---\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^config file {path} is empty; write at least"):
        TrainConfig.load(path)
    assert TrainConfig.load(path, ["model=m"]).model == "m"  # the overrides make a config


@pytest.mark.parametrize(
    "text,expected",
    [
        ("- model: m\n", "a training config must be a mapping .*, not a list"),
        ("just a string\n", "a training config must be a mapping .*, not a str"),
        ("model: [m\n", r"not valid YAML: .* \(line 2, column 1\)"),
        ("1: 2\nmodel: m\n", r"unknown config key\(s\) \[1\]"),
        ("model: m\nbacth_size: 4\n", r"unknown config key\(s\) \['bacth_size'\]; known keys"),
    ],
)
def test_config_files_of_the_wrong_shape(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as e:
        TrainConfig.load(path)
    assert "\n" not in str(e.value)


def test_config_file_paths(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path} is a directory; .* --resume {tmp_path}"):
        TrainConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="^config file .*nope.yaml does not exist$"):
        TrainConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="^config file /dev/null is not a regular file; give a"):
        TrainConfig.load("/dev/null")  # it used to say "does not exist"
    (tmp_path / "latin1.yaml").write_bytes(b"model: m\ndata: caf\xe9.csv\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 on line 2\)"):
        TrainConfig.load(tmp_path / "latin1.yaml")


# ---- the CLI: one line, exit 2, no traceback -------------------------------------------------


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, a config that trains it, a file, an empty directory and an empty config."""
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_lm(root / "lm")
    (root / "cfg.yaml").write_text(f"model: {model}\nmethod: lora\nmax_steps: 1\nprogress: false\n")
    (root / "afile").write_text("not a directory\n")
    (root / "empty.yaml").write_text("# nothing yet\n")
    (root / "adir").mkdir()
    return {"root": root, "model": model}


def _cli(root: Path, *argv: str) -> str:
    """Run ``python -m peftlab.cli argv`` in ``root``; exit 2 and the one stderr line."""
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab.cli", *argv],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"peftlab {argv[0]}: error: "), lines[0]
    return lines[0]


CLI_CASES = {
    "config-is-a-directory": (
        ["train", "adir"],
        "adir is a directory; give a YAML config file, or use --resume adir",
    ),
    "config-missing": (["train", "nope.yaml"], "config file nope.yaml does not exist"),
    "config-empty": (["train", "empty.yaml"], "config file empty.yaml is empty"),
    "config-bad-value": (["train", "cfg.yaml", "batch_size=true"], "batch_size=True is invalid"),
    "config-string-for-number": (["train", "cfg.yaml", "lr=fast"], "lr='fast' is invalid"),
    "output-dir-under-a-file": (
        ["train", "cfg.yaml", "output_dir=afile/run"],
        "output_dir='afile/run': Not a directory: its parent afile is a file",
    ),
    "output-dir-is-a-file": (
        ["train", "cfg.yaml", "output_dir=afile"],
        "output_dir='afile' is a file, not a directory",
    ),
    "resume-a-file": (["train", "--resume", "afile"], "--resume afile is a file, not a run dir"),
    "resume-a-plain-directory": (["train", "--resume", "adir"], "no config.yaml there"),
    "resume-nothing": (["train", "--resume", "nope"], "--resume nope: no such run directory"),
    "compare-out-is-a-file": (
        ["compare", "--model", "{model}", "--methods", "lora", "--out", "afile"],
        "afile is a file, not a directory; give a directory",
    ),
    "compare-out-under-a-file": (
        ["compare", "--model", "{model}", "--methods", "lora", "--out", "afile/sub"],
        "afile/sub: Not a directory: its parent",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_path_and_config_errors_are_one_line(paths, case):
    argv, expected = CLI_CASES[case]
    line = _cli(paths["root"], *[a.format(model=paths["model"]) for a in argv])
    assert expected in line, line
    assert not (paths["root"] / "runs").exists()  # nothing was trained


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any directory")
def test_cli_unwritable_output_directory(paths, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = _cli(paths["root"], "train", "cfg.yaml", f"output_dir={locked}/run")
    assert f"{locked}/run: Permission denied: the directory {locked} is not writable" in line


def test_unwritable_output_directory_in_process(paths, tmp_path, monkeypatch, capsys):
    """The same, where the tests run as root: the directory refuses as a read-only one would."""
    locked = tmp_path / "locked"
    locked.mkdir()
    mkdir, access = os.mkdir, os.access

    def refuse(path, *args, **kwargs):
        if Path(path).parent == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and access(p, mode))
    cfg = paths["root"] / "cfg.yaml"
    assert main(["train", str(cfg), f"output_dir={locked}/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"peftlab train: error: {locked}/run: Permission denied: the directory {locked} is not "
        f"writable by this user"
    ]
