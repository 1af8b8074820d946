"""Does decoding JPEGs at a reduced scale cost accuracy? Train the same recipe with the full-resolution
decode and with the reduced-scale one, on the same data and seeds, and compare held-out retrieval.

The recipe is configs/corpora.yaml on the Tux Paint part alone: shards of 64-pixel JPEGs
(`data_prep/tuxpaint.py --image-size 64`, split by `data_prep/holdout.py`) and the demo's tiny CLIP,
which sees 28-pixel crops. Crops of 56 pixels and more are then decoded at 1/2 scale: the same ratio
of stored to output pixels (2.1-2.3) as 512-pixel shards at a 224-pixel output. One rank, one thread,
one process per run; runs alternate full, reduced, full, ... over the seeds (run.seed and data.seed).

    python data_prep/tuxpaint.py --out data/tuxpaint --image-size 64
    python data_prep/holdout.py data/tuxpaint --train data/tuxpaint_train --heldout data/tuxpaint_heldout
    python -m bench.decode_accuracy --train data/tuxpaint_train --heldout data/tuxpaint_heldout --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = tuple(f"{d}_retrieval_recall@{k}" for k in (1, 5, 10) for d in ("image", "text"))


def one_run(args) -> None:
    """One training run in this process; prints its held-out results as one JSON line."""
    import deepspeed.ops

    import clip_pipe.data.decode as decode
    from clip_pipe.config import load_config
    from clip_pipe.train import train

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # one rank: skip the op's JIT build
    if args.decode == "full":
        decode.JPEG_REDUCTIONS = ()  # every JPEG decoded in full: today's crops, bit for bit
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    overrides = [
        f"data.train=[{args.train}]",
        f"eval.retrieval_sets=[{args.heldout}]",
        "eval.every_steps=0",
        f"data.batch_size={args.batch}",
        f"data.seed={args.seed}",
        f"run.seed={args.seed}",
        f"run.steps={args.steps}",
        f"run.out_dir={args.out}",
        f"run.checkpoint_every={args.steps * 10}",
        "run.threads_per_rank=1",
        "run.log_every=100",
    ]
    results = train(load_config(str(REPO / "configs/corpora.yaml"), overrides))
    (scores,) = results.values()
    print("RESULT " + json.dumps({k: v for k, v in scores.items() if isinstance(v, float)}), flush=True)


def reduced_share(train: str, output: int) -> float:
    """The share of training crops (first epoch's boxes) that the reduced path decodes at a lower scale."""
    from clip_pipe.data import list_shards, tar_samples
    from clip_pipe.data.augment import TrainAugment
    from clip_pipe.data.decode import decode_for_crop

    augment = TrainAugment(output, (0.5,) * 3, (0.5,) * 3)
    flags = [
        decode_for_crop(sample, augment, random.Random(i)).reduction > 1
        for shard in list_shards([train])
        for i, sample in enumerate(tar_samples(shard.url))
    ]
    return sum(flags) / len(flags)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decode", choices=("full", "reduced"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_run(args)
        return

    runs: dict[str, list[dict]] = {"full": [], "reduced": []}
    with tempfile.TemporaryDirectory(prefix="clip-pipe-decode-accuracy-") as tmp:
        for seed in args.seeds:
            for decode in ("full", "reduced"):
                command = [
                    sys.executable, "-m", "bench.decode_accuracy", "--one", "--decode", decode,
                    "--seed", str(seed), "--out", f"{tmp}/{decode}-{seed}", "--train", args.train,
                    "--heldout", args.heldout, "--steps", str(args.steps), "--batch", str(args.batch),
                ]  # fmt: skip
                done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    sys.exit(f"{decode} seed {seed} failed:\n{done.stderr[-4000:]}")
                runs[decode].append(json.loads(lines[-1][len("RESULT ") :]))
                print(decode, seed, {m: round(runs[decode][-1][m], 4) for m in METRICS}, flush=True)

    share = reduced_share(args.train, 28)
    print(
        f"\n## Held-out retrieval after {args.steps} steps (batch {args.batch}, one rank), full vs reduced-scale "
        f"decode; {share:.0%} of crops reduced; seeds {args.seeds}\n"
    )
    print(
        "| metric | full decode, mean (min-max) | reduced, mean (min-max) | reduced - full, mean of per-seed deltas (min-max) |"
    )
    print("|---|---|---|---|")
    for metric in METRICS:
        full = [100 * r[metric] for r in runs["full"]]
        reduced = [100 * r[metric] for r in runs["reduced"]]
        deltas = [b - a for a, b in zip(full, reduced, strict=True)]

        def cell(values):
            return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"

        print(
            f"| {metric} (%) | {cell(full)} | {cell(reduced)} | {statistics.mean(deltas):+.2f} ({min(deltas):+.2f} to {max(deltas):+.2f}) |"
        )


if __name__ == "__main__":
    main()
