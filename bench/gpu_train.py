"""ViT-B/32 at 224 px, bf16, batch 256 on one GPU: clip-pipe's trainer against open_clip_train.

Both tools train on the same generated shards (coloured shapes with captions, made here by data_prep, since a
lent GPU machine reaches no network), with the same model, batch, precision, optimizer settings and loader
workers. Each tool trains to a short and a long step count; steady-state samples/s is
batch × (long − short) / (wall_long − wall_short), which cancels start-up. Model FLOPs utilisation (MFU) is
steady samples/s × FLOPs per sample (forward + backward, counted by torch's FlopCounterMode) over the chip's
bf16 matmul rate measured here on an 8192³ product.

    python -m bench.gpu_train [--short 20 --long 120 --rounds 1 --workers 8]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.train_throughput import OPEN_CLIP_WRAPPER, REPO

MODEL, BATCH = "ViT-B-32", 256
SHAPES, COLORS = ("circle", "square", "triangle"), ("red", "green", "blue", "yellow", "purple", "orange")
RGB = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40),
       "purple": (140, 40, 170), "orange": (240, 140, 20)}  # fmt: skip


def make_shards(folder: Path, num_images: int, workers: int) -> Path:
    from PIL import Image, ImageDraw

    images, rng, rows = folder / "images", random.Random(0), []
    images.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        shape, color = rng.choice(SHAPES), rng.choice(COLORS)
        image = Image.new("RGB", (256, 256), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        x0, y0, x1, y1 = (
            rng.randrange(80),
            rng.randrange(80),
            150 + rng.randrange(100),
            150 + rng.randrange(100),
        )
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=RGB[color])
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=RGB[color])
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=RGB[color])
        image.save(images / f"{i}.jpg", quality=90)
        rows.append((f"{i}.jpg", f"a photo of a {color} {shape}"))
    with open(folder / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    subprocess.run(
        [sys.executable, "data_prep/make_shards.py", "--images", str(images), "--captions", str(folder / "captions.csv"),
         "--out", str(folder / "train"), "--shard-size", "1000", "--image-size", "224", "--workers", str(workers),
         "--dedup", "none"], cwd=REPO, check=True,
    )  # fmt: skip
    return folder / "train"


def ours(shards: Path, out: Path, steps: int, workers: int) -> list[str]:
    return [
        "launch/train.py", "--config", "configs/vit_b32.yaml", f"data.train={shards}", "eval.sets=[]",
        f"data.batch_size={BATCH}", f"data.num_workers={workers}", f"run.steps={steps}", f"run.out_dir={out}",
        f"run.checkpoint_every={steps}", "run.zero_stage=0", "optim.warmup_steps=10", "run.threads_per_rank=4",
    ]  # fmt: skip


def theirs(shards: Path, out: Path, steps: int, workers: int, wrapper: Path) -> list[str]:
    urls = "::".join(str(p) for p in sorted(shards.glob("*.tar")))
    return [
        str(wrapper), str(REPO / "clip_pipe" / "model_configs"), "--train-data", urls, "--dataset-type", "webdataset",
        "--dataset-resampled", f"--train-num-samples={steps * BATCH}", "--epochs=1", f"--batch-size={BATCH}",
        f"--workers={workers}", f"--model={MODEL}", "--lr=5e-4", "--wd=0.2", "--warmup=10", "--beta2=0.98",
        "--eps=1e-6", "--grad-clip-norm=1.0", "--precision=amp_bf16", "--local-loss", "--gather-with-grad",
        "--name=bench", "--report-to=", "--zeroshot-frequency=0", "--val-frequency=0", "--save-frequency=0",
    ]  # fmt: skip


def timed(args: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", *args]
    env = {**os.environ, "BENCH_OPEN_CLIP_LOGS": str(out), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def flops_per_sample() -> float:
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = open_clip.create_model(MODEL).cuda()
    images, texts = (
        torch.randn(8, 3, 224, 224, device="cuda"),
        torch.randint(0, 49408, (8, 77), device="cuda"),
    )
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", torch.bfloat16):
        image_features, text_features, _ = model(images, texts)
        (image_features.float().sum() + text_features.float().sum()).backward()
    return counter.get_total_flops() / 8


def matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--images", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp / "data", args.images, args.workers)
        wrapper = tmp / "open_clip_train_wrapper.py"
        wrapper.write_text(OPEN_CLIP_WRAPPER)
        steady: dict[str, list[float]] = {"clip-pipe": [], "open_clip_train": []}
        for r in range(args.rounds):
            for name in steady:
                walls = []
                for steps in (args.short, args.long):
                    out = tmp / f"{name}-{r}-{steps}"
                    cmd = ours(shards, out, steps, args.workers) if name == "clip-pipe" else theirs(
                        shards, out, steps, args.workers, wrapper)  # fmt: skip
                    walls.append(timed(cmd, out))
                steady[name].append(BATCH * (args.long - args.short) / (walls[1] - walls[0]))
                print(
                    json.dumps({"tool": name, "round": r, "walls": walls, "steady": steady[name][-1]}),
                    flush=True,
                )
    flops, peak = flops_per_sample(), matmul_tflops()
    print(
        f"\n{MODEL} 224 px, bf16, batch {BATCH}, one GPU; FLOPs/sample {flops / 1e9:.1f} G; bf16 matmul {peak:.0f} TFLOP/s"
    )
    print(f"{'tool':<16} {'samples/s':>10} {'MFU':>6}")
    for name, values in steady.items():
        sps = statistics.median(values)
        print(f"{name:<16} {sps:>10.0f} {sps * flops / (peak * 1e12):>6.1%}")
    ratio = statistics.median(steady["clip-pipe"]) / statistics.median(steady["open_clip_train"])
    print(f"clip-pipe / open_clip_train: {ratio:.2f}x")


if __name__ == "__main__":
    main()
