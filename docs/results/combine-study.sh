#!/usr/bin/env bash
# Two LoRA adapters trained on two built-in tasks, combined by every combination method, each
# part and each combination scored on both tasks (exact match of the greedy answer).
#
#   bash docs/results/combine-study.sh                 # writes docs/results/study-smollm2-combine/
#   OUT=/tmp/c STEPS=20 EVAL=32 bash docs/results/combine-study.sh   # a quick look
#
# Every step is a plain peftlab command; the console is kept beside the adapters' summaries.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/results/study-smollm2-combine}
RUNS=${RUNS:-/tmp/peftlab-combine-study}
STEPS=${STEPS:-80}
EVAL=${EVAL:-128}
TASKS=${TASKS:-"arith upper"}
SWEEP=${SWEEP:-"0.5 0.25"}  # cat again with the last task's adapter at these weights
THREADS=${THREADS:-2}
mkdir -p "$OUT" "$RUNS"
export OMP_NUM_THREADS=$THREADS
{
  echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) STEPS=$STEPS EVAL=$EVAL TASKS=$TASKS"
  adapters=()
  for task in $TASKS; do
    if [ ! -f "$RUNS/$task/adapter/adapter_config.json" ]; then
      echo "\$ peftlab train configs/lora.yaml data=builtin:$task ..."
      python -m peftlab.cli train configs/lora.yaml data="builtin:$task" \
        output_dir="$RUNS/$task" max_steps="$STEPS" max_length=48 lr=2e-3 warmup_steps=5 \
        eval_every=0 save_every=0 eval_size=64 test_size="$EVAL" seed=0
    fi
    cp "$RUNS/$task/summary.json" "$OUT/train-$task-summary.json"
    adapters+=("$task=$RUNS/$task/adapter")
  done
  parts=$(IFS=,; echo "${adapters[*]}")
  evals=()
  for task in $TASKS; do evals+=("builtin:$task"); done
  for method in cat svd ties dare_linear dare_ties; do
    extra=()
    case $method in
      svd) extra=(--rank 8) ;;
      ties | dare_*) extra=(--density 0.5 --rank 16) ;;
    esac
    echo
    echo "\$ peftlab combine --method $method ${extra[*]} --adapters $parts --eval-data ${evals[*]} --eval-size $EVAL"
    python -m peftlab.cli combine --model smollm2-135m --adapters "$parts" --method "$method" \
      "${extra[@]}" --out "$RUNS/combined-$method" --overwrite \
      --eval-data "${evals[@]}" --eval-size "$EVAL" --max-length 48
  done
  last=${adapters[-1]}
  for w in $SWEEP; do
    sweep=$(IFS=,; echo "${adapters[*]:0:${#adapters[@]}-1},$last:$w")
    echo
    echo "\$ peftlab combine --method cat --adapters $sweep --eval-data ${evals[*]} --eval-size $EVAL"
    python -m peftlab.cli combine --model smollm2-135m --adapters "$sweep" --method cat \
      --out "$RUNS/combined-cat-$w" --overwrite \
      --eval-data "${evals[@]}" --eval-size "$EVAL" --max-length 48
  done
} 2>&1 | tee "$OUT/console.txt"
