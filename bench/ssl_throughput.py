"""The cost of the image–image term: training samples/s with and without it, side by side.

Same config, shards, ranks and seeds; the only difference is `loss.image_ssl_weight` (0 against the
given weight), which adds two augmented views per image to the loader, two more images per sample to
the image tower, the projection head and the NT-Xent loss. Runs alternate (off, on, off, on ...). Each
variant trains to a short and a long step count, and

    steady samples/s = global batch × (long − short) / (wall(long) − wall(short)),

so start-up and the end-of-run save cancel. No evaluation (`eval.sets=[]`).

    python -m bench.ssl_throughput [--rounds 3] [--short 20] [--long 80]

Needs the demo's shards (`python data_prep/fashion_mnist.py --out data/fashion_mnist`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.common import machine_description
from bench.objectives import run_training, train_command


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--weight", type=float, default=0.5, help="loss.image_ssl_weight when on")
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="overrides applied to both variants")
    args = parser.parse_args()

    from clip_pipe.config import load_config

    cfg = load_config(Path(args.config), args.set)
    global_batch = cfg.data.batch_size * args.ranks
    variants = {"off": ["loss.image_ssl_weight=0"], "on": [f"loss.image_ssl_weight={args.weight}"]}
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    data_wait: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name, overrides in variants.items():  # interleaved: off on off on
                walls = {}
                for steps in (args.short, args.long):
                    out = Path(tmp) / f"{name}-{round_index}-{steps}"
                    command = train_command(
                        args.config, out, steps, 0, [*args.set, "eval.sets=[]", *overrides]
                    )
                    walls[steps] = run_training(command, args.ranks)
                speed = global_batch * (args.long - args.short) / (walls[args.long] - walls[args.short])
                speeds[name].append(speed)
                # Where the time goes: the step loop's share of time spent waiting for the loader.
                records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                data_wait[name].append(statistics.median(r["data_wait_frac"] for r in records if "loss" in r))
                print(f"round {round_index} ssl {name}: {speed:.0f} samples/s", flush=True)

    ratios = [on / off for on, off in zip(speeds["on"], speeds["off"], strict=True)]
    table = {
        "machine": machine_description(),
        "setting": f"{args.config}, {args.ranks} ranks x {cfg.data.batch_size}, torchrun, 1 thread/rank, "
        f"weight {args.weight}, steady state over steps {args.short}-{args.long}",
        "samples_per_s_without": statistics.median(speeds["off"]),
        "samples_per_s_with": statistics.median(speeds["on"]),
        "ratio_with_over_without_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "data_wait_frac_median": {name: statistics.median(v) for name, v in data_wait.items()},
        "per_round": {"without": speeds["off"], "with": speeds["on"]},
    }
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
