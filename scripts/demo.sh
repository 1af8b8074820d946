#!/usr/bin/env bash
# The demo: set up, shard the real Fashion-MNIST (55k train images with captions; a 5k validation slice
# of the train split, held out for tuning; the 10k test images as a zero-shot eval set), train a tiny
# CLIP on 2 DeepSpeed ranks, and evaluate zero-shot on the test images.
# Extra arguments are config overrides, e.g. `scripts/demo.sh run.steps=2000`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo  # the demo's packages only: the tests' SLURM and Chromium are not needed here
export PATH="$PWD/.venv/bin:$PATH"

DATA=data/fashion_mnist
if [ ! -f "$DATA/train/manifest.json" ] || [ ! -f "$DATA/val/test/manifest.json" ] \
    || [ ! -f "$DATA/val_pairs/manifest.json" ] || [ ! -f "$DATA/eval/test/manifest.json" ]; then
    rm -rf "$DATA"
    python data_prep/fashion_mnist.py --out "$DATA" --workers 2
fi

run_name="fashion_mnist_$(date +%Y%m%d_%H%M%S)"
start=$(date +%s)
deepspeed --num_gpus 2 launch/train.py --config configs/fashion_mnist.yaml "run.name=$run_name" "$@"
echo "demo: training + zero-shot eval took $(( $(date +%s) - start )) s; results in runs/$run_name/"
