"""The levers on one GPU: a correctness check of each, then ViT-B/16 timed with and without patch dropout and
activation checkpointing, each beside the planner's prediction for this GPU (when the planner is there).

Checks (each raises, and the script exits non-zero, on a wrong result):
- patch dropout: training passes see (1 - p) of the patches, eval passes all; the masks are a function of
  (seed, step, rank, micro-batch) on this device too;
- activation checkpointing: the blocks run twice, and the gradients equal those without it (bf16 and fp32);
- locked image tower: frozen weights do not move, Adam holds state for the trainable ones only;
- run.compile: the compiled model's loss on a fixed batch equals eager's (fp32, TF32 off).
Timings: ViT-B/16, 224 px, bf16, ZeRO-0, one rank, `--batch` per step, steady-state samples/s over
`--steps` after warm-up, peak CUDA memory, MFU against the chip's measured bf16 matmul rate.

    python -m bench.gpu_levers [--batch 256 --steps 20]
    python -m bench.gpu_levers --smoke --planner-gpu H100-SXM   # CPU: the same code paths on clip-pipe-test,
                                                                # to check the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

from clip_pipe.config import load_config
from clip_pipe.distributed import env_from_os, free_port
from clip_pipe.losses import ClipLoss
from clip_pipe.model import build_model

# ViT-B/16 at 224 px: the variants timed, as config overrides.
VARIANTS = {
    "plain": [],
    "patch dropout 0.5": ["model.patch_dropout=0.5"],
    "patch dropout 0.75": ["model.patch_dropout=0.75"],
    "checkpointing": ["model.grad_checkpointing=true"],
    "checkpointing + patch dropout 0.5": ["model.grad_checkpointing=true", "model.patch_dropout=0.5"],
}


def engine_for(model_name: str, batch: int, *overrides: str):
    from clip_pipe.engine import Engine

    cfg = load_config(None, ["data.train=/x", f"data.batch_size={batch}", f"model.name={model_name}",
                             "optim.grad_clip=0", "optim.eps=1e-4", *overrides])  # fmt: skip
    torch.manual_seed(0)
    encoder = build_model(cfg.model)
    return encoder, Engine(encoder.model, cfg, 1)


def inputs(encoder, batch: int, seed: int = 0):
    size = encoder.model.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images, encoder.tokenizer([f"a photo of thing number {i}" for i in range(batch)])


def free(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_patch_dropout(model_name: str) -> None:
    encoder, engine = engine_for(model_name, 4, "model.patch_dropout=0.5")
    visual = engine.module.visual
    num_patches = visual.grid_size[0] * visual.grid_size[1]
    seen = []
    visual.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    draws = []
    visual.patch_dropout.register_forward_pre_hook(lambda m, args: draws.append(torch.get_rng_state()))
    images, texts = inputs(encoder, 4)
    engine.train_step(images, texts, ClipLoss(), 1e-5)
    engine.train_step(images, texts, ClipLoss(), 1e-5)
    engine.module.eval()
    with torch.no_grad():
        engine.module.encode_image(images.to(engine.device, engine.dtype))
    assert seen == [1 + num_patches // 2] * 2 + [1 + num_patches], seen
    assert not torch.equal(draws[0], draws[1]), "each step draws its own masks"
    engine.ds.global_steps = 0  # the same step again: the same masks
    engine.module.train()
    with engine._training_rng(0):
        engine.module.encode_image(images.to(engine.device, engine.dtype))
    assert torch.equal(draws[-1], draws[0])
    print(f"ok  patch dropout: {1 + num_patches // 2} of {1 + num_patches} tokens in training, all in eval; "
          "masks seeded by step", flush=True)  # fmt: skip
    free(encoder, engine)


def gradients(model_name: str, precision: str, checkpointing: bool):
    encoder, engine = engine_for(model_name, 8, f"run.precision={precision}",
                                 f"model.grad_checkpointing={str(checkpointing).lower()}")  # fmt: skip
    calls = []
    engine.module.visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, args: calls.append(1))
    engine.ds.train()
    images, texts = inputs(encoder, 8)
    loss = ClipLoss()(**engine.forward(images, texts))
    engine.backward(loss)
    grads = {n: p.grad.to_dense().float() for n, p in engine.module.named_parameters() if p.grad is not None}
    if not grads:  # DeepSpeed's bf16 optimizer keeps the gradients in its own fp32 buffers
        from deepspeed.utils import safe_get_full_grad

        grads = {n: safe_get_full_grad(p).float().clone() for n, p in engine.module.named_parameters()}
    free(encoder, engine)
    return grads, len(calls)


def check_checkpointing(model_name: str) -> None:
    for precision, rtol in (("fp32", 1e-5), ("bf16", 2e-2)):
        plain, plain_calls = gradients(model_name, precision, False)
        checkpointed, calls = gradients(model_name, precision, True)
        assert (plain_calls, calls) == (1, 2), (plain_calls, calls)
        # CUDA's fused attention backward may sum in another order on each call, so close, not equal.
        worst = max(((checkpointed[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                    for n, g in plain.items())  # fmt: skip
        assert worst <= rtol, f"{precision}: largest relative gradient difference {worst:.2e} > {rtol}"
        print(
            f"ok  checkpointing {precision}: blocks recomputed; gradients equal to {worst:.1e} (relative)",
            flush=True,
        )


def check_lock(model_name: str) -> None:
    encoder, engine = engine_for(model_name, 8, "model.lock_image=true", "run.precision=bf16")
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters() if n.startswith("visual.")}
    images, texts = inputs(encoder, 8)
    for _ in range(3):
        engine.train_step(images, texts, ClipLoss(), 1e-3)
    moved = [n for n, p in engine.module.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert not moved, moved
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = sum(s["exp_avg"].numel() for s in inner.state.values())
    assert state <= engine.num_trainable + 64 < engine.num_params, (
        state,
        engine.num_trainable,
        engine.num_params,
    )
    print(f"ok  locked image tower: frozen weights unmoved; Adam state {state:,} elements for "
          f"{engine.num_trainable:,} trainable of {engine.num_params:,}", flush=True)  # fmt: skip
    free(encoder, engine)


def check_compile(model_name: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    losses = {}
    for compiled in (False, True):
        encoder, engine = engine_for(model_name, 8, f"run.compile={str(compiled).lower()}")
        images, texts = inputs(encoder, 8)
        losses[compiled] = [engine.train_step(images, texts, ClipLoss(), 1e-4)[0].item() for _ in range(2)]
        free(encoder, engine)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=0)
    print(f"ok  compile: losses {losses[True]} against eager {losses[False]}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def flops_per_sample(model_name: str, patch_dropout: float) -> float:
    """Forward + backward FLOPs of one training sample, counted by torch (patch dropout shortens the image tower)."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder, engine = engine_for(model_name, 4, f"model.patch_dropout={patch_dropout}", "run.precision=bf16")
    images, texts = inputs(encoder, 4)
    engine.ds.train()
    with FlopCounterMode(display=False) as counter:
        out = engine.forward(images, texts)
        engine.backward(out["image_features"].float().sum() + out["text_features"].float().sum())
    free(encoder, engine)
    return counter.get_total_flops() / 4


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def time_variant(model_name: str, batch: int, steps: int, overrides: list[str]) -> dict:
    encoder, engine = engine_for(model_name, batch, "run.precision=bf16", *overrides)
    images, texts = inputs(encoder, batch)
    images, texts = images.to(engine.device), texts.to(engine.device)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(3 + steps):
        if step == 3:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        engine.train_step(images, texts, ClipLoss(), 1e-5)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    free(encoder, engine)
    return {"samples_per_s": batch * steps / seconds, "peak_gib": peak}


def planner_prediction(gpu_name: str, model_name: str, batch: int, overrides: list[str]) -> str:
    """The planner's prediction for this GPU and run (`clip-pipe plan --json`), printed beside the
    measurement: samples/s at its fitted utilisation, and peak memory."""
    levers = []
    for o in overrides:
        key, value = o.split("=")
        levers += {"model.patch_dropout": ["--patch-dropout", value],
                   "model.grad_checkpointing": ["--checkpointing"]}[key]  # fmt: skip
    command = [sys.executable, "-m", "clip_pipe.cli", "plan", "--model", model_name, "--gpus", "1",
               "--gpu", gpu_name, "--batch", str(batch), "--zero", "0", "--precision", "bf16", *levers,
               "--json"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"planner failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    plan = json.loads(proc.stdout)
    return (
        f"planner: {plan['time']['samples_per_s_per_gpu']:.0f} samples/s at {plan['time']['utilisation']:.0%} "
        f"utilisation, peak {plan['memory']['peak'] / 2**30:.1f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, clip-pipe-test, tiny batch: check the script"
    )
    parser.add_argument(
        "--planner-gpu",
        help="the GPU the planner predicts for (default: this device; a CPU is none it knows)",
    )
    args = parser.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from clip_pipe.engine import init_process_group

    init_process_group(env_from_os())
    model_name = "clip-pipe-test" if args.smoke else "ViT-B-16"
    batch, steps = (8, 2) if args.smoke else (args.batch, args.steps)
    if not args.smoke:
        assert torch.cuda.is_available(), "no CUDA device: use --smoke on a CPU"
    check_patch_dropout(model_name)
    check_checkpointing(model_name)
    check_lock(model_name)
    if not args.smoke:  # inductor on this CPU takes minutes; tests/test_compile.py covers it there
        check_compile(model_name)

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    planner_gpu = args.planner_gpu or gpu
    peak = matmul_tflops() if torch.cuda.is_available() else float("nan")
    print(f"\n{model_name} 224 px, bf16, ZeRO-0, 1 rank, batch {batch}, {steps} steps after 3 warm-up; {gpu}; "
          f"bf16 matmul {peak:.0f} TFLOP/s")  # fmt: skip
    print(
        f"{'variant':<34} {'samples/s':>9} {'vs plain':>8} {'peak GiB':>8} {'MFU':>6}  "
        f"planner's prediction for {planner_gpu}"
    )
    plain = None
    for name, overrides in VARIANTS.items():
        r = time_variant(model_name, batch, steps, overrides)
        dropout = next((float(o.split("=")[1]) for o in overrides if "patch_dropout" in o), 0.0)
        mfu = r["samples_per_s"] * flops_per_sample(model_name, dropout) / (peak * 1e12)
        plain = plain or r["samples_per_s"]
        print(f"{name:<34} {r['samples_per_s']:>9.0f} {r['samples_per_s'] / plain:>7.2f}x {r['peak_gib']:>8.1f} "
              f"{mfu:>6.1%}  {planner_prediction(planner_gpu, model_name, batch, overrides)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
