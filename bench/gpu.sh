#!/usr/bin/env bash
# One script for a lent GPU machine (about 8 minutes on one H200): correctness first, then timings.
#   here:  bench/gpu_wheels.sh            (downloads what the machine's image lacks into .gpu-wheels/)
#   there: bench/gpu.sh [SECTION ...]     (device tool: run with carry [".gpu-wheels"]); sections: tests loss
#                                         train levers (default: all, in that order)
# Prints its tables last; a copy of everything goes to $OUT (the device tool brings it back).
set -euo pipefail
cd "$(dirname "$0")/.."
TMP=${TMPDIR:-/tmp}
OUT=${OUT:-$TMP/clip-pipe-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -m venv --system-site-packages "$TMP/clip-pipe-gpu-venv"
PY=$TMP/clip-pipe-gpu-venv/bin/python
$PY -m pip install -q --no-index --find-links .gpu-wheels open_clip_torch webdataset braceexpand ftfy hjson \
    pydantic python-multipart
$PY -m pip install -q --no-index --find-links .gpu-wheels --no-build-isolation deepspeed
export PYTHONPATH=$PWD PATH=$TMP/clip-pipe-gpu-venv/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
$PY -c "import torch, open_clip, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'open_clip', open_clip.__version__, 'deepspeed', deepspeed.__version__)"

sections=${*:-tests loss train levers}
want() { [[ " $sections " == *" $1 "* ]]; }

if want tests; then
    echo "== 1. correctness: the gpu-marked tests (tiled loss on CUDA; 1-GPU DeepSpeed bf16 train, eval, checkpoint, resume)"
    $PY -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
fi
if want loss; then
    echo "== 2. tiled loss against open_clip ClipLoss, B 32k-256k"
    $PY -m bench.gpu_loss | tee "$OUT/gpu_loss.txt"
fi
if want train; then
    echo "== 3. ViT-B/32 224 px bf16 batch 256: clip-pipe against open_clip_train"
    $PY -m bench.gpu_train --short 10 --long 60 | tee "$OUT/gpu_train.txt"
fi
if want levers; then
    # Each lever checked on CUDA (patch dropout, checkpointing, locking, compile), then ViT-B/16 timed with
    # and without patch dropout and checkpointing, beside the planner's prediction (about 2 minutes).
    echo "== 4. levers: correctness, then ViT-B/16 224 px bf16 batch 256 with and without them"
    $PY -m bench.gpu_levers --batch 256 --steps 20 | tee "$OUT/gpu_levers.txt"
fi
