"""The ``peftlab`` command line: where its code lives, its error contract (one line, exit 2;
Ctrl-C exit 130) and ``peftlab demo`` for every registered method on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import peftlab
from peftlab import models
from peftlab.cli import main
from peftlab.core.config import ConfigError
from peftlab.core.registry import get_method
from peftlab.data import DataError
from peftlab.demo import demo_config
from tests.tiny_lm import save_tiny_lm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A 2-layer random Llama with a character tokenizer (no chat template), as an HF dir."""
    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm"))


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"peftlab {command}: ") and "Traceback" not in err, err
    return lines[0]


# ---- where the code lives ---------------------------------------------------------------------


def test_argparse_lives_only_in_the_cli_package():
    pkg = ROOT / "peftlab"
    outside = [
        str(p.relative_to(pkg))
        for p in pkg.rglob("*.py")
        if "cli" not in p.relative_to(pkg).parts[:1] and "argparse" in p.read_text()
    ]
    assert outside == [], f"argparse code outside peftlab/cli/: {outside}"


def test_every_subcommand_is_listed(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = capsys.readouterr().out
    for cmd in ("methods", "demo", "compare", "train", "recommend", "estimate"):
        assert f"\n    {cmd}" in listed, cmd


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: peftlab" in capsys.readouterr().out


# ---- errors: one line, exit 2 (130 for Ctrl-C) ------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(13, "Permission denied", "/runs/locked/config.yaml"),
        NotADirectoryError(20, "Not a directory", "/runs/a-file/sub"),
        IsADirectoryError(21, "Is a directory", "/runs"),
        FileExistsError(17, "File exists", "/runs/x"),
        FileNotFoundError(2, "No such file or directory", "/nope.yaml"),
        DataError("data file x.jsonl: line 3 is not JSON"),
        ConfigError("lr=-1 must be positive"),
        yaml.YAMLError("while parsing\n  a flow sequence\nexpected ']'"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_user_errors_print_one_line_and_exit_2(exc, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr("peftlab.cli.train.train", fail)
    assert main(["train", "cfg.yaml"]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert line.startswith("peftlab train: error: ")
    if isinstance(exc, OSError):
        assert exc.filename in line and exc.strerror in line


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("peftlab.cli.recommend.recommend", interrupted)
    assert main(["recommend", "--model", "llama-2-7b", "--memory-gb", "24"]) == 130
    assert _one_error_line(capsys.readouterr().err, "recommend") == "peftlab recommend: interrupted"


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("peftlab.cli.train.train", bug)
    with pytest.raises(ZeroDivisionError):
        main(["train", "cfg.yaml"])


def test_output_dir_under_a_file(tiny, tmp_path, capsys):
    """A parent that is a file: train and compare say so in one line."""
    (tmp_path / "afile").write_text("")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": tiny, "method": "lora", "max_steps": 1}))
    target = tmp_path / "afile" / "run"
    assert main(["train", str(cfg), f"output_dir={target}"]) == 2
    assert "not a directory" in _one_error_line(capsys.readouterr().err, "train").lower()
    assert main(["compare", "--model", tiny, "--methods", "lora", "--out", str(target)]) == 2
    line = _one_error_line(capsys.readouterr().err, "compare")
    assert "Not a directory" in line and str(target) in line


def test_bad_yaml_override_and_bad_json_method(capsys):
    assert main(["compare", "--set", "lora.r=[1", "--report-only"]) == 2
    _one_error_line(capsys.readouterr().err, "compare")
    assert main(["estimate", "--model", "llama-2-7b", "--method", "{bad"]) == 2
    line = _one_error_line(capsys.readouterr().err, "estimate")
    assert "--method '{bad' is not valid JSON" in line


def test_python_m_peftlab_cli_exit_status(tmp_path):
    """The module entry point passes main()'s status through, without a traceback."""
    (tmp_path / "afile").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab.cli", "recommend", "--model", "llama-2-7b"]
        + ["--memory-gb", "24", "--results", str(tmp_path / "afile")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not a directory" in _one_error_line(proc.stderr, "recommend")


# ---- peftlab demo -----------------------------------------------------------------------------


def test_demo_config_uses_each_methods_defaults():
    for name in peftlab.methods():
        cls = get_method(name).config_cls
        cfg = demo_config(name)
        assert type(cfg) is cls
        if hasattr(cfg, "target_modules"):
            assert cfg.target_modules == "all-linear"
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        demo_config("nope")


@pytest.mark.parametrize("method", peftlab.methods())
def test_demo_runs_every_method(method, tiny, monkeypatch, capsys):
    resolve = models.resolve

    def local_only(name: str):  # the demo must not need the bundled models here
        assert name not in models.BUNDLED, name
        return resolve(name)

    monkeypatch.setattr(models, "resolve", local_only)
    assert main(["demo", "--method", method, "--model", tiny]) == 0
    out = capsys.readouterr().out
    assert f"loaded {tiny} (LlamaForCausalLM)" in out
    assert f"{method}: " in out and " trainable of " in out
    mergeable = get_method(method).config_cls.mergeable
    assert ("after merge, generate() answers" in out) == mergeable, out
    assert (f"{method}: not mergeable, generating unmerged" in out) == (not mergeable), out
    assert ("unmerged, generate() answers" in out) == (not mergeable), out
