"""The classification head's own learning rate (``head_lr``), and runs recorded before the key
existed (and before ``pooling``) resuming with the behaviour they were started with."""

from __future__ import annotations

import pytest
import torch
import yaml

import peftlab
from peftlab.core.config import ConfigError
from peftlab.train import train
from peftlab.train.config import TrainConfig
from peftlab.train.optim import optimizer_for
from tests.conftest import tiny_bert, tiny_llama
from tests.tiny_classifier import save_tiny_bert, write_classes


def _lrs(model, **keys) -> dict[str, float]:
    """The learning rate each trainable parameter gets from optimizer_for."""
    opt = optimizer_for(model, TrainConfig(**keys))
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}


def test_the_head_trains_at_head_lr_and_the_adapter_at_lr():
    model = tiny_bert()
    peftlab.apply(model, peftlab.LoRAConfig(r=2, target_modules=["query", "value"]))
    lrs = _lrs(model, lr=1e-4, head_lr=1e-2)
    head = {n: v for n, v in lrs.items() if n.startswith("classifier.")}
    body = {n: v for n, v in lrs.items() if not n.startswith("classifier.")}
    assert head and set(head.values()) == {1e-2}
    assert body and set(body.values()) == {1e-4}
    assert set(_lrs(model, lr=1e-4, head_lr=None).values()) == {1e-4}


def test_decay_still_spares_vectors_in_the_head():
    model = tiny_bert()
    peftlab.apply(model, peftlab.LoRAConfig(r=2, target_modules=["query"]))
    opt = optimizer_for(model, TrainConfig(lr=1e-4, head_lr=1e-2, weight_decay=0.1))
    ids = {id(p): n for n, p in model.named_parameters()}
    decay = {ids[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay["classifier.weight"] == 0.1
    assert all(v == 0.0 for n, v in decay.items() if n.endswith("bias"))


def test_a_causal_lm_has_no_head_group():
    model = tiny_llama()
    peftlab.apply(model, peftlab.LoRAConfig(r=2, target_modules=["q_proj"]))
    assert set(_lrs(model, lr=3e-4, head_lr=1e-2).values()) == {3e-4}


@pytest.mark.parametrize("bad", [0, -1e-3, "fast"])
def test_a_bad_head_lr_is_a_one_line_error(bad):
    with pytest.raises(ConfigError, match="head_lr"):
        TrainConfig(head_lr=bad)


def test_a_run_recorded_without_head_lr_and_pooling_resumes_as_it_ran(tmp_path):
    from peftlab.train.resume import resolve

    model = save_tiny_bert(tmp_path / "bert")
    data = write_classes(tmp_path / "data.csv", 2)
    cfg = TrainConfig(
        model=str(model), data=str(data), max_steps=4, batch_size=4, eval_size=8,
        save_every=2, progress=False, output_dir=str(tmp_path / "run"),
        head_lr=None, pooling="cls",  # what a run did before the keys existed
    ).to_dict()  # fmt: skip
    run = tmp_path / "run"
    train(cfg)
    # as a run written before the keys existed: config.yaml without them
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    recorded.pop("head_lr"), recorded.pop("pooling")
    (run / "config.yaml").write_text(yaml.safe_dump(recorded))
    again = resolve(str(run), ["max_steps=6"])
    assert again.head_lr is None and again.pooling == "cls"
    # A head_lr the user sets on resume is not silently replaced: it is a change, refused.
    with pytest.raises(ConfigError, match=r"head_lr=0.01 \(the run has None\) cannot change"):
        resolve(str(run), ["max_steps=6", "head_lr=0.01"])
    assert resolve(str(run), ["max_steps=6", "pooling=cls"]).pooling == "cls"  # the same: fine
    summary = train(str(run), ["max_steps=6"], resume=True)
    assert summary["status"] == "completed" and torch.isfinite(torch.tensor(summary["final_loss"]))


def test_loraplus_puts_b_and_vectors_at_ratio_times_lr_as_peft_does():
    """peft's create_loraplus_optimizer and ours give every parameter the same lr."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    ours = tiny_llama()
    peftlab.apply(ours, peftlab.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    mine = _lrs(ours, lr=1e-4, loraplus_lr_ratio=16, method="lora")
    theirs_model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    opt = create_loraplus_optimizer(theirs_model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
    ids = {id(p): n for n, p in theirs_model.named_parameters()}
    theirs = {
        ids[id(p)].replace("base_model.model.", "").replace(".default", ""): g["lr"]
        for g in opt.param_groups
        for p in g["params"]
    }
    mine = {n.replace(".default", ""): v for n, v in mine.items()}
    assert mine == theirs and {1e-4, 1.6e-3} == set(mine.values())


def test_loraplus_refuses_methods_without_b_factors():
    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio.*null with method 'prefix'"):
        TrainConfig(method="prefix", loraplus_lr_ratio=16)
    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio.*>= 1"):
        TrainConfig(loraplus_lr_ratio=0.5)
