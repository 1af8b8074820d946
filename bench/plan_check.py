"""The planner (`clip-pipe plan`) against measurements here and against published runs.

Four parts, each a table of predicted against measured (or published), with the ratio:

- `loss`: peak memory of the tiled loss and open_clip's ClipLoss at B_local 1k-8k (dim 512, 2 gloo
  ranks, fp32), by `bench.loss`'s own method: a fresh pair of processes per point, the rise of peak
  RSS (VmHWM, reset through /proc/self/clear_refs) over one forward + backward.
- `engine`: clip-pipe's DeepSpeed engine, 2 ranks, ZeRO 0-3, fp32 and bf16, on a small model: the
  rise of each rank's peak RSS over its RSS before the model was built, through 3 training steps.
- `checkpointing`: one process, open_clip's ViT-B/32 (224 px) in fp32, with and without
  `set_grad_checkpointing(True)`: the rise of peak RSS over one forward + backward (gradients already
  allocated by a warm-up step, so the rise is activations, the loss and the backward's transients).
- `published`: the one utilisation fitted to open_clip's ViT-B/32 run, then open_clip's B/16, L/14,
  H/14 and DataComp's xlarge run predicted; the Inf-CL paper's loss-memory table.

Every process runs with glibc's `MALLOC_MMAP_THRESHOLD_=65536`: each allocation of 64 KiB or more is
its own mapping, handed back to the system when freed, so RSS follows the live tensors the way a GPU
allocator's count does. Without it glibc raises the threshold after the first large free and serves
later tensors from a heap it never shrinks, and RSS keeps memory that no tensor holds
(`--glibc-default` measures that way too, for comparison).

    python -m bench.plan_check [--parts loss engine checkpointing published] [--glibc-default]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

MMAP_THRESHOLD = "65536"
GIB, MIB = 2**30, 2**20
WORLD = 2


def engine_model(width: int, layers: int) -> dict:
    """17 image tokens and 16 text tokens, a small vocabulary: model states dominate, a step takes seconds."""
    return {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": width, "layers": layers, "head_width": 32},
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 1000,
            "width": width,
            "heads": width // 32,
            "layers": layers,
        },
    }


# The engine part's models: one with almost no parameters (0.1M) measures what the engine costs
# whatever the model (DeepSpeed's and gloo's own buffers, Python objects); two sizes check the formula.
ENGINE_MODELS = {
    "fixed cost": engine_model(32, 1),
    "38.7M": engine_model(512, 6),
    "115M": engine_model(768, 8),
}
ENGINE_BATCH = 4  # per rank


def status_bytes(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


# --- engine ------------------------------------------------------------------------------------


def engine_worker(rank: int, port: int, stage: int, precision: str, model_cfg: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD), CLIP_PIPE_SKIP_SHM_BUILD="1",
    )  # fmt: skip
    import torch

    from clip_pipe.config import load_config
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group
    from clip_pipe.losses import TiledClipLoss
    from clip_pipe.model import create

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    cfg = load_config(
        None,
        [
            "data.train=/unused", f"data.batch_size={ENGINE_BATCH}", f"run.zero_stage={stage}",
            f"run.precision={precision}", "optim.grad_clip=1.0", "run.steps=3",
        ],
    )  # fmt: skip
    loss_fn = TiledClipLoss(rank, WORLD)
    g = torch.Generator().manual_seed(rank)
    size, context = model_cfg["vision_cfg"]["image_size"], model_cfg["text_cfg"]["context_length"]
    batches = [
        (torch.randn(ENGINE_BATCH, 3, size, size, generator=g), torch.randint(1, 999, (ENGINE_BATCH, context), generator=g))
        for _ in range(3)
    ]  # fmt: skip
    gc.collect()
    torch.distributed.barrier()
    before = status_bytes("VmRSS")
    torch.manual_seed(0)
    engine = Engine(create(model_cfg).model, cfg, WORLD)
    after_init = status_bytes("VmRSS")
    reset_peak()  # the step's peak, not the set-up's (which builds the model on the CPU first)
    for images, texts in batches:
        engine.train_step(images, texts, loss_fn, lr=1e-4)
    rises = [None] * WORLD
    torch.distributed.all_gather_object(
        rises, {"peak": status_bytes("VmHWM") - before, "after_init": after_init - before}
    )
    if rank == 0:
        Path(out).write_text(json.dumps(rises))
    # Free the engine (it lives in reference cycles) before leaving the group, or gloo's threads can
    # abort the process at exit (see clip_pipe.engine._leave_process_group).
    del engine
    gc.collect()
    torch.distributed.destroy_process_group()


def engine_part(model_names: list[str], precisions: list[str], stages: list[int]) -> list[dict]:
    import bench.loss as bl  # its spawn: WORLD fresh processes, rank 0's result
    from clip_pipe.plan import Setup
    from clip_pipe.plan.planner import model_view, peak_memory

    rows = []
    for precision in precisions:
        for stage in stages:
            fixed = None
            for name in ["fixed cost", *model_names]:
                model_cfg = ENGINE_MODELS[name]
                start = time.monotonic()
                rises = bl.spawn(engine_worker, stage, precision, model_cfg)
                measured = max(r["peak"] for r in rises)
                setup = Setup(name, WORLD, WORLD * ENGINE_BATCH, zero_stage=stage, precision=precision)
                m = model_view(setup, model_cfg)
                predicted, phase, _ = peak_memory(setup, m, ENGINE_BATCH, touched_only=True)
                row = {
                    "model": name, "precision": precision, "zero_stage": stage, "num_params": m.arch.num_params,
                    "predicted_mib": predicted / MIB, "measured_mib": measured / MIB, "ratio": predicted / measured,
                    "phase": phase, "seconds": time.monotonic() - start,
                }  # fmt: skip
                if fixed is None:
                    fixed = measured - predicted
                    row["fixed_cost_mib"] = fixed / MIB
                    del row["ratio"]  # a calibration, not a check
                else:
                    row["ratio_with_fixed_cost"] = (predicted + fixed) / measured
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# --- loss --------------------------------------------------------------------------------------


def loss_part(sizes: list[int], dim: int, tile: int) -> list[dict]:
    import bench.loss as bl
    from clip_pipe.plan import memory

    rows = []
    for batch in sizes:
        for name in (bl.OURS, bl.THEIRS):
            result = bl.spawn(bl.memory_worker, name, batch, dim, tile, int(16 * GIB))
            if name == bl.OURS:
                predicted = memory.tiled_loss_bytes(batch, bl.WORLD, dim, tile)
            else:
                predicted = memory.clip_loss_bytes(batch, bl.WORLD, dim)
            measured = result["peak_rise_bytes"]
            rows.append(
                {
                    "loss": name, "B_local": batch, "predicted_mib": predicted / MIB,
                    "measured_mib": measured / MIB, "ratio": predicted / measured,
                }
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- checkpointing -----------------------------------------------------------------------------


def checkpointing_worker(model_name: str, batch: int, checkpointing: bool, out: str) -> None:
    import open_clip
    import torch

    from clip_pipe.losses import TiledClipLoss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = open_clip.create_model(model_name).train()
    model.set_grad_checkpointing(checkpointing)
    loss_fn = TiledClipLoss()
    size, context = model.visual.image_size[0], model.context_length
    images, texts = torch.randn(batch, 3, size, size), torch.randint(1, 49000, (batch, context))

    def step() -> float:
        start = time.perf_counter()
        image, text, scale = model(images, texts)
        loss_fn(image, text, scale).backward()
        return time.perf_counter() - start

    step()  # warm-up: kernels, and every gradient allocated
    model.zero_grad(set_to_none=False)  # keep them: the measured step accumulates in place
    gc.collect()
    before = status_bytes("VmRSS")
    reset_peak()
    seconds = step()
    Path(out).write_text(json.dumps({"rise": status_bytes("VmHWM") - before, "seconds": seconds}))


def checkpointing_part(model_name: str, batches: list[int]) -> list[dict]:
    from clip_pipe.plan import arch, memory

    a = arch.architecture(model_name)
    rows = []
    for batch in batches:
        for checkpointing in (False, True):
            result = spawn_one(checkpointing_worker, model_name, batch, checkpointing)
            image, text = (
                memory.tower_activations(t, t.num_layers, checkpointing) for t in (a.image, a.text)
            )
            saved = (image.saved.nbytes(4) + text.saved.nbytes(4)) * batch
            working = max(image.working.nbytes(4), text.working.nbytes(4)) * batch
            loss = memory.tiled_loss_bytes(batch, 1, a.embed_dim, 1024)
            # gradients exist already: each new one is a transient before it is added in
            predicted = memory.backward_peak(image, text, batch, 4, loss, 4 * a.num_token_embedding)
            rows.append(
                {
                    "model": model_name, "batch": batch, "checkpointing": checkpointing,
                    "predicted_mib": predicted / MIB, "saved_mib": saved / MIB, "working_mib": working / MIB,
                    "measured_mib": result["rise"] / MIB, "ratio": predicted / result["rise"],
                    "step_s": result["seconds"],
                }
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- published runs ----------------------------------------------------------------------------

# open_clip's published training runs on A100-40GB (LAION-2B): samples/s per GPU, GPUs, global batch.
OPEN_CLIP_B32 = {"model": "ViT-B-32", "num_gpus": 128, "global_batch": 32768, "samples_per_s": (787, 850)}
OPEN_CLIP_RUNS = [
    {"model": "ViT-B-16", "num_gpus": 176, "global_batch": 33792, "samples_per_s": 337, "ckpt": False},
    {"model": "ViT-L-14", "num_gpus": 400, "global_batch": 38400, "samples_per_s": (71, 79), "ckpt": True},
    {"model": "ViT-H-14", "num_gpus": 824, "global_batch": 79104, "samples_per_s": 42, "ckpt": True},
]
# Inf-CL (Cheng et al. 2024), ViT-L/14 on 8 A800s: loss memory in GB, OpenCLIP local loss and Inf-CL.
INF_CL = {32768: (2.27, 0.18), 65536: (8.63, 0.36), 131072: (33.64, 0.72)}
# DataComp xlarge: ViT-L/14, 12.8B samples seen, 512 A100s, 81 hours, global batch 90,112.
DATACOMP = {
    "model": "ViT-L-14",
    "num_gpus": 512,
    "global_batch": 90112,
    "num_samples": 12_800_000_000,
    "hours": 81,
}


def _mid(x) -> float:
    return sum(x) / 2 if isinstance(x, tuple) else x


def published_part() -> dict:
    from clip_pipe.plan import Setup, fit_utilisation, plan
    from clip_pipe.plan.memory import clip_loss_bytes, tiled_loss_bytes

    # open_clip trains with DDP, which reduces gradients in 25 MB buckets behind the backward pass, and
    # its ClipLoss (local loss, features gathered with gradients).
    base = Setup(
        OPEN_CLIP_B32["model"], OPEN_CLIP_B32["num_gpus"], OPEN_CLIP_B32["global_batch"], gpu="A100-40GB",
        zero_stage=0, overlap_grad_comm=True, loss="clip",
    )  # fmt: skip
    low, high = OPEN_CLIP_B32["samples_per_s"]
    fits = {
        name: fit_utilisation(base, x)
        for name, x in (("low", low), ("mid", (low + high) / 2), ("high", high))
    }
    u = fits["mid"]
    throughput = []
    for run in OPEN_CLIP_RUNS:
        for ckpt in sorted({run["ckpt"], False}, reverse=True):
            setup = replace(
                base, model=run["model"], num_gpus=run["num_gpus"], global_batch=run["global_batch"],
                grad_checkpointing=ckpt, utilisation=u,
            )  # fmt: skip
            p = plan(setup)
            predicted = p.time["samples_per_s_per_gpu"]
            throughput.append(
                {
                    "run": f"open_clip {run['model']}", "checkpointing": ckpt,
                    "as_published": ckpt == run["ckpt"], "predicted": predicted,
                    "published": run["samples_per_s"], "ratio": predicted / _mid(run["samples_per_s"]),
                    # what the published figure implies, and whether the setup fits a 40 GB A100 at all
                    "implied_utilisation": fit_utilisation(setup, _mid(run["samples_per_s"])),
                    "peak_gib": p.memory["peak"] / GIB, "fits": p.memory["fits"],
                }
            )  # fmt: skip
    # B/32 at 824 GPUs, 96 per GPU: 228 samples/s per GPU published (gradient traffic dominates)
    setup = replace(base, num_gpus=824, global_batch=824 * 96, utilisation=u)
    p = plan(setup)
    throughput.append(
        {
            "run": "open_clip ViT-B-32 at 824 GPUs, 96 per GPU", "checkpointing": False, "as_published": True,
            "predicted": p.time["samples_per_s_per_gpu"], "published": 228,
            "ratio": p.time["samples_per_s_per_gpu"] / 228, "comms_s": p.comms,
            "compute_s": p.time["compute_s"],
        }
    )  # fmt: skip
    datacomp = []
    for ckpt in (True, False):
        setup = replace(
            base, model=DATACOMP["model"], num_gpus=DATACOMP["num_gpus"], global_batch=DATACOMP["global_batch"],
            num_samples=DATACOMP["num_samples"], grad_checkpointing=ckpt, utilisation=u,
        )  # fmt: skip
        p = plan(setup)
        datacomp.append(
            {
                "checkpointing": ckpt, "predicted_hours": p.run["wall_hours"], "published_hours": DATACOMP["hours"],
                "ratio": p.run["wall_hours"] / DATACOMP["hours"],
                "predicted_samples_per_s_per_gpu": p.time["samples_per_s_per_gpu"],
                "published_samples_per_s_per_gpu": DATACOMP["num_samples"] / DATACOMP["hours"] / 3600 / DATACOMP["num_gpus"],
            }
        )  # fmt: skip
    inf_cl = []
    for batch, (local, infcl) in INF_CL.items():
        b = batch // 8
        ours_clip = clip_loss_bytes(b, 8, 768) / GIB
        ours_tiled = tiled_loss_bytes(b, 8, 768, 1024) / GIB
        inf_cl.append(
            {
                "global_batch": batch, "clip_predicted_gib": ours_clip, "clip_published": local,
                "clip_ratio": ours_clip / local, "tiled_predicted_gib": ours_tiled, "inf_cl_published": infcl,
                "tiled_to_inf_cl_ratio": ours_tiled / infcl,
            }
        )  # fmt: skip
    return {"utilisation_fit": fits, "throughput": throughput, "datacomp": datacomp, "inf_cl": inf_cl}


# --- processes ---------------------------------------------------------------------------------


def spawn_one(fn, *args, timeout: float = 1800) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/out.json"
        process = mp.get_context("spawn").Process(target=fn, args=(*args, out))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            raise RuntimeError(f"{fn.__name__}{args} still running after {timeout} s")
        if process.exitcode != 0:
            raise RuntimeError(f"{fn.__name__}{args} failed with exit code {process.exitcode}")
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts", nargs="+", default=["published", "engine", "checkpointing", "loss"],
        choices=["published", "engine", "checkpointing", "loss"],
    )  # fmt: skip
    parser.add_argument(
        "--engine-models", nargs="+", default=["38.7M", "115M"], choices=list(ENGINE_MODELS)[1:]
    )
    parser.add_argument("--engine-precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--engine-stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--loss-sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--ckpt-model", default="ViT-B-32")
    parser.add_argument("--ckpt-batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc thresholds alone")
    args = parser.parse_args()
    if not args.glibc_default:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # read by each spawned process at start
    from bench.common import machine_description

    results = {}
    if "published" in args.parts:
        results["published"] = published_part()
        print(json.dumps(results["published"], indent=1), flush=True)
    if "engine" in args.parts:
        results["engine"] = engine_part(args.engine_models, args.engine_precisions, args.engine_stages)
    if "checkpointing" in args.parts:
        results["checkpointing"] = checkpointing_part(args.ckpt_model, args.ckpt_batches)
    if "loss" in args.parts:
        results["loss"] = loss_part(args.loss_sizes, 512, 1024)
    measured = [
        r["ratio"]
        for part in ("engine", "checkpointing", "loss")
        for r in results.get(part, [])
        if "ratio" in r
    ]
    if measured:
        results["summary"] = {
            "median_ratio": statistics.median(measured), "min_ratio": min(measured), "max_ratio": max(measured),
            "within_15_percent": sum(0.85 <= r <= 1.15 for r in measured), "num_points": len(measured),
        }  # fmt: skip
    results.update(
        machine=machine_description(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"), command=" ".join(sys.argv),
    )  # fmt: skip
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
