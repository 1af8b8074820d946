"""Training throughput: clip-pipe's trainer against open_clip's own (open_clip_train), side by side.

Same shards, model, batch per rank, ranks, precision, optimizer, lr schedule, clipping and launcher
(torchrun, one thread per rank). Runs alternate (ours, theirs, ours, theirs ...). Each tool trains
twice per round, to a short and a long step count, so that:

- wall time to N steps = the long run's whole-process time (start-up, data, training, final save);
- steady-state samples/s = global batch × (long − short steps) / (long − short wall time), which cancels
  start-up on both sides in the same way.

    python -m bench.train_throughput --shards data/fashion_mnist/train [--rounds 2]

Needs the demo's shards (`python data_prep/fashion_mnist.py --out data/fashion_mnist`).
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


def ours(shards: Path, out: Path, steps: int, batch: int) -> list[str]:
    return [
        "launch/train.py", "--config", "configs/fashion_mnist.yaml", f"data.train={shards}", "eval.sets=[]",
        f"data.batch_size={batch}", f"run.steps={steps}", f"run.out_dir={out}", f"run.checkpoint_every={steps}",
        "run.zero_stage=0", "run.precision=fp32", "data.num_workers=0",
    ]  # fmt: skip


def theirs(shards: Path, out: Path, steps: int, batch: int, wrapper: Path) -> list[str]:
    urls = "::".join(str(p) for p in sorted(shards.glob("*.tar")))
    return [
        str(wrapper), str(REPO / "clip_pipe" / "model_configs"), "--train-data", urls, "--dataset-type", "webdataset",
        "--dataset-resampled", f"--train-num-samples={steps * batch * 2}", "--epochs=1", f"--batch-size={batch}",
        "--workers=0", f"--model={MODEL}", "--lr=2e-3", "--wd=0.1", "--warmup=100", "--beta2=0.98", "--eps=1e-6",
        "--grad-clip-norm=1.0", "--precision=fp32", "--local-loss", "--gather-with-grad", "--log-every-n-steps=50",
        "--name=bench", "--report-to=", "--zeroshot-frequency=0", "--val-frequency=0",
    ]  # fmt: skip


def timed(args: list[str], env: dict, out: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, env={**env, "BENCH_OPEN_CLIP_LOGS": str(out)}, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=Path, default=REPO / "data/fashion_mnist/train")
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--short", type=int, default=60)
    parser.add_argument("--long", type=int, default=360)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "CLIP_PIPE_SKIP_SHM_BUILD": "1", "OMP_NUM_THREADS": "1"}
    global_batch = 2 * args.batch

    results: dict[str, list[dict]] = {"clip-pipe": [], "open_clip_train": []}
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = Path(tmp) / "open_clip_train_wrapper.py"
        wrapper.write_text(OPEN_CLIP_WRAPPER)
        for round_index in range(args.rounds):
            for name in results:  # interleaved: A B A B
                walls = {}
                for steps in (args.short, args.long):
                    out = Path(tmp) / f"{name}-{round_index}-{steps}"
                    cmd = (
                        ours(args.shards, out, steps, args.batch)
                        if name == "clip-pipe"
                        else theirs(args.shards, out, steps, args.batch, wrapper)
                    )
                    walls[steps] = timed(cmd, env, out)
                steady = global_batch * (args.long - args.short) / (walls[args.long] - walls[args.short])
                results[name].append({"wall": walls[args.long], "steady": steady})
                print(
                    f"round {round_index} {name}: {walls[args.long]:.1f} s to {args.long} steps, {steady:.0f} samples/s"
                )

    ours_r, theirs_r = results["clip-pipe"], results["open_clip_train"]
    steady_ratios = [a["steady"] / b["steady"] for a, b in zip(ours_r, theirs_r, strict=True)]
    wall_ratios = [b["wall"] / a["wall"] for a, b in zip(ours_r, theirs_r, strict=True)]
    table = {
        "machine": machine_description(),
        "setting": f"{MODEL}, 2 ranks x {args.batch}, fp32, torchrun, 1 thread/rank, loader in-process",
        "steady_samples_per_s": {
            "clip-pipe": statistics.median(r["steady"] for r in ours_r),
            "open_clip_train": statistics.median(r["steady"] for r in theirs_r),
            "ratio_median": statistics.median(steady_ratios),
            "ratio_range": [min(steady_ratios), max(steady_ratios)],
        },
        f"wall_s_to_{args.long}_steps": {
            "clip-pipe": statistics.median(r["wall"] for r in ours_r),
            "open_clip_train": statistics.median(r["wall"] for r in theirs_r),
            "speedup_median": statistics.median(wall_ratios),
            "speedup_range": [min(wall_ratios), max(wall_ratios)],
        },
    }
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
