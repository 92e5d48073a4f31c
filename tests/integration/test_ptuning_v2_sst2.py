"""P-Tuning v2 on the bundled MiniLM (all-MiniLM-L6-v2 + new 2-class head) learns SST-2.

A short run: deep prompts on all 6 layers plus the head, a few hundred sentences at most.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

import peftlab

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2"
STEPS, BATCH, MAX_LEN = 80, 16, 32
PROMPT_LR, HEAD_LR = 2e-2, 1e-2


def _read(path: Path) -> list[tuple[str, int]]:
    with path.open() as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r["sentence"], int(r["label"])) for r in rows]


def test_ptuning_v2_minilm_classifies_sst2():
    if not (DATA / "train.tsv").is_file() or not (DATA / "dev.tsv").is_file():
        pytest.skip(f"SST-2 data not found at {DATA} (needs ../shared/data/sst2 beside the repo)")
    from peftlab.models import ModelLoadError, load_model, load_tokenizer

    try:
        model, tok = load_model("minilm-l6"), load_tokenizer("minilm-l6")
    except ModelLoadError as e:
        pytest.skip(f"bundled MiniLM unavailable: {e}")
    train, dev = _read(DATA / "train.tsv"), _read(DATA / "dev.tsv")
    random.Random(0).shuffle(train)
    torch.manual_seed(0)

    peftlab.apply(model, peftlab.PTuningV2Config(num_virtual_tokens=8))
    prompts = [p for n, p in model.named_parameters() if "ptuning_" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "ptuning_" not in n]
    assert prompts and head  # the classifier head trains by default
    opt = torch.optim.AdamW([{"params": prompts, "lr": PROMPT_LR}, {"params": head, "lr": HEAD_LR}])

    def encode(rows):
        batch = tok(
            [s for s, _ in rows],
            padding=True,
            truncation=True,
            max_length=MAX_LEN,
            return_tensors="pt",
        )
        return batch, torch.tensor([y for _, y in rows])

    model.train()
    for step in range(STEPS):
        batch, labels = encode(train[step * BATCH : (step + 1) * BATCH])
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev), 128):
            batch, labels = encode(dev[i : i + 128])
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    accuracy = correct / len(dev)
    majority = max(sum(y for _, y in dev), sum(1 - y for _, y in dev)) / len(dev)
    print(f"SST-2 dev accuracy {accuracy:.3f} after {STEPS} steps (majority {majority:.3f})")
    assert accuracy > majority + 0.15, (accuracy, majority)
