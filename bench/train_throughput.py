"""Training throughput: clip-pipe's trainer against open_clip's own (open_clip_train), side by side.

Same shards, model, batch per rank, ranks, precision, optimizer, lr schedule, clipping and launcher
(torchrun, one thread per rank, each tool's loader in the trainer's process). Runs alternate (ours,
theirs, ours, theirs ...). Each tool trains twice per round, to a short and a long step count, so that:

- wall time to N steps = the long run's whole-process time (start-up, data, training, final save);
- steady-state samples/s = global batch × (long − short steps) / (long − short wall time), which cancels
  start-up on both sides in the same way;
- logged samples/s = the median of each tool's own logged throughput over the long run's windows
  (first left out): a second steady-state figure, less hurt by a noisy machine than the difference;
- accuracy at equal steps: each long run's final weights are evaluated zero-shot (untimed, by the same
  code for both tools) on `--eval-set`; round r trains with seed r, so the rounds are the seeds.

Precision: `fp32`, or `bf16` (open_clip_train `--precision amp_bf16`, ours `run.precision=bf16`).
`--baseline NAME=DIR` (repeatable) adds another clip-pipe checkout (e.g. the commit before a change),
so that each change is measured against what it replaces in the same interleaved run.

    python -m bench.train_throughput --shards data/fashion_mnist/train [--precision fp32 bf16] [--rounds 3]

Needs the demo's shards (`python data_prep/fashion_mnist.py --out data/fashion_mnist`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine_description

REPO = Path(__file__).resolve().parents[1]

MODEL = "clip-pipe-tiny-28"

# open_clip_train, with our tiny model config registered first (it only knows open_clip's own names).
# Three shims, none touching the training maths:
# - open_clip_train gives DDP device_ids=[cpu], which torch 2.14 rejects; CPU modules take none.
# - its group_by_keys_nothrow crashes (KeyError 'fname') on the end-of-shard marker {} that
#   webdataset 1.x yields; the markers are dropped before it.
# - `--logs` travels in the environment: torchrun's parser would take it for its own `--logs-specs`.
OPEN_CLIP_WRAPPER = """
import os, sys, open_clip, torch
import open_clip_train.data as oc_data
open_clip.add_model_config(sys.argv.pop(1))
group_by_keys = oc_data.group_by_keys_nothrow
oc_data.group_by_keys_nothrow = lambda data, *a, **k: group_by_keys((s for s in data if s), *a, **k)
DDP = torch.nn.parallel.DistributedDataParallel
class CpuDDP(DDP):
    def __init__(self, module, device_ids=None, **kwargs):
        on_cpu = device_ids and torch.device(device_ids[0]).type == "cpu"
        super().__init__(module, device_ids=None if on_cpu else device_ids, **kwargs)
torch.nn.parallel.DistributedDataParallel = CpuDDP
from open_clip_train.main import main
main([*sys.argv[1:], "--logs", os.environ["BENCH_OPEN_CLIP_LOGS"]])
"""


def ours(
    shards: Path, out: Path, steps: int, batch: int, precision: str, seed: int, log_every: int
) -> list[str]:
    return [
        "launch/train.py", "--config", "configs/fashion_mnist.yaml", f"model.name={MODEL}", f"data.train={shards}",
        "eval.sets=[]", "eval.retrieval_sets=[]", "eval.linear_probe_train=null", f"data.batch_size={batch}", f"run.steps={steps}", f"run.out_dir={out}",
        f"run.checkpoint_every={steps}", "run.zero_stage=0", f"run.precision={precision}", "data.num_workers=0",
        "optim.lr=2e-3", "optim.warmup_steps=100", "optim.weight_decay=0.1", "optim.grad_clip=1.0",
        "data.shuffle_buffer=2000", f"run.seed={seed}", f"data.seed={seed}", f"run.log_every={log_every}",
    ]  # fmt: skip


def theirs(
    shards: Path, out: Path, steps: int, batch: int, precision: str, seed: int, log_every: int, wrapper: Path
) -> list[str]:
    urls = "::".join(str(p) for p in sorted(shards.glob("*.tar")))
    return [
        str(wrapper), str(REPO / "clip_pipe" / "model_configs"), "--train-data", urls, "--dataset-type", "webdataset",
        "--dataset-resampled", f"--train-num-samples={steps * batch * 2}", "--epochs=1", f"--batch-size={batch}",
        "--workers=0", f"--model={MODEL}", "--lr=2e-3", "--wd=0.1", "--warmup=100", "--beta2=0.98", "--eps=1e-6",
        "--grad-clip-norm=1.0", f"--precision={'amp_bf16' if precision == 'bf16' else 'fp32'}", "--local-loss",
        "--gather-with-grad", f"--log-every-n-steps={log_every}", "--name=bench", "--report-to=", "--zeroshot-frequency=0",
        "--val-frequency=0", f"--seed={seed}",
    ]  # fmt: skip


def zeroshot_top1(name: str, out: Path, eval_set: Path) -> float:
    """Zero-shot top-1 of a finished long run's final weights, by clip-pipe's evaluator for both tools."""
    import torch

    from clip_pipe.config import ModelConfig
    from clip_pipe.eval import evaluate
    from clip_pipe.eval.sets import read_eval_set
    from clip_pipe.model import build_model, load_export

    if name == "open_clip_train":
        state = torch.load(out / "bench/checkpoints/epoch_1.pt", map_location="cpu", weights_only=True)
        encoder = build_model(ModelConfig(name=MODEL))
        state = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
        state["logit_scale"] = state["logit_scale"].reshape(encoder.model.logit_scale.shape)
        encoder.model.load_state_dict(state)
    else:
        encoder = load_export(out / "model.safetensors")
    result = evaluate(encoder.model, encoder.preprocess_val, encoder.tokenizer, read_eval_set(eval_set), 512)
    return result["top1"]


def logged_samples_per_s(name: str, out: Path) -> float:
    """Median of the tool's own logged global samples/s over the long run's windows, the first left out."""
    if name == "open_clip_train":
        log = (out / "bench/out.log").read_text()
        rates = [float(r) for r in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log)]
    else:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    return statistics.median(rates[1:])


def timed(args: list[str], env: dict, out: Path, src: Path = REPO) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args]
    start = time.perf_counter()
    env = {**env, "BENCH_OPEN_CLIP_LOGS": str(out), "PYTHONPATH": str(src)}
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


def summary(results: dict[str, list[dict]], reference: str, long: int) -> dict:
    out = {}
    for name, runs in results.items():
        out[name] = {
            "steady_samples_per_s": statistics.median(r["steady"] for r in runs),
            "logged_samples_per_s": statistics.median(r["logged"] for r in runs),
            f"wall_s_to_{long}_steps": statistics.median(r["wall"] for r in runs),
            "zeroshot_top1_per_seed": [r["top1"] for r in runs],
        }
        if name != reference:
            steady = [a["steady"] / b["steady"] for a, b in zip(runs, results[reference], strict=True)]
            wall = [b["wall"] / a["wall"] for a, b in zip(runs, results[reference], strict=True)]
            logged = [a["logged"] / b["logged"] for a, b in zip(runs, results[reference], strict=True)]
            out[name][f"logged_ratio_vs_{reference}"] = {
                "median": statistics.median(logged),
                "range": [min(logged), max(logged)],
            }
            out[name][f"steady_ratio_vs_{reference}"] = {
                "median": statistics.median(steady),
                "range": [min(steady), max(steady)],
            }
            out[name][f"wall_speedup_vs_{reference}"] = {
                "median": statistics.median(wall),
                "range": [min(wall), max(wall)],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=Path, default=REPO / "data/fashion_mnist/train")
    parser.add_argument("--eval-set", type=Path, default=REPO / "data/fashion_mnist/eval")
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--short", type=int, default=50)
    parser.add_argument("--long", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="also the seeds: round r trains with seed r")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another clip-pipe checkout to time too",
    )
    parser.add_argument("--no-open-clip", action="store_true", help="time clip-pipe (and --baseline) only")
    parser.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluations")
    parser.add_argument("--log-every", type=int, default=50, help="both tools log samples/s every N steps")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    global_batch = 2 * args.batch
    checkouts = {"clip-pipe": REPO, **{b.split("=", 1)[0]: Path(b.split("=", 1)[1]) for b in args.baseline}}
    names = [*checkouts] + ([] if args.no_open_clip else ["open_clip_train"])
    reference = names[-1]  # open_clip_train, or without it the last baseline

    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = Path(tmp) / "open_clip_train_wrapper.py"
        wrapper.write_text(OPEN_CLIP_WRAPPER)
        for precision in args.precision:
            results: dict[str, list[dict]] = {name: [] for name in names}
            for seed in range(args.rounds):
                for name in names:  # interleaved: A B A B
                    walls = {}
                    for steps in (args.short, args.long):
                        out = Path(tmp) / f"{precision}-{name}-{seed}-{steps}"
                        if name == "open_clip_train":
                            cmd, src = (
                                theirs(
                                    args.shards,
                                    out,
                                    steps,
                                    args.batch,
                                    precision,
                                    seed,
                                    args.log_every,
                                    wrapper,
                                ),
                                REPO,
                            )
                        else:
                            cmd = ours(args.shards, out, steps, args.batch, precision, seed, args.log_every)
                            src = checkouts[name]
                        walls[steps] = timed(cmd, env, out, src)
                    steady = global_batch * (args.long - args.short) / (walls[args.long] - walls[args.short])
                    top1 = None if args.no_eval else zeroshot_top1(name, out, args.eval_set)
                    logged = logged_samples_per_s(name, out)
                    results[name].append(
                        {"wall": walls[args.long], "steady": steady, "logged": logged, "top1": top1}
                    )
                    print(
                        f"{precision} seed {seed} {name}: {walls[args.long]:.1f} s to {args.long} steps, "
                        f"{steady:.0f} samples/s, logged {logged:.0f} samples/s, zero-shot top-1 {top1}", flush=True,
                    )  # fmt: skip
            tables[precision] = summary(results, reference, args.long)

    table = {
        "machine": machine_description(),
        "setting": f"{MODEL}, 2 ranks x {args.batch}, torchrun, 1 thread/rank, loader in the trainer's process, "
        f"{args.rounds} seeds, top-1 on {args.eval_set} after {args.long} steps",
        **tables,
    }
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
