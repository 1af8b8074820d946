"""The distributed CLIP loss: clip-pipe's against open_clip's ClipLoss (local loss, gather with grad).

Two real gloo ranks. Each times forward + backward of both losses on the same features, alternating
A B A B after a warm-up, and reports medians and the median of the pairwise ratios. Peak memory is
measured in a fresh pair of processes per loss, as the rise in peak RSS over the inputs.

    python -m bench.loss [--batch 1024 --dim 512 --repeats 30]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss

from bench.common import machine_description
from clip_pipe.distributed import free_port
from clip_pipe.loss import ClipLoss


def make_losses(rank: int, world_size: int) -> dict:
    return {
        "clip-pipe": ClipLoss(rank, world_size),
        "open_clip": OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size),
    }


def features(batch: int, dim: int, rank: int):
    g = torch.Generator().manual_seed(rank)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_(True)
    return image, text, torch.tensor(14.0)


def step(loss_fn, image, text, scale) -> float:
    # open_clip's loss takes a 0-dim scale, ours the (1,) parameter DeepSpeed needs: both broadcast.
    loss = loss_fn(image, text, scale)
    loss.backward()
    image.grad = text.grad = None
    return loss.detach().item()


def time_worker(rank: int, world_size: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    losses = make_losses(rank, world_size)
    image, text, scale = features(args.batch, args.dim, rank)
    values = {name: step(fn, image, text, scale) for name, fn in losses.items()}
    assert abs(values["clip-pipe"] - values["open_clip"]) < 1e-4 * abs(values["open_clip"]), values
    for _ in range(3):  # warm-up
        for fn in losses.values():
            step(fn, image, text, scale)
    times = {name: [] for name in losses}
    for _ in range(args.repeats):
        for name, fn in losses.items():
            dist.barrier()
            start = time.perf_counter()
            step(fn, image, text, scale)
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def memory_worker(rank: int, world_size: int, port: int, args, name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    loss_fn = make_losses(rank, world_size)[name]
    image, text, scale = features(args.batch, args.dim, rank)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        step(loss_fn, image, text, scale)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if rank == 0:
        Path(out).write_text(json.dumps({"peak_rise_mib": (peak - before) / 1024}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1024, help="per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    world_size = 2
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/times.json"
        mp.spawn(time_worker, args=(world_size, free_port(), args, out), nprocs=world_size)
        times = json.loads(Path(out).read_text())
        memory = {}
        for name in ("clip-pipe", "open_clip"):
            out = f"{tmp}/{name}.json"
            mp.spawn(memory_worker, args=(world_size, free_port(), args, name, out), nprocs=world_size)
            memory[name] = json.loads(Path(out).read_text())["peak_rise_mib"]
    ratios = [b / a for a, b in zip(times["clip-pipe"], times["open_clip"], strict=True)]
    print(
        json.dumps(
            {
                "machine": machine_description(),
                "setting": f"2 gloo ranks x {args.batch} pairs, dim {args.dim}, fp32, forward+backward",
                "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
                "speedup_median (open_clip time / ours)": statistics.median(ratios),
                "speedup_range": [min(ratios), max(ratios)],
                "peak_rss_rise_mib": memory,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
