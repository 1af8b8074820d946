"""Training objectives compared side by side: same data, steps and seeds; only the objective differs.

Each variant is a list of config overrides on one base config. Every variant trains once per seed
(`run.seed` and `data.seed` both set to it, so a seed fixes the initial weights and the data order for
every variant), through the real trainer (`torchrun launch/train.py`), and ends with the config's
evaluation. Runs alternate variants within each seed, so machine load spreads over all of them.

    python -m bench.objectives --seeds 0 1 2 --steps 1000                     # every variant
    python -m bench.objectives --only infonce ssl0.5 ssl1.0 --seeds 0 1 --steps 300

The table reports, per variant and metric, the median over seeds, the min–max spread, and the median
of the per-seed differences to the first variant (paired: same seed, same data). Every numeric metric
in the run's `eval.json` that names top-1/top-5 or R@k is reported (zero-shot and linear probe on
classification sets; retrieval R@k on retrieval sets), plus steady training samples/s from the run's log.

    python -m bench.objectives --config configs/corpora.yaml --steps 600   # retrieval on real captions
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

from bench.common import machine_description

REPO = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, list[str]] = {
    "infonce": [],
    "siglip": ["loss.kind=siglip"],
    "ssl0.5": ["loss.image_ssl_weight=0.5"],
    "ssl1.0": ["loss.image_ssl_weight=1.0"],
}


def train_command(config: str, out: Path, steps: int, seed: int, overrides: list[str]) -> list[str]:
    return [
        "launch/train.py", "--config", config, f"run.steps={steps}", f"run.seed={seed}", f"data.seed={seed}",
        f"run.out_dir={out}", f"run.checkpoint_every={steps}", "run.keep_checkpoints=1", *overrides,
    ]  # fmt: skip


def run_training(args: list[str], num_ranks: int) -> float:
    """Run the trainer under torchrun (one thread per rank); returns the whole process's wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_ranks}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


# What the table reports, by name fragment: zero-shot and probe top-1/top-5, retrieval R@k, speed.
REPORTED = ("top1", "top5", "recall@", "samples_per_s")


def run_metrics(out: Path, skip_steps: int) -> dict[str, float]:
    """The reported metrics of every eval set in `eval.json` (`set/metric`: zero-shot top-1/5 on
    classification sets, R@k on retrieval sets, the linear probe where configured), and the median
    logged samples/s past warm-up."""
    metrics = {}
    for name, results in json.loads((out / "eval.json").read_text()).items():
        for key, value in results.items():
            if isinstance(value, float | int) and any(part in key for part in REPORTED):
                metrics[f"{name}/{key}"] = float(value)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in records if "samples_per_s" in r and r["step"] > skip_steps]
    if speeds:
        metrics["train/samples_per_s"] = statistics.median(speeds)
    return metrics


def check_variants(config: str, variants: dict[str, list[str]]) -> None:
    """Fail before any training if a variant's overrides are not valid config (e.g. an option not merged)."""
    from clip_pipe.config import load_config

    for name, overrides in variants.items():
        try:
            load_config(REPO / config, overrides)
        except ValueError as e:
            raise SystemExit(f"variant {name!r}: {e}") from None


def summarize(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> dict:
    baseline_name = next(iter(results))
    baseline = results[baseline_name]
    table = {}
    for name, runs in results.items():
        rows = {}
        for metric in runs[0]:
            values = [r[metric] for r in runs]
            row = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "per_seed": dict(zip(seeds, values, strict=True)),
            }
            if name != baseline_name:
                deltas = [v - b[metric] for v, b in zip(values, baseline, strict=True)]
                row[f"delta_vs_{baseline_name}"] = {
                    "median": statistics.median(deltas),
                    "min": min(deltas),
                    "max": max(deltas),
                }
            rows[metric] = row
        table[name] = rows
    return table


def markdown(table: dict) -> str:
    names = list(table)
    metrics = list(table[names[0]])
    lines = ["| variant | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name in names:
        cells = []
        for metric in metrics:
            row = table[name][metric]
            scale = 1 if metric == "wall_s" or metric.startswith("train/") else 100  # rates in %
            cell = f"{scale * row['median']:.2f} ({scale * row['min']:.2f}–{scale * row['max']:.2f})"
            delta = next((v for k, v in row.items() if k.startswith("delta_vs_")), None)
            if delta:
                cell += f"; Δ {scale * delta['median']:+.2f} ({scale * delta['min']:+.2f}…{scale * delta['max']:+.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="overrides applied to every variant")
    parser.add_argument("--out", type=Path, help="also write the results JSON here")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temp folder)")
    args = parser.parse_args()
    variants = {name: [*args.set, *VARIANTS[name]] for name in (args.only or VARIANTS)}
    check_variants(args.config, variants)

    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for seed in args.seeds:
            for name, overrides in variants.items():  # interleaved: A B C, A B C, ...
                out = root / f"{name}-seed{seed}"
                wall = run_training(train_command(args.config, out, args.steps, seed, overrides), args.ranks)
                metrics = {**run_metrics(out, skip_steps=min(100, args.steps // 3)), "wall_s": wall}
                results[name].append(metrics)
                shown = {k: round(v, 4) for k, v in metrics.items() if "per_class" not in k}
                print(f"seed {seed} {name}: {shown}", flush=True)

    table = summarize(results, args.seeds)
    report = {
        "machine": machine_description(),
        "config": args.config,
        "steps": args.steps,
        "ranks": args.ranks,
        "seeds": args.seeds,
        "variants": variants,
        "table": table,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(markdown(table))


if __name__ == "__main__":
    main()
