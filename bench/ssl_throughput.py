"""The cost of the image–image term: training samples/s with and without it, side by side.

Same config, shards, ranks and seed; the only difference is `loss.image_ssl_weight` (0 against the
given weight), which adds two augmented views per image to the loader, two more images per sample to
the image tower, the projection head and the NT-Xent loss. Runs alternate (off, on, off, on ...).
Steady state is the median of the trainer's own logged windows (`samples_per_s` in metrics.jsonl,
every `--log-every` steps) after the first `--skip` steps, so start-up, which varies by tens of seconds
on a loaded machine, does not enter. The loader's share of the step time (`data_wait_frac`) shows where
the extra time goes. No evaluation (`eval.sets=[]`).

    python -m bench.ssl_throughput [--rounds 3] [--steps 60] [--skip 20]

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


def steady(out: Path, skip: int) -> tuple[float, float]:
    """Median samples/s and data-wait fraction over the logged windows after `skip` steps."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "samples_per_s" in r and r["step"] > skip]
    assert windows, f"no logged window after step {skip} in {out}"
    return (
        statistics.median(r["samples_per_s"] for r in windows),
        statistics.median(r["data_wait_frac"] for r in windows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--weight", type=float, default=0.5, help="loss.image_ssl_weight when on")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the figure")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="overrides applied to both variants")
    args = parser.parse_args()

    from clip_pipe.config import load_config

    cfg = load_config(Path(args.config), args.set)
    variants = {"off": ["loss.image_ssl_weight=0"], "on": [f"loss.image_ssl_weight={args.weight}"]}
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    data_wait: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name, overrides in variants.items():  # interleaved: off on off on
                out = Path(tmp) / f"{name}-{round_index}"
                overrides = [
                    *args.set,
                    "eval.sets=[]",
                    "eval.retrieval_sets=[]",
                    "eval.linear_probe_train=null",
                    f"run.log_every={args.log_every}",
                    *overrides,
                ]
                run_training(train_command(args.config, out, args.steps, 0, overrides), args.ranks)
                speed, wait = steady(out, args.skip)
                speeds[name].append(speed)
                data_wait[name].append(wait)
                print(
                    f"round {round_index} ssl {name}: {speed:.0f} samples/s, data wait {wait:.2f}", flush=True
                )

    ratios = [on / off for on, off in zip(speeds["on"], speeds["off"], strict=True)]
    table = {
        "machine": machine_description(),
        "setting": f"{args.config}, {args.ranks} ranks x {cfg.data.batch_size}, torchrun, 1 thread/rank, "
        f"data.num_workers={cfg.data.num_workers}; weight {args.weight}; "
        f"steady state over steps {args.skip}-{args.steps}",
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
