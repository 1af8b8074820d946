"""Patch dropout (FLIP) on the demo: zero-shot accuracy on the validation split, with and without the unmasked
tune, and at equal training time. Real 2-rank runs of `launch/train.py` with the demo's recipe
(configs/fashion_mnist.yaml), shortened to `--steps`, evaluated on data/fashion_mnist/val only (never the
test images).

For each seed, the three masking ratios run back to back (0, 0.5, 0.75), so each pair of runs saw about
the same load on a shared machine. Then:
- the unmasked tune: each masked run is resumed from its final checkpoint and trained `--tune-steps` more
  steps unmasked (`optim.tune_steps`, lr from optim.lr / 100). Every step before the tune is the main run's,
  so the resumed run is exactly the run `run.steps=N+T optim.tune_steps=T` would be (lr and masks are pure
  functions of the step), at the cost of T steps rather than N + T;
- equal time: each masked ratio runs again, from scratch, for as many steps as fit in the wall time the
  unmasked run took (steps x the median over seeds of t(0) / t(ratio), the training seconds each run logs).

    python -m bench.patch_dropout_demo [--steps 300 --tune-steps 30 --seeds 0 1 2 --equal-time-seeds 0] [--out runs/bench_pd]

Results go to OUT/results.jsonl as they come (a rerun skips the runs already there); the table is printed last.
`--config`, `--eval-set`, `--set`, `--ranks` and `--ratios` run the same comparison on other data or a
smaller scale (tests/test_bench_smoke.py runs it on the tiny recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from clip_pipe.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def train(
    out: Path, config: str, num_ranks: int, eval_set: Path, overrides: list[str], resume: bool = False
) -> dict:
    evaluation = [f"eval.sets=[{eval_set}]", "eval.retrieval_sets=[]", "eval.linear_probe_train=null"]
    command = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_ranks), f"--master_port={free_port()}",
        "launch/train.py", "--config", config,
        f"run.out_dir={out}", "run.log_every=50", *evaluation, *overrides,
        *(["--resume", "latest"] if resume else []),
    ]  # fmt: skip
    env = {**os.environ, "CLIP_PIPE_SKIP_SHM_BUILD": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log = (out / "train.log").read_text()
    done = re.findall(r"done: (\d+) steps in (\d+) s \((\d+) samples/s overall\)", log)[-1]
    top1 = json.loads((out / "eval.json").read_text())[eval_set.name]["top1"]  # results by folder name
    return {
        "steps_run": int(done[0]),
        "train_s": float(done[1]),
        "samples_per_s": float(done[2]),
        "top1": top1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tune-steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--equal-time-seeds", type=int, nargs="*", help="default: --seeds")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_patch_dropout")
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--eval-set", type=Path, default=Path("data/fashion_mnist/val"),
                        help="the zero-shot set reported (the demo's validation slice, never its test images)")  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], help="overrides applied to every run")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75],
                        help="masking ratios; the first is the unmasked run, 0")  # fmt: skip
    args = parser.parse_args()
    if args.ratios[0] != 0 or len(args.ratios) < 2:
        parser.error("--ratios: 0 (the unmasked run) first, then at least one masking ratio")
    ratios = args.ratios
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    done = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            done[r["name"]] = r

    def run(name: str, overrides: list[str], resume_from: Path | None = None, **fields) -> dict:
        if name in done:
            return done[name]
        out = args.out / name
        if out.exists():
            shutil.rmtree(out)
        if resume_from is not None:
            shutil.copytree(resume_from, out)
        result = train(
            out, args.config, args.ranks, args.eval_set, [*args.set, *overrides], resume_from is not None
        )
        record = {"name": name, **fields, **result}
        with results_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done[name] = record
        print(json.dumps(record), flush=True)
        return record

    def seeded(seed: int) -> list[str]:
        return [f"run.seed={seed}", f"data.seed={seed}", f"run.checkpoint_every={10 * args.steps}"]

    base = {}
    for seed in args.seeds:
        for ratio in ratios:
            base[seed, ratio] = run(
                f"p{ratio}_s{seed}", [*seeded(seed), f"run.steps={args.steps}", f"model.patch_dropout={ratio}"],
                ratio=ratio, seed=seed, variant="masked" if ratio else "unmasked",
            )  # fmt: skip
    for seed in args.seeds:
        for ratio in ratios[1:]:
            steps = args.steps + args.tune_steps
            run(
                f"p{ratio}_s{seed}_tune", [*seeded(seed), f"run.steps={steps}", f"model.patch_dropout={ratio}",
                                           f"optim.tune_steps={args.tune_steps}"],
                resume_from=args.out / f"p{ratio}_s{seed}", ratio=ratio, seed=seed, variant="tuned",
            )  # fmt: skip
    # t(0) / t(ratio) over the same steps and batch, from samples/s: the log rounds train_s to whole seconds.
    speedup = {
        ratio: statistics.median(
            base[s, ratio]["samples_per_s"] / base[s, 0.0]["samples_per_s"] for s in args.seeds
        )
        for ratio in ratios[1:]
    }
    for seed in args.seeds if args.equal_time_seeds is None else args.equal_time_seeds:
        for ratio in ratios[1:]:
            steps = round(args.steps * speedup[ratio])
            run(
                f"p{ratio}_s{seed}_equal_time", [*seeded(seed), f"run.steps={steps}", f"model.patch_dropout={ratio}"],
                ratio=ratio, seed=seed, variant="equal time", planned_steps=steps,
            )  # fmt: skip

    rows = {}
    for r in done.values():
        rows.setdefault((r["ratio"], r["variant"]), []).append(r)
    print(
        f"\n{args.config} {' '.join(args.set)}, {args.steps} steps ({args.ranks} ranks), zero-shot top-1 on "
        f"{args.eval_set}"
    )
    print(
        f"{'patch dropout':<14} {'variant':<11} {'steps':>6} {'top-1 mean':>10} {'min-max':>14} {'train s':>8} {'n':>2}"
    )
    for (ratio, variant), records in sorted(rows.items()):
        top1 = [100 * r["top1"] for r in records]
        steps = sorted({r["steps_run"] for r in records})
        print(
            f"{ratio:<14} {variant:<11} {'/'.join(map(str, steps)):>6} {statistics.mean(top1):>9.2f}% "
            f"{min(top1):>6.2f}-{max(top1):.2f}% {statistics.median(r['train_s'] for r in records):>8.0f} {len(records):>2}"
        )
    print("train-time speedup over unmasked (median over seeds): "
          + ", ".join(f"{k}: {v:.2f}x" for k, v in speedup.items()))  # fmt: skip


if __name__ == "__main__":
    main()
