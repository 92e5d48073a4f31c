"""Training-step time of LoHa and LoKr against LoRA, side by side in one process.

    python -m benchmarks.lycoris_step

A 4-layer Llama of SmolLM2-135M's widths (hidden 576, FFN 1536, 9 heads / 3 key-value heads,
random weights, vocabulary 4,096), every linear layer adapted: LoRA r=8, LoHa r=4 (the same
325,632 parameters) and LoKr r=8. Batch 4 × 128 tokens, labels = inputs, AdamW; one warm-up
step each, then 6 rounds timing one step of each in turn; prints every time, the medians and the
per-round ratios to LoRA (the recommender's speed priors in docs/estimator.md come from it).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    base = LlamaForCausalLM(cfg)
    models = {
        "lora r=8": peftlab.apply(copy.deepcopy(base), peftlab.LoRAConfig(r=8)),
        "loha r=4": peftlab.apply(copy.deepcopy(base), peftlab.LoHaConfig(r=4)),
        "lokr r=8": peftlab.apply(copy.deepcopy(base), peftlab.LoKrConfig(r=8)),
    }
    ids = torch.randint(0, 4096, (4, 128))
    opts = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for k, m in models.items()
    }

    def step(k):
        m = models[k]
        m(ids, labels=ids).loss.backward()
        opts[k].step()
        opts[k].zero_grad()

    for k in models:
        step(k)
    times = {k: [] for k in models}
    for _ in range(6):
        for k in models:
            t = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        print(k, [round(x, 3) for x in v], "median", round(statistics.median(v), 3))
    r = [b / a for a, b in zip(times["lora r=8"], times["loha r=4"])]
    print("loha/lora per pair", [round(x, 2) for x in r], "median", round(statistics.median(r), 2))
    print("trainable", {k: peftlab.trainable_parameters(m)[0] for k, m in models.items()})
    r = [b / a for a, b in zip(times["lora r=8"], times["lokr r=8"])]
    print("lokr/lora per pair", [round(x, 2) for x in r], "median", round(statistics.median(r), 2))


if __name__ == "__main__":
    main()
