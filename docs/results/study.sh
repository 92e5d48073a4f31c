#!/usr/bin/env bash
# The published comparison study (#15 rules): every registered method, each at its own tuned
# learning rate (--tune lr: successive halving on the validation split), 3 seeds, scored once
# on a test split it never saw, with the majority-class and untrained-model baselines.
# Run from the repository root; the data lives in ../shared/data (see each SOURCE.md).
# Rerunning resumes (finished runs are skipped). STUDY=sst2,mrpc,gen picks the comparisons.
#
#   sst2  MiniLM-L6, SST-2: 2,000 training sentences, 200 validation held out of them,
#         test = the GLUE dev set (872 sentences).
#   mrpc  MiniLM-L6, MRPC sentence pairs through column mapping: 2,000 training pairs, 200
#         validation, test = the GLUE dev set (408 pairs).
#   gen   SmolLM2-135M, the built-in arithmetic task scored by exact match of the answer.
#
# The parts run side by side, one torch thread each (2 cores; THREADS and GEN_THREADS change it).
# JOBS runs that many methods of one part side by side (compare --jobs; timings then unreliable).
# GEN_STEPS: the generation part's steps per run (default STEPS; SmolLM2 costs ~10x MiniLM).
set -uo pipefail
DATA=${PEFTLAB_DATA:-../shared/data}
OUT=${OUT:-docs/results}
STUDY=${STUDY:-sst2,mrpc,gen}
STEPS=${STEPS:-64}

run_sst2() {
  peftlab compare --model minilm-l6 --data "$DATA/sst2/train.tsv" --tune lr \
    --train eval_data="$DATA/sst2/dev.tsv" --train text_column=sentence \
    --train data_size=2000 --train eval_size=200 \
    --steps "$STEPS" --batch-size 16 --max-length 48 --threads "${THREADS:-1}" \
    --jobs "${JOBS:-1}" --out "$OUT/study-minilm-sst2"
}

run_mrpc() {
  peftlab compare --model minilm-l6 --data "$DATA/mrpc/train.tsv" --tune lr \
    --train eval_data="$DATA/mrpc/dev.tsv" \
    --train "columns.text=#1 String" --train "columns.text_pair=#2 String" \
    --train columns.label=Quality \
    --train data_size=2000 --train eval_size=200 \
    --steps "$STEPS" --batch-size 16 --max-length 128 --threads 1 --jobs "${JOBS:-1}" --out "$OUT/study-minilm-mrpc"
}

run_gen() {
  peftlab compare --model smollm2-135m --data builtin:arith --tune lr \
    --train data_size=1000 --train eval_size=64 --train test_size=128 --train eval_batch_size=32 \
    --steps "${GEN_STEPS:-$STEPS}" --batch-size 8 --max-length 48 --threads "${GEN_THREADS:-1}" \
    --jobs "${JOBS:-1}" --out "$OUT/study-smollm2-arith"
}

for s in ${STUDY//,/ }; do
  case "$s" in
    sst2 | mrpc | gen) "run_$s" & ;;
    *) echo "unknown study part: $s (sst2, mrpc, gen)" >&2; exit 2 ;;
  esac
done
wait
