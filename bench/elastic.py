"""What the elastic order costs: the loader at this tree against the per-slot loader it replaced.

The same script measures both: each measurement runs in a fresh process whose `clip_pipe` is either this
tree or an export (`git archive`) of the baseline commit (`--baseline`, the last commit before the elastic
order), alternating (new, old, new, old, ...) after a warm-up of each, on the same shards, transforms,
tokenizer, batch and thread count. Two figures:

- **Throughput**: steady-state samples/s of one rank's loader (`batch_loader`: the rank's thread with
  `--workers 0`, worker processes otherwise), rank 0 of `--ranks`. The table gives medians and the
  median of the pairwise ratios with their range. Goal: the elastic loader costs < 5%.
- **Resume**: seconds from building a loader at a checkpoint's place, `--resume-at` steps into the
  run, to its first batch. The old loader replays its slot's epoch up to that place; the elastic one
  re-reads at most a block and the part of a shard before it, per stream.

    python -m bench.elastic --shards data/fashion_mnist/train [--rounds 5 --batches 60 --workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "375a09c"  # main before the elastic order: the per-slot loader
MODEL = "clip-pipe-tiny-28"


def child(args: argparse.Namespace) -> None:
    """One measurement, with whichever clip_pipe is on the path; prints a JSON line."""
    import itertools

    import torch

    import clip_pipe.data as data
    from clip_pipe.config import ModelConfig
    from clip_pipe.model import build_model

    torch.set_num_threads(1)
    encoder = build_model(ModelConfig(name=MODEL))
    augment, tokenizer = encoder.preprocess_train, encoder.tokenizer
    shards = data.list_shards([str(args.shards)])
    elastic = hasattr(data, "build_stream")
    start_step = args.resume_at if args.measure == "resume" else 0
    global_batch = args.batch * args.ranks
    if elastic:
        from clip_pipe.config import SourceConfig
        from clip_pipe.data.order import PromisedSamples, StreamPositions, slot_pieces, slot_range

        sources = data.list_sources([SourceConfig([str(args.shards)])])
        settings = {"num_streams": args.streams, "seed": 0, "shuffle_buffer": args.shuffle_buffer}
        saved = None
        if start_step:  # the place a checkpoint would hold: the order alone gives it, without reading
            stream, _ = data.build_stream(sources, global_batch, augment, tokenizer, 0, 1, **settings)
            order, positions = stream.order, StreamPositions({}, -1)
            lo, hi = slot_range(global_batch, 1, 0, 0, 0)
            pieces = slot_pieces(
                order.layout, lo, hi, order.streams(lo, hi, {}, lambda i: PromisedSamples()), 0
            )
            for piece in itertools.islice(pieces, start_step):
                moved = [(i, j, p.epoch, p.block, p.num_taken) for (i, j), p in piece.positions.items()]
                positions.advance({"step": piece.step, "positions": moved})
            spec = data.OrderSpec(sources[0].name, [s.num_samples for s in shards], 1.0)
            saved = data.StreamPositions.merge(
                [positions.to_list()], [spec], order.layout.source_streams, 0, global_batch
            ).to_dict()
        stream, _ = data.build_stream(
            sources, global_batch, augment, tokenizer, 0, args.ranks, saved=saved, step=start_step, **settings
        )
    else:
        start = None
        if start_step:  # as the old loader saved it: each worker's slot, its share of the batches in
            num_slots = max(1, args.workers)
            taken = data.SlotPosition(0, start_step // num_slots * args.batch)
            start = data.LoaderPosition(start_step, [taken] * num_slots)
        stream = data.ImageTextStream(
            shards, args.batch, augment, tokenizer, 0, args.ranks, 0, args.shuffle_buffer, start=start
        )
    began = time.perf_counter()
    batches = iter(data.batch_loader(stream, args.workers))
    next(batches)
    first = time.perf_counter() - began
    result = {"first_batch_s": first}
    if args.measure == "throughput":
        for _ in range(args.warmup):
            next(batches)
        began = time.perf_counter()
        for _ in range(args.batches):
            batch = next(batches)
            assert batch["images"].shape[0] == args.batch
        result["samples_per_s"] = args.batches * args.batch / (time.perf_counter() - began)
    print(json.dumps(result), flush=True)


def measure(tree: Path, args: argparse.Namespace, what: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--measure", what]
    for name in (
        "shards",
        "batch",
        "batches",
        "warmup",
        "ranks",
        "workers",
        "streams",
        "shuffle_buffer",
        "resume_at",
    ):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(new: list[float], old: list[float]) -> dict:
    ratios = [a / b for a, b in zip(new, old, strict=True)]
    return {
        "elastic": statistics.median(new),
        "per_slot": statistics.median(old),
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=Path, default=REPO / "data/fashion_mnist/train")
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--batch", type=int, default=128, help="samples per rank")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ranks", type=int, default=1, help="the rank measured is rank 0 of this many")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--streams", type=int, default=0, help="data.num_streams (0: automatic)")
    parser.add_argument("--shuffle-buffer", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resume-at", type=int, default=200, help="steps into the run for the resume figure")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="throughput", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from bench.common import machine_description

    args.shards = args.shards.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        baseline.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.baseline], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        trees = {"elastic": REPO, "per_slot": baseline}
        for tree in trees.values():  # warm-up: imports, page cache
            measure(tree, argparse.Namespace(**{**vars(args), "batches": 5}), "throughput")
        rates: dict[str, list[float]] = {name: [] for name in trees}
        resumes: dict[str, list[float]] = {name: [] for name in trees}
        for round_index in range(args.rounds):
            for name, tree in trees.items():
                rate = measure(tree, args, "throughput")["samples_per_s"]
                rates[name].append(rate)
                print(f"round {round_index} {name}: {rate:.0f} samples/s", flush=True)
            for name, tree in trees.items():
                seconds = measure(tree, args, "resume")["first_batch_s"]
                resumes[name].append(seconds)
                print(f"round {round_index} {name}: first batch {seconds:.2f} s after resuming", flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    table = {
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commits": {
            "elastic": commit
            + ("+" if subprocess.run(["git", "diff", "--quiet"], cwd=REPO).returncode else ""),
            "per_slot": args.baseline,
        },
        "setting": (
            f"{MODEL} transforms and tokenizer, rank 0 of {args.ranks}, {args.batch} samples/rank, "
            f"data.num_workers={args.workers}, 1 thread, shuffle_buffer {args.shuffle_buffer}, "
            f"data.num_streams={args.streams} (elastic), {args.shards}"
        ),
        "samples_per_s": summary(rates["elastic"], rates["per_slot"]),
        f"first_batch_s_resumed_at_step_{args.resume_at}": summary(resumes["elastic"], resumes["per_slot"]),
    }
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
