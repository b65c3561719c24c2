#!/usr/bin/env bash
# The whole GPU path in one command (see bench/gpu_check.py): export, convert/calibrate/quantize (int4), build engines at
# every precision, parity on the engines, timings; writes bench/results/gpu_check.json.
#   bash bench/gpu_check.sh [--preset llava-tiny --budget 16] [--precisions fp32,fp16]
# Needs: an NVIDIA GPU, tensorrt >= 10.3 (JetPack, NGC container or NVIDIA's wheel index) and cuda-python.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import tensorrt" 2>/dev/null || { echo "gpu_check: tensorrt is not importable (see docs/deploy.md)" >&2; exit 2; }
python -c "import prunert, torch, onnx" 2>/dev/null || python -m pip install -q -e ".[export]" cuda-python
export PYTHONUNBUFFERED=1
exec python bench/gpu_check.py "$@"
