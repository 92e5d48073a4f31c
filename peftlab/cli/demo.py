"""``peftlab demo``: apply a method to the bundled model, report its trainable share, merge,
and show that generation still works. A one-minute look at what peftlab does."""

from __future__ import annotations

import argparse
import time

import torch


def run_demo(
    model_name: str = "smollm2-135m",
    method: str = "lora",
    prompt: str = "What is the capital of France?",
) -> dict:
    import peftlab
    from peftlab.models import load_model, load_tokenizer

    t0 = time.perf_counter()
    model = load_model(model_name, kind="causal-lm").eval()
    tok = load_tokenizer(model_name)
    print(f"loaded {model_name} ({type(model).__name__}) in {time.perf_counter() - t0:.1f} s")
    config = peftlab.config_from_dict({"method": method, "target_modules": "all-linear"})
    peftlab.apply(model, config)
    trainable, total = peftlab.trainable_parameters(model)
    print(
        f"{method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"
    )
    peftlab.merge(model)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"after merge, generate() answers {prompt!r} with {answer!r}")
    return {"trainable": trainable, "total": total, "answer": answer}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="apply a method to the bundled model and generate")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="lora")
    p.set_defaults(func=lambda a: run_demo(a.model, a.method) and 0)
