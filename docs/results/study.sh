#!/usr/bin/env bash
# The published comparison study: every registered method on MiniLM-L6 with SST-2 and on
# SmolLM2-135M with an Alpaca subset, on this machine's CPU. Run from the repository root;
# the data lives in ../shared/data. Rerunning resumes (finished runs are skipped).
# Small budgets (a few steps): the numbers are measurements of memory, size, speed and overhead
# and a first look at quality, not converged fine-tunes.
set -euo pipefail
DATA=${PEFTLAB_DATA:-../shared/data}
OUT=${OUT:-docs/results}

peftlab compare --model minilm-l6 --data "$DATA/sst2/train.tsv" \
  --train eval_data="$DATA/sst2/dev.tsv" --train text_column=sentence \
  --train data_size=2000 --train eval_size=256 \
  --steps 30 --batch-size 16 --max-length 64 --quick --out "$OUT/compare-minilm-sst2" || true

peftlab compare --model smollm2-135m --data "$DATA/alpaca/alpaca_data.json" \
  --train data_size=500 --train eval_size=16 \
  --steps 8 --batch-size 4 --max-length 96 --quick --out "$OUT/compare-smollm2-alpaca"
