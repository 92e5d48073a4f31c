#!/usr/bin/env bash
# The published comparison study: every registered method on MiniLM-L6 with SST-2 and on
# SmolLM2-135M with an Alpaca subset, on this machine's CPU. Run from the repository root;
# the data lives in ../shared/data. Rerunning resumes (finished runs are skipped).
# Tiny budgets (a few steps, because the shared 2-core machine was heavily loaded): the numbers
# measure parameters, adapter size, memory, speed and inference overhead, and give only a
# first look at quality — not converged fine-tunes. The two comparisons run side by side, one
# torch thread per run (faster than two when other work shares the cores).
set -uo pipefail
DATA=${PEFTLAB_DATA:-../shared/data}
OUT=${OUT:-docs/results}

peftlab compare --model minilm-l6 --data "$DATA/sst2/train.tsv" \
  --train eval_data="$DATA/sst2/dev.tsv" --train text_column=sentence \
  --train data_size=1000 --train eval_size=128 \
  --steps 12 --batch-size 16 --max-length 64 --quick --threads 1 --out "$OUT/compare-minilm-sst2" &

peftlab compare --model smollm2-135m --data "$DATA/alpaca/alpaca_data.json" \
  --train data_size=200 --train eval_size=8 \
  --steps 4 --batch-size 4 --max-length 80 --quick --threads 1 --out "$OUT/compare-smollm2-alpaca" &

wait
