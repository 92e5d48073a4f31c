"""Mixed batches (peftlab/mixed.py): each row through its own adapter, equal to running each
row alone with that adapter active; refusals leave the model as it was."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from tests.conftest import tiny_gpt2, tiny_llama

CONFIGS = {
    "lora": lambda seed: peftlab.LoRAConfig(r=4, target_modules="all-linear"),
    "rslora": lambda seed: peftlab.LoRAConfig(r=4, target_modules="all-linear", use_rslora=True),
    "dora": lambda seed: peftlab.DoRAConfig(r=4, target_modules="all-linear"),
}


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _model(kind, build, names=("a", "b", "c")):
    model = build()
    for i, name in enumerate(names):
        peftlab.apply(model, CONFIGS[kind](i), adapter_name=name)
        _randomize(model, 10 + i)
    return model.eval()


def _alone(model, ids, names):
    rows = []
    for i, n in enumerate(names):
        if n is None:
            with peftlab.disable_adapters(model):
                rows.append(model(input_ids=ids[i : i + 1]).logits)
        else:
            peftlab.set_adapter(model, n)
            rows.append(model(input_ids=ids[i : i + 1]).logits)
    return torch.cat(rows)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_a_mixed_batch_equals_each_row_alone(kind, build):
    model = _model(kind, build)
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(0))
    names = ["a", None, "c", "b"]
    with torch.no_grad():
        want = _alone(model, ids, names)
        peftlab.set_adapter(model, "a")
        with peftlab.adapter_rows(model, names):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the rows differ: the adapters matter (the test could fail)
    assert (want[0] - want[1]).abs().max() > 1e-3


def test_generate_keeps_each_row_on_its_adapter():
    model = _model("lora", tiny_llama)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["b", "a", None]
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with peftlab.adapter_rows(model, names):
            mixed = model.generate(ids, **kw)
        for i, n in enumerate(names):
            if n is None:
                with peftlab.disable_adapters(model):
                    alone = model.generate(ids[i : i + 1], **kw)
            else:
                peftlab.set_adapter(model, n)
                alone = model.generate(ids[i : i + 1], **kw)
            assert torch.equal(mixed[i : i + 1], alone)


def test_the_model_is_as_before_after_the_block():
    model = _model("lora", tiny_llama)
    peftlab.set_adapter(model, "b")
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with peftlab.adapter_rows(model, ["a", None]):
            model(input_ids=ids)
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_refusals_are_one_line_and_change_nothing():
    model = _model("lora", tiny_llama)
    ids = torch.randint(0, 128, (2, 6))

    def refused(m, names, match):
        with pytest.raises(ConfigError, match=match):
            peftlab.adapter_rows(m, names).__enter__()

    refused(model, ["a", "zz"], r"no adapter named 'zz'.*None: the base model")
    refused(model, [], "one adapter name")
    with pytest.raises(ConfigError, match=r"batch of 2 rows.*3 adapter names"):  # noqa: SIM117
        with peftlab.adapter_rows(model, ["a", "b", "c"]), torch.no_grad():
            model(input_ids=ids)
    peftlab.set_adapter(model, "a")
    peftlab.merge(model)
    refused(model, ["a", "b"], r"merged.*peftlab.unmerge")
    peftlab.unmerge(model)
    prefix = tiny_llama()
    peftlab.apply(prefix, peftlab.PrefixTuningConfig(num_virtual_tokens=2))
    refused(prefix, ["default"], "LoRA-family")
    assert all("_rows" not in m.__dict__ for m in model.modules())


def test_qlora_rows_on_a_4bit_base():
    model = tiny_llama()
    peftlab.apply(model, peftlab.QLoRAConfig(r=4), adapter_name="a")
    peftlab.apply(model, peftlab.QLoRAConfig(r=4), adapter_name="b")
    _randomize(model, 3)
    model.eval()
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["b", None, "a"]
    with torch.no_grad():
        want = _alone(model, ids, names)
        with peftlab.adapter_rows(model, names):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
