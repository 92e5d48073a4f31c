"""Every bad value is a one-line error: frozen, type-checked method configs, and adapter files
whose config values or tensors are of the wrong type (#14, #17)."""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from peftlab import AdapterFileError, ConfigError
from peftlab.core.state import state_of
from tests.conftest import tiny_llama


def _saved(path):
    m = peftlab.apply(tiny_llama(), peftlab.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peftlab.save_adapter(m, path)
    return path


def test_configs_are_frozen_and_replace_returns_a_new_one():
    import dataclasses

    config = peftlab.LoRAConfig(target_modules=["q_proj", "v_proj"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 4
    assert config.target_modules == ("q_proj", "v_proj")  # a list is kept as a tuple
    assert config.to_dict()["target_modules"] == ["q_proj", "v_proj"]
    other = config.replace(r=4)
    assert (other.r, config.r) == (4, 8)
    with pytest.raises(ConfigError, match="^r=0 is invalid"):
        config.replace(r=0)
    assert hash(config) == hash(peftlab.LoRAConfig(target_modules=("q_proj", "v_proj")))


# Values of the wrong type for each annotation used by a method config.
WRONG = {
    "int": [True, "8", 8.5, [8], float("inf"), None],
    "int | None": [True, "8", 8.5, [8]],
    "float": [True, "0.1", [0.1], {"a": 1}, float("inf"), float("nan"), None],
    "float | None": [True, "16", [16], float("-inf"), float("nan")],
    "bool": [1, 0, "true", "false", [True], None],
    "str": [1, True, ["x"], None],
    "str | list[str]": [1, True, None, [1, 2], ["a", None]],
    "str | list[str] | None": [1, True, [1], {"q": 1}],
    "list[str] | None": ["classifier", 1, True, [1], [["a"]]],
    "str | None": [1, True, ["x"], {"a": 1}],
    "list[int] | None": ["1 2", 1, True, [1.5], [True], [None]],
    "int | list[int] | None": ["1 2", True, 1.5, [1.5], [True], [None]],
    "dict[str, int] | None": ["q_proj", 8, True, ["q_proj"], {"q_proj": 8.5}, {"q_proj": True}],
    "dict[str, float] | None": ["q_proj", 8, ["q_proj"], {"q_proj": "x"}, {"q_proj": True},
                                {"q_proj": float("nan")}],
}  # fmt: skip


def _typed_fields():
    import dataclasses

    from peftlab.core.registry import get_method

    for method in peftlab.methods():
        for f in dataclasses.fields(get_method(method).config_cls):
            yield method, f.name, f.type


@pytest.mark.parametrize("method,field,annotation", list(_typed_fields()))
def test_every_field_refuses_wrong_types(method, field, annotation):
    """One generic check (MethodConfig.__post_init__, driven by the annotations) for every
    field of every method: one line naming the key, the value and what is allowed."""
    assert annotation in WRONG, f"add wrong values for {annotation!r} to WRONG"
    for value in WRONG[annotation]:
        with pytest.raises(ConfigError) as e:
            peftlab.config_from_dict({"method": method, field: value})
        msg = str(e.value)
        assert msg.startswith(f"{field}={value!r} is invalid: {field} must be "), msg
        assert "\n" not in msg


def _edit_config(path, edit):
    doc = json.loads((path / "adapter_config.json").read_text())
    edit(doc)
    (path / "adapter_config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "where,key,value",
    [
        ("peftlab", "r", "8"),
        ("peftlab", "r", True),
        ("peftlab", "r", None),
        ("peftlab", "r", [8]),
        ("peftlab", "alpha", float("inf")),
        ("peftlab", "dropout", float("nan")),
        ("peftlab", "use_rslora", "yes"),
        ("peftlab", "target_modules", 7),
        ("peftlab", "modules_to_save", "classifier"),
        ("peft", "r", "8"),
        ("peft", "r", 4.0),
        ("peft", "lora_alpha", None),
        ("peft", "lora_dropout", [0.1]),
        ("peft", "use_rslora", "yes"),
        ("peft", "use_dora", 1),
        ("peft", "target_modules", [1, 2]),
    ],
)
def test_adapter_config_with_wrong_types_is_refused(tmp_path, where, key, value):
    path = _saved(tmp_path)

    def edit(doc):
        if where == "peftlab":
            doc["peftlab"]["config"][key] = value
        else:
            del doc["peftlab"]
            doc[key] = value

    _edit_config(path, edit)
    model = tiny_llama()
    with pytest.raises(AdapterFileError) as e:
        peftlab.load_adapter(model, path)
    msg = str(e.value)
    assert msg.startswith(f"{path / 'adapter_config.json'}: {key}="), msg
    assert "is invalid" in msg and "must be" in msg and "\n" not in msg
    assert state_of(model) is None


def test_adapter_config_of_the_wrong_shape_is_refused(tmp_path):
    path = _saved(tmp_path)
    for doc, match in [
        ([1, 2], "must be a JSON object"),
        ({"peftlab": {"config": [1]}}, "peftlab.config=.*must be an object"),
        ({"peftlab": {"config": {"method": ["lora"]}}}, "method=.*must be a method name"),
        ({"peft_type": "LORA", "r": 4}, "lora_alpha, target_modules missing"),
    ]:
        (path / "adapter_config.json").write_text(json.dumps(doc))
        with pytest.raises(AdapterFileError, match=match):
            peftlab.load_adapter(tiny_llama(), path)


@pytest.mark.parametrize("bad", ["int", "bool", "inf", "nan"])
def test_adapter_tensors_must_be_finite_floats(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    key = sorted(tensors)[1]
    t = tensors[key]
    tensors[key] = {
        "int": t.to(torch.int64),
        "bool": t > 0,
        "inf": t.index_fill(0, torch.tensor([0]), float("inf")),
        "nan": t.index_fill(0, torch.tensor([0]), float("nan")),
    }[bad]
    save_file(tensors, path / "adapter_model.safetensors")
    model = tiny_llama()
    match = "must be floating point" if bad in ("int", "bool") else "must be finite"
    with pytest.raises(
        AdapterFileError, match=rf"adapter_model\.safetensors: tensor {key} .*{match}"
    ):
        peftlab.load_adapter(model, path)
    assert state_of(model) is None
    assert not any("lora_" in n for n, _ in model.named_parameters())
