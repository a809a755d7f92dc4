#!/usr/bin/env bash
# Five minutes on a GPU: does the GPU recipe (training/configs/default-gpu.yaml: bf16 autocast,
# channels-last, torch.compile, alternating VQ with k-means init) train, checkpoint, resume,
# select, evaluate and export end to end? Not a quality run: synthetic photos-like images, a
# small patch bank, a hard time limit.
#
#   bash training/gpu_smoke.sh [OUT_DIR]          # default OUT_DIR: runs/gpu-smoke
#
# Needs python3 with torch (CUDA), numpy, Pillow, pyyaml, pydantic, tqdm, safetensors,
# tensorboard; with SMOKE_EXPORT=1 also onnx, onnxscript, onnxruntime. Where pydantic is missing
# and a .whl/ folder of wheels exists (see docs/training.md), they are installed into /tmp/site.
# Prints one JSON line per stage to OUT_DIR/smoke.jsonl; exit status 0 only if every stage passed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-smoke}
PY=${PYTHON:-python3}
if ! "$PY" -c "import pydantic" 2>/dev/null && [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT"
"$PY" -m training.gpu_smoke "$OUT"
