"""A one-minute look at what peftlab does: load a causal LM, apply a method with its default
options, report the trainable share, merge the adapter when the method is mergeable, and show
that ``generate()`` still answers. ``peftlab demo`` (:mod:`peftlab.cli.demo`) calls
:func:`run_demo`; it works for every registered method.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

import peftlab
from peftlab.core.config import MethodConfig
from peftlab.core.registry import get_method

DEFAULT_PROMPT = "What is the capital of France?"


def demo_config(method: str) -> MethodConfig:
    """``method``'s config with its defaults, targeting every linear layer where it has targets.

    Raises:
        ConfigError: ``method`` is not registered.
    """
    cls = get_method(method).config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    extra = {"target_modules": "all-linear"} if "target_modules" in names else {}
    return peftlab.config_from_dict({"method": method, **extra})


def run_demo(
    model_name: str = "smollm2-135m",
    method: str = "lora",
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 20,
    echo: Callable[[str], None] = print,
) -> dict:
    """Apply ``method`` to ``model_name`` and generate an answer to ``prompt``.

    Args:
        model_name: Bundled model name or a local Hugging Face directory of a causal LM.
        method: A registered method name; its config's defaults are used.
        prompt: The user message (through the chat template when the tokenizer has one).
        max_new_tokens: Greedy generation length.
        echo: Where the progress lines go.

    Returns:
        ``{"trainable", "total", "merged", "answer"}``.
    """
    from peftlab.models import load_model, load_tokenizer

    config = demo_config(method)  # an unknown method fails before the model loads
    t0 = time.perf_counter()
    model = load_model(model_name, kind="causal-lm").eval()
    tok = load_tokenizer(model_name)
    echo(f"loaded {model_name} ({type(model).__name__}) in {time.perf_counter() - t0:.1f} s")
    peftlab.apply(model, config)
    trainable, total = peftlab.trainable_parameters(model)
    echo(
        f"{method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"
    )
    merged = type(config).mergeable
    if merged:
        peftlab.merge(model)
    else:
        echo(f"{method}: not mergeable, generating unmerged")
    ids = _encode(tok, prompt)
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    echo(
        f"{'after merge' if merged else 'unmerged'}, generate() answers {prompt!r} with {answer!r}"
    )
    return {"trainable": trainable, "total": total, "merged": merged, "answer": answer}


def _encode(tok, prompt: str) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``prompt``, as a chat turn if the tokenizer has
    a chat template (an instruct model answers a bare question worse)."""
    if tok.chat_template:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        enc = tok(prompt, return_tensors="pt")
    # token_type_ids and the like are not generate() arguments of a causal LM.
    return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
