"""Rules written once: the model kind, the ``key=value`` override parser and the atomic write,
and every caller going through them (issue #14)."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
from torch import nn

from peftlab.bench import worker
from peftlab.cli import compare as cli_compare
from peftlab.core import fileio
from peftlab.core.config import ConfigError
from peftlab.core.kind import KINDS, check_kind, kind_from_config, kind_of_model
from peftlab.core.overrides import apply_overrides, parse_item, parse_overrides
from peftlab.models import BUNDLED, load_model, model_kind
from peftlab.train import config as train_config
from peftlab.train import rundir
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama

# --- the model kind ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("archs", "model_type", "kind"),
    [
        (["LlamaForCausalLM"], "llama", "causal-lm"),
        (["BertForSequenceClassification"], "bert", "classification"),
        (["MistralForSequenceClassification"], "mistral", "classification"),
        (["BertModel"], "bert", "classification"),  # an encoder gets a new head
        (["BertLMHeadModel"], "bert", "classification"),
        (["RobertaForCausalLM"], "roberta", "causal-lm"),  # the name says it: a decoder
        (["GPT2LMHeadModel"], "gpt2", "causal-lm"),
        (None, "distilbert", "classification"),
        ([], "qwen2", "causal-lm"),
        (None, None, "causal-lm"),
    ],
)
def test_kind_rule(archs, model_type, kind):
    assert kind_from_config(archs, model_type) == kind


def test_kind_of_a_loaded_model_and_of_its_saved_directory_agree(tmp_path):
    for make, kind in ((tiny_llama, "causal-lm"), (tiny_gpt2, "causal-lm")):
        model = make()
        assert kind_of_model(model) == model_kind(model) == kind
        model.save_pretrained(tmp_path / kind)
        assert model_kind(tmp_path / kind) == model_kind(str(tmp_path / kind)) == kind
    bert = tiny_bert()
    assert model_kind(bert) == "classification"
    bert.save_pretrained(tmp_path / "bert")
    assert model_kind(tmp_path / "bert") == "classification"
    # The loaded class decides, not the saved config: the encoder alone is still an encoder,
    # and a module without a config (a toy model) counts as a causal LM, as before.
    assert model_kind(bert.bert) == "classification"
    assert model_kind(nn.Linear(2, 2)) == "causal-lm"


def test_bundled_kinds_and_the_kind_check():
    assert {b.kind for b in BUNDLED.values()} == set(KINDS) == {"causal-lm", "classification"}
    assert model_kind("smollm2-135m") == "causal-lm" and model_kind("minilm-l6") == "classification"
    assert check_kind("classification") == "classification"
    with pytest.raises(ConfigError, match=r"kind='seq2seq' is invalid: kind must be 'causal-lm'"):
        check_kind("seq2seq")
    with pytest.raises(ConfigError, match="kind='lm' is invalid"):
        load_model("smollm2-135m", kind="lm")  # refused before anything is loaded


def test_the_trainer_has_no_kind_rule_of_its_own():
    from peftlab.train import loop

    assert not hasattr(loop, "_kind")
    for path in ("train/loop.py", "bench/runner.py", "bench/worker.py", "models.py"):
        text = (Path(loop.__file__).parents[1] / path).read_text()
        # A class-name or model-type test written as a string literal is a second rule.
        assert not re.search(r"SequenceClassification[\"']|[\"']distilbert[\"']", text), path


# --- key=value overrides -------------------------------------------------------------------


def test_overrides_are_yaml_typed_and_dotted():
    got = parse_overrides(
        [
            "lr=1e-3",
            "steps=8",
            "flag=true",
            "eval_data=null",
            "name=",
            "method_args.r=8",
            "method_args.target_modules=[q_proj, v_proj]",
            "a.b.c=x=y",  # split at the first "="
        ]
    )
    assert got == {
        "lr": 1e-3,
        "steps": 8,
        "flag": True,
        "eval_data": None,
        "name": "",
        "method_args": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        "a": {"b": {"c": "x=y"}},
    }
    assert isinstance(got["lr"], float) and isinstance(got["steps"], int)


def test_overrides_leave_the_input_unchanged():
    d = {"lr": 1.0, "method_args": {"r": 4, "alpha": 8}}
    out = apply_overrides(d, ["method_args.r=16", "lr=2"])
    assert out == {"lr": 2, "method_args": {"r": 16, "alpha": 8}}
    assert d == {"lr": 1.0, "method_args": {"r": 4, "alpha": 8}}


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("lr", r"^override 'lr' must look like key=value, e\.g\. lr=1e-3"),
        ("=3", r"^override '=3' must look like key=value"),
        ("a..b=3", r"^override 'a\.\.b=3' must look like key=value"),
        ("x=[1, 2", r"^override 'x=\[1, 2': the value '\[1, 2' is not valid YAML"),
        ("lr.x=1", r"^override 'lr\.x=1': lr is 0\.1, not a mapping"),
    ],
)
def test_a_malformed_override_is_one_line_naming_it(item, match):
    with pytest.raises(ConfigError, match=match) as e:
        apply_overrides({"lr": 0.1}, [item])
    assert "\n" not in str(e.value)


def test_every_override_caller_uses_the_one_parser():
    items = ["lora.r=16", "lora.target_modules=[q_proj]", "dora.alpha=2e1"]
    want = {"lora": {"r": 16, "target_modules": ["q_proj"]}, "dora": {"alpha": 20.0}}
    assert cli_compare._method_args(items) == parse_overrides(items) == want
    assert train_config.apply_overrides({}, items) == want
    assert cli_compare._train_overrides(["data_size=2000", "text_column=sentence"]) == {
        "data_size": 2000,
        "text_column": "sentence",
    }
    # The callers name their own flag and form in the same one-line error.
    with pytest.raises(ConfigError, match=r"^--set 'r=16' must look like METHOD\.OPTION=VALUE"):
        cli_compare._method_args(["r=16"])
    with pytest.raises(ConfigError, match=r"^--train 'data_size' must look like KEY=VALUE"):
        cli_compare._train_overrides(["data_size"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        cli_compare._train_overrides(["eval_data={"])
    assert parse_item("a.b=1", min_depth=2) == (["a", "b"], 1)


# --- atomic writes -------------------------------------------------------------------------


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".tmp", ".old")))


def test_atomic_write_text_bytes_and_json(tmp_path):
    path = tmp_path / "sub" / "a.json"
    fileio.atomic_write_json(path, {"x": 1, "p": Path("/q")})
    assert json.loads(path.read_text()) == {"x": 1, "p": "/q"}
    fileio.atomic_write(path, "new")
    assert path.read_text() == "new"
    fileio.atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert _leftovers(path.parent) == []
    # Created with the umask's mode like any file, not mkstemp's 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["replace", "write", "fsync"])
def test_a_failing_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, where):
    path = tmp_path / "result.json"
    path.write_text("old")
    if where == "replace":
        monkeypatch.setattr(fileio.os, "replace", _enospc)
    elif where == "fsync":
        monkeypatch.setattr(fileio.os, "fsync", _enospc)
    else:
        real = Path.write_bytes

        def half_then_full(self, data):  # the disk fills halfway through the data
            real(self, data[: len(data) // 2])
            _enospc()

        monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError, match=r"could not write .*result\.json: No space left") as e:
        fileio.atomic_write(path, "new contents")
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_failing_writer_callback_or_json_value_leaves_nothing(tmp_path):
    path = tmp_path / "w.bin"

    def boom(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write_with(path, boom)
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular reference"):
        fileio.atomic_write_json(path, loop)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(FileExistsError, match=r"could not write .*f/x"):  # the errno's subclass
        fileio.atomic_write(tmp_path / "f" / "x", "y")  # its directory is a file


def test_replace_dir_swaps_and_restores(tmp_path, monkeypatch):
    dest = tmp_path / "adapter"

    def build(text):
        tmp = tmp_path / "adapter.tmp"
        tmp.mkdir()
        (tmp / "w").write_text(text)
        return tmp

    assert fileio.replace_dir(build("one"), dest)
    assert fileio.replace_dir(build("two"), dest) and (dest / "w").read_text() == "two"
    assert _leftovers(tmp_path) == []
    # The first directory to arrive wins when replacing is not wanted (a shared cache).
    assert not fileio.replace_dir(build("three"), dest, replace=False)
    assert (dest / "w").read_text() == "two" and _leftovers(tmp_path) == []

    real = os.replace

    def fail_on_tmp(src, dst):
        if Path(src).name.endswith(".tmp"):
            _enospc()
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", fail_on_tmp)
    with pytest.raises(OSError, match=r"could not write .*adapter: No space left"):
        fileio.replace_dir(build("four"), dest)
    assert (dest / "w").read_text() == "two" and _leftovers(tmp_path) == []


def test_every_atomic_writer_is_the_one_helper():
    assert rundir._atomic_write is fileio.atomic_write  # rundir adds the free-space message
    assert worker.write_json_atomic is fileio.atomic_write_json
    from peftlab.core import io

    assert io.atomic_write_with is fileio.atomic_write_with


def test_an_override_value_starting_with_a_hash_is_text_not_a_yaml_comment():
    # MRPC's columns are "#1 String" and "#2 String": YAML would read the value as a comment
    # (null) and the mapping would silently point at no column.
    from peftlab.core.overrides import parse_overrides

    got = parse_overrides(["columns.text=#1 String", "columns.label=Quality", "x=null"])
    assert got == {"columns": {"text": "#1 String", "label": "Quality"}, "x": None}


def test_a_saved_two_class_classifier_loads_for_three_classes_with_a_new_head(tmp_path):
    # A user's fine-tuned 2-class checkpoint used on 3-class data: transformers' size-mismatch
    # traceback before; now a new head, said once, and the body's weights kept.
    import warnings

    import torch

    from peftlab.models import load_model
    from tests.conftest import tiny_bert

    saved = tiny_bert()
    saved.save_pretrained(tmp_path / "clf")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = load_model(str(tmp_path / "clf"), kind="classification", num_labels=3)
    assert model.classifier.out_features == 3
    assert any("2-class classification head" in str(w.message) for w in seen)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight,
                       saved.bert.embeddings.word_embeddings.weight)  # fmt: skip
    same = load_model(str(tmp_path / "clf"), kind="classification", num_labels=2)
    assert torch.equal(same.classifier.weight, saved.classifier.weight)
