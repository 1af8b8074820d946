#!/usr/bin/env bash
# One script for a lent GPU machine (about 8 minutes on one H200): correctness first, then timings.
#   here:  bench/gpu_wheels.sh            (downloads what the machine's image lacks into .gpu-wheels/)
#   there: bench/gpu.sh                   (device tool: run with carry [".gpu-wheels"])
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

echo "== 1. correctness: the gpu-marked tests (tiled loss on CUDA; 1-GPU DeepSpeed bf16 train, eval, checkpoint, resume)"
$PY -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
echo "== 2. tiled loss against open_clip ClipLoss, B 32k-256k"
$PY -m bench.gpu_loss | tee "$OUT/gpu_loss.txt"
echo "== 3. ViT-B/32 224 px bf16 batch 256: clip-pipe against open_clip_train"
$PY -m bench.gpu_train | tee "$OUT/gpu_train.txt"
