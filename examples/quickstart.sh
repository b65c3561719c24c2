#!/usr/bin/env bash
# The main job on the built-in synthetic model: export LLaVA-tiny with a ResPrune budget of 64,
# answer a prompt about a bundled photo with the torch-free runtime, and prove parity with PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
ARTIFACT=build/llava-tiny-k64
IMAGE=examples/images/astronaut.jpg
PROMPT=$'<image>\nWhat is the astronaut holding?'

python -m prunert export --model synthetic:llava-tiny --budget 64 --out "$ARTIFACT" --overwrite
python -m prunert inspect "$ARTIFACT"
python -m prunert check-trt "$ARTIFACT"
echo "answer:"
python -m prunert run "$ARTIFACT" --image "$IMAGE" --prompt "$PROMPT" --max-new-tokens 24
python -m prunert parity "$ARTIFACT" --image "$IMAGE" --prompt "$PROMPT"
