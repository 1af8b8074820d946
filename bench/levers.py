"""The levers' costs and savings on this CPU, each against the run without it, interleaved (A B A B).

    python -m bench.levers tower     # image tower fwd+bwd samples/s at patch dropout 0, 0.5, 0.75
    python -m bench.levers memory    # ViT-B/32 224 px training step: peak RSS and time, with activation
                                     # checkpointing or a locked image tower against neither; largest batch in 8 GiB
    python -m bench.levers compile   # the demo model's training step, torch.compile against eager

`memory` and `compile` run every configuration in a fresh process (peak RSS is per process; a compiled
graph is cached per process) through the real Engine (1 rank, ZeRO-0, fp32, AdamW), and print a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine_description

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def tower(args) -> None:
    """Forward + backward of the image tower alone, in train mode (patch dropout on)."""
    import torch

    from clip_pipe.config import ModelConfig
    from clip_pipe.model import build_model

    for name, size, batch in (("clip-pipe-small-28", 28, 256), ("ViT-B-16", 224, args.b16_batch)):
        rates = {p: [] for p in (0.0, 0.5, 0.75)}
        models = {}
        for p in rates:
            torch.manual_seed(0)
            models[p] = build_model(ModelConfig(name=name, patch_dropout=p)).model.visual.train()
        images = torch.randn(batch, 3, size, size)
        for r in range(args.rounds + 1):  # round 0 warms up
            for p, visual in models.items():
                start = time.perf_counter()
                visual(images).float().square().mean().backward()
                if r:
                    rates[p].append(batch / (time.perf_counter() - start))
                visual.zero_grad(set_to_none=True)
        print(
            f"\n{name} image tower, {size} px, batch {batch}, fwd+bwd, {args.rounds} rounds; {machine_description()}"
        )
        print(f"{'patch dropout':<14} {'samples/s':>10} {'vs 0':>6} {'min-max':>12}")
        for p, values in rates.items():
            ratios = [v / b for v, b in zip(values, rates[0.0], strict=True)]
            print(f"{p:<14} {statistics.median(values):>10.1f} {statistics.median(ratios):>5.2f}x "
                  f"{min(ratios):>5.2f}-{max(ratios):.2f}x")  # fmt: skip


def step_process(args) -> None:
    """One configuration in this fresh process: `--steps` training steps; prints peak RSS and step times."""
    import torch

    from clip_pipe.config import load_config
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group
    from clip_pipe.losses import ClipLoss
    from clip_pipe.model import build_model

    torch.set_num_threads(args.threads)
    init_process_group(env_from_os())
    cfg = load_config(None, ["data.train=/x", f"data.batch_size={args.batch}", f"model.name={args.model}",
                             "optim.grad_clip=0", *args.overrides])  # fmt: skip
    torch.manual_seed(0)
    encoder = build_model(cfg.model)
    engine = Engine(encoder.model, cfg, 1)
    size = encoder.model.visual.image_size[0]
    images = torch.randn(args.batch, 3, size, size)
    texts = encoder.tokenizer([f"a photo of thing number {i}" for i in range(args.batch)])
    loss_fn, times = ClipLoss(), []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.train_step(images, texts, loss_fn, 1e-4)
        times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss": peak_kib * 1024, "times": times, "num_trainable": engine.num_trainable}))


def run_step(model: str, batch: int, overrides: list[str], steps: int, threads: int) -> dict:
    command = [sys.executable, "-m", "bench.levers", "step", "--model", model, "--batch", str(batch),
               "--steps", str(steps), "--threads", str(threads), *overrides]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CLIP_PIPE_SKIP_SHM_BUILD": "1",
        "RANK": "0",
        "WORLD_SIZE": "1",
    }
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(args) -> None:
    variants = {
        "plain": [],
        "checkpointing": ["model.grad_checkpointing=true"],
        "locked image": ["model.lock_image=true"],
    }
    results = {(v, b): [] for v in variants for b in args.batches}
    for _ in range(args.rounds):
        for b in args.batches:
            for v, overrides in variants.items():
                r = run_step("ViT-B-32", b, overrides, args.steps, args.threads)
                results[v, b].append(r)
                print(json.dumps({"variant": v, "batch": b, **r}), flush=True)
    print(f"\nViT-B/32 224 px training step (Engine, 1 rank, ZeRO-0, fp32, AdamW), {args.rounds} rounds, "
          f"{args.steps} steps per process (the first is warm-up); {machine_description()}")  # fmt: skip
    print(
        f"{'variant':<14} {'batch':>5} {'peak RSS GiB':>12} {'s/step':>7} {'time vs plain':>13} {'8 GiB batch':>11}"
    )
    for v in variants:
        rss = {b: statistics.median(r["peak_rss"] for r in results[v, b]) for b in args.batches}
        lo, hi = min(args.batches), max(args.batches)
        per_sample = (rss[hi] - rss[lo]) / (hi - lo)  # peak memory is linear in the batch: fit two points
        fits = int((8 * GIB - (rss[lo] - per_sample * lo)) / per_sample)
        for b in args.batches:
            step = [statistics.median(r["times"][1:]) for r in results[v, b]]
            plain = [statistics.median(r["times"][1:]) for r in results["plain", b]]
            ratios = [s / p for s, p in zip(step, plain, strict=True)]
            print(f"{v:<14} {b:>5} {rss[b] / GIB:>12.2f} {statistics.median(step):>7.2f} "
                  f"{statistics.median(ratios):>6.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) {fits:>11}")  # fmt: skip
        print(
            f"{'':<14} {'':>5} marginal {per_sample / 2**20:.1f} MiB/sample; fixed {(rss[lo] - per_sample * lo) / GIB:.2f} GiB"
        )


def compile_(args) -> None:
    results = {False: [], True: []}
    for _ in range(args.rounds):
        for compiled in results:
            overrides = [f"run.compile={str(compiled).lower()}"]
            r = run_step("clip-pipe-small-28", args.batch, overrides, args.steps, args.threads)
            results[compiled].append(r)
            print(json.dumps({"compile": compiled, **r}), flush=True)
    print(f"\nclip-pipe-small-28 training step, batch {args.batch}, 1 rank, fp32, {args.rounds} rounds, "
          f"{args.steps} steps per process; {machine_description()}")  # fmt: skip
    print(f"{'':<9} {'first step s':>12} {'steady ms/step':>14} {'vs eager':>9}")
    steady = {c: [statistics.median(r["times"][args.steps // 2 :]) for r in rs] for c, rs in results.items()}
    for c, rs in results.items():
        ratios = [e / s for e, s in zip(steady[False], steady[c], strict=True)]
        print(f"{'compiled' if c else 'eager':<9} {statistics.median(r['times'][0] for r in rs):>12.1f} "
              f"{1000 * statistics.median(steady[c]):>14.1f} {statistics.median(ratios):>8.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("tower")
    sub.add_argument("--rounds", type=int, default=3)
    sub.add_argument("--b16-batch", type=int, default=8)
    sub = commands.add_parser("memory")
    sub.add_argument("--batches", type=int, nargs=2, default=[16, 48])
    sub.add_argument("--rounds", type=int, default=2)
    sub.add_argument("--steps", type=int, default=3)
    sub.add_argument("--threads", type=int, default=2)
    sub = commands.add_parser("compile")
    sub.add_argument("--batch", type=int, default=256)
    sub.add_argument("--rounds", type=int, default=2)
    sub.add_argument("--steps", type=int, default=20)
    sub.add_argument("--threads", type=int, default=2)
    sub = commands.add_parser("step")
    sub.add_argument("--model", required=True)
    sub.add_argument("--batch", type=int, required=True)
    sub.add_argument("--steps", type=int, default=3)
    sub.add_argument("--threads", type=int, default=2)
    sub.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    {"tower": tower, "memory": memory, "compile": compile_, "step": step_process}[args.command](args)


if __name__ == "__main__":
    main()
