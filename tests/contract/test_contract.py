"""The contract every registered method keeps, checked on tiny Llama, GPT-2 and BERT models,
and in a second sweep on five more families (OPT, Falcon, GPT-NeoX, Phi-3, ModernBERT) whose
layouts broke a method once (see tests/conftest.py ``MORE``)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import peftlab
from peftlab.core.model import adapter_layers
from peftlab.core.registry import get_method
from peftlab.core.state import saved_modules, state_of
from tests.conftest import MORE, TINY

ARCHS = {**TINY, **MORE}

# Small settings per method for tiny models (defaults otherwise).
TINY_ARGS: dict[str, dict] = {
    "lora": {"r": 4, "target_modules": "all-linear"},
    "dora": {"r": 4, "target_modules": "all-linear"},
    "qlora": {"r": 4, "target_modules": "all-linear"},
    "adapter": {"bottleneck": 8, "placement": "houlsby"},
    "prefix": {"num_virtual_tokens": 4, "reparam_hidden": 16},
    "ptuning-v2": {"num_virtual_tokens": 4},
    "prompt": {"num_virtual_tokens": 4},
    "vera": {"r": 4},
}
# (method, arch) pairs a method does not support, with the reason.
UNSUPPORTED: dict[tuple[str, str], str] = {}

CASES = [(m, a) for m in peftlab.methods() for a in sorted(TINY) if (m, a) not in UNSUPPORTED]


def _config(method: str):
    return peftlab.config_from_dict({"method": method, **TINY_ARGS.get(method, {})})


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def _loss(model, batch):
    if type(model).__name__.endswith("ForSequenceClassification"):
        return model(input_ids=batch, labels=torch.tensor([0, 1])).loss
    return model(input_ids=batch, labels=batch).loss


def _perturb(model, seed=3):
    """Give every adapter parameter a non-trivial value (zero-init parts included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("method,arch", CASES)
def test_contract(method, arch, batch, tmp_path):
    _check_contract(method, arch, _config(method), batch, tmp_path)


# (method, arch) pairs of the second sweep a method refuses, with the reason.
REFUSED_MORE: dict[tuple[str, str], str] = {
    ("prefix", "modernbert"): "ModernBERT's attention takes no key/value cache",
    ("ptuning-v2", "modernbert"): "ModernBERT's attention takes no key/value cache",
}
CASES_MORE = [(m, a) for m in peftlab.methods() for a in sorted(MORE)]


@pytest.mark.parametrize("method,arch", CASES_MORE)
def test_contract_on_more_families(method, arch, batch, tmp_path):
    if (method, arch) in REFUSED_MORE:
        model = MORE[arch]()
        before = _fingerprint(model)
        with pytest.raises(peftlab.ConfigError):
            peftlab.apply(model, _config(method))
        _assert_same(before, _fingerprint(model))
        return
    _check_contract(method, arch, _config(method), batch, tmp_path)


EMBEDDINGS = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_contract_with_the_embedding_table_targeted(method, arch, batch, tmp_path):
    """LoRA on the input embeddings (tied to the head on GPT-2) beside all-linear's layers."""
    if method not in peftlab.methods():
        pytest.skip(f"{method} is not registered in this install")
    linear = {"llama": "(model.layers.*_proj)", "gpt2": "(transformer.h.*c_.*)",
              "bert": "(bert.encoder.*(query|value|dense))"}  # fmt: skip
    targets = f"(.*\\.{EMBEDDINGS[arch]})|{linear[arch]}"
    config = _config(method).replace(target_modules=targets)
    probe = peftlab.apply(TINY[arch](), config)
    assert type(probe.get_input_embeddings()).__name__ == "LoRAEmbedding"
    _check_contract(method, arch, config, batch, tmp_path)


def _check_contract(method, arch, config, batch, tmp_path):
    base = ARCHS[arch]()
    ref = _logits(base, batch)
    model = copy.deepcopy(base)
    peftlab.apply(model, config)
    spec = get_method(method)

    if config.preserves_output_at_init:
        torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=1e-6)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    # A classification model's new head trains with every method (modules_to_save=None).
    heads = saved_modules(model, "default")
    classifier = type(base).__name__.endswith("ForSequenceClassification")
    assert heads == (("classifier",) if classifier else ())
    if spec.param_prefix:
        own = [n for n in trainable if not n.startswith(tuple(h + "." for h in heads))]
        assert all(spec.param_prefix in n for n in own), trainable
        t, total = peftlab.trainable_parameters(model)
        assert 0 < t < total

    # A few optimizer steps lower the loss on a fixed batch.
    # The baseline is an eval-mode loss like the final one: train-mode dropout noise can
    # exceed what 5 steps change (frozen random classifier head on tiny BERT).
    with torch.no_grad():
        first = _loss(model, batch).item()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert _loss(model, batch).item() < first
    _perturb(model)
    out = _logits(model, batch)

    # save → load reproduces the logits exactly.
    peftlab.save_adapter(model, tmp_path / "a")
    loaded = peftlab.load_adapter(ARCHS[arch](), tmp_path / "a")
    torch.testing.assert_close(_logits(loaded, batch), out, rtol=0, atol=0)

    if config.mergeable:
        peftlab.merge(model)
        torch.testing.assert_close(_logits(model, batch), out, rtol=0, atol=1e-5)
        peftlab.unmerge(model)
        torch.testing.assert_close(_logits(model, batch), out, rtol=0, atol=1e-5)
        plain = peftlab.merge_and_unload(model)
        torch.testing.assert_close(_logits(plain, batch), out, rtol=0, atol=1e-5)
    else:
        plain = peftlab.unload(model)
        torch.testing.assert_close(_logits(plain, batch), ref, rtol=0, atol=1e-6)
    assert not list(adapter_layers(plain))
    assert not any(type(m).__module__.startswith("peftlab") for m in plain.modules())
    assert state_of(plain) is None


# Per architecture, a module no method wraps, trained in full through modules_to_save.
SAVED = {"llama": "model.norm", "gpt2": "transformer.ln_f", "bert": "bert.embeddings.LayerNorm"}


@pytest.mark.parametrize("method,arch", CASES)
def test_modules_to_save(method, arch, batch, tmp_path):
    """modules_to_save trains the module, saves it with the adapter, load_adapter restores it
    and unload gives the original back."""
    name = SAVED[arch]
    model = TINY[arch]()
    original = {k: v.clone() for k, v in model.get_submodule(name).state_dict().items()}
    peftlab.apply(model, _config(method).replace(modules_to_save=[name]))
    module = model.get_submodule(name)
    assert saved_modules(model, "default") == (name,)
    assert all(p.requires_grad for p in module.parameters())
    if arch == "bert" and get_method(method).param_prefix:
        assert not model.classifier.weight.requires_grad  # an explicit list replaces the head

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _loss(model, batch).backward()
    opt.step()
    model.eval()
    assert not torch.equal(module.weight, original["weight"]), "the module did not train"
    out = _logits(model, batch)

    peftlab.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(keys[f"base_model.model.{name}.weight"], module.weight.detach())
    loaded = peftlab.load_adapter(TINY[arch](), tmp_path)
    torch.testing.assert_close(loaded.get_submodule(name).weight, module.weight, rtol=0, atol=0)
    torch.testing.assert_close(_logits(loaded, batch), out, rtol=0, atol=0)

    plain = peftlab.unload(model)
    for k, v in plain.get_submodule(name).state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=0)


def _fingerprint(model) -> dict:
    """Everything a refused apply or load must leave as it was: module types, modes,
    attributes and hooks, tensors (flags, dtypes, values) and peftlab's state."""
    modules = {
        n: (
            type(m),
            m.training,
            sorted(m.__dict__),
            {k: len(v) for k, v in m.__dict__.items() if "hooks" in k and isinstance(v, dict)},
        )
        for n, m in model.named_modules()
    }
    tensors = {
        n: (t.dtype, t.requires_grad, t.detach().clone())
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    }
    return {"modules": modules, "tensors": tensors, "state": state_of(model)}


def _assert_same(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["state"] is before["state"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for n, (dtype, flag, value) in before["tensors"].items():
        assert after["tensors"][n][:2] == (dtype, flag), n
        assert torch.equal(after["tensors"][n][2], value), n


def _registrations(monkeypatch, fail_at: int | None) -> list[int]:
    """Count submodule and parameter registrations (and raise at the ``fail_at``-th): the
    steps by which every method builds its layers and modules."""
    from torch import nn

    calls = [0]
    set_attr, add_module = nn.Module.__setattr__, nn.Module.add_module

    def count() -> None:
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("injected failure midway through the model")

    def patched_setattr(self, key, value):
        if isinstance(value, nn.Module | nn.Parameter):
            count()
        set_attr(self, key, value)

    def patched_add_module(self, key, module):
        count()
        add_module(self, key, module)

    monkeypatch.setattr(nn.Module, "__setattr__", patched_setattr)
    monkeypatch.setattr(nn.Module, "add_module", patched_add_module)
    return calls


def _has_field(method: str, field: str) -> bool:
    return field in {f.name for f in dataclasses.fields(get_method(method).config_cls)}


REFUSALS = ["modules_to_save", "target", "midway", "end", "second-midway", "load"]


@pytest.mark.parametrize("refusal", REFUSALS)
@pytest.mark.parametrize("method", peftlab.methods())
def test_refused_apply_or_load_leaves_the_model_as_it_was(method, refusal, monkeypatch, tmp_path):
    arch = "bert" if refusal == "load" else "llama"
    config = _config(method)
    model = TINY[arch]()
    if refusal == "target" and not _has_field(method, "target_modules"):
        pytest.skip(f"{method} takes no target_modules")
    name = "second" if refusal.startswith("second") else "default"
    dry_run = TINY[arch]()
    if refusal.startswith("second"):
        peftlab.apply(model, config)
        peftlab.apply(dry_run, config)
    else:  # mixed flags, which every method changes
        model.get_input_embeddings().weight.requires_grad_(False)
    if refusal.endswith("midway"):
        calls = _registrations(monkeypatch, None)
        peftlab.apply(dry_run, config, name)
        monkeypatch.undo()
        if not calls[0]:
            pytest.skip(f"{method} registers no module or parameter (see 'end')")
        _registrations(monkeypatch, calls[0] // 2 + 1)
    elif refusal == "end":
        import peftlab.core.model as core_model

        spec = core_model.spec_for_config(config)

        def apply_then_fail(*args):
            spec.apply(*args)
            raise RuntimeError("injected failure after the method applied itself")

        replaced = dataclasses.replace(spec, apply=apply_then_fail)
        monkeypatch.setattr(core_model, "spec_for_config", lambda c: replaced)
    elif refusal == "load":
        source = peftlab.apply(TINY[arch](), config)
        _perturb(source)
        peftlab.save_adapter(source, tmp_path)
        from safetensors.torch import load_file, save_file

        tensors = load_file(tmp_path / "adapter_model.safetensors")
        key = sorted(tensors)[-1]
        tensors[key] = torch.full_like(tensors[key], float("inf"))
        save_file(tensors, tmp_path / "adapter_model.safetensors")

    before = _fingerprint(model)
    if refusal == "modules_to_save":
        with pytest.raises(peftlab.ConfigError, match="'nowhere' matches no module"):
            peftlab.apply(model, config.replace(modules_to_save=["nowhere"]), name)
    elif refusal == "target":
        with pytest.raises(peftlab.ConfigError, match="'nowhere' matches no module"):
            peftlab.apply(model, config.replace(target_modules=["nowhere"]), name)
    elif refusal == "load":
        with pytest.raises(peftlab.AdapterFileError, match=f"{key}.*non-finite"):
            peftlab.load_adapter(model, tmp_path)
    else:
        with pytest.raises(RuntimeError, match="injected"):
            peftlab.apply(model, config, name)
    monkeypatch.undo()
    _assert_same(before, _fingerprint(model))
    peftlab.apply(model, config, name)  # the model is still usable
    assert state_of(model).active == (name,)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("method", peftlab.methods())
def test_added_modules_follow_the_model_mode(method, training, batch, tmp_path):
    """Modules added by apply/load_adapter take the model's mode: in eval mode, dropout in the
    adapter is off and two identical calls give identical outputs."""
    args = {"dropout": 0.5} if _has_field(method, "dropout") else {}
    config = _config(method).replace(**args)
    model = peftlab.apply(TINY["llama"]().train(training), config)
    assert all(m.training == training for m in model.modules())
    _perturb(model)
    peftlab.save_adapter(model, tmp_path)
    loaded = peftlab.load_adapter(TINY["llama"]().train(training), tmp_path)
    assert all(m.training == training for m in loaded.modules())
    if not training:
        for m in (model, loaded):
            torch.testing.assert_close(_logits(m, batch), _logits(m, batch), rtol=0, atol=0)
