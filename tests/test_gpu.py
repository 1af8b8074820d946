"""CUDA checks (marker `gpu`), skipped where no CUDA device is visible; `bench/gpu.sh` runs them first on a
lent GPU machine, before it times anything, because nothing else in the suite touches CUDA or NCCL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clip_pipe.distributed import free_port
from clip_pipe.losses import ClipLoss, SigLipLoss, TiledClipLoss
from tests.conftest import COLORS, REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def features(num: int, dim: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    image = F.normalize(torch.randn(num, dim, device="cuda", dtype=torch.float64, generator=g), dim=-1)
    text = F.normalize(torch.randn(num, dim, device="cuda", dtype=torch.float64, generator=g), dim=-1)
    return image.to(dtype), text.to(dtype), torch.tensor([20.0], device="cuda", dtype=torch.float64)


def value_and_grads(loss_fn, *tensors):
    inputs = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = loss_fn(*inputs)
    return [loss.detach(), *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-6), (torch.bfloat16, 2e-2)])
def test_tiled_loss_equals_reference_on_cuda(dtype, rtol):
    # 3000 rows in tiles of 1024: the last tile is partial in both directions.
    image, text, scale = features(3000, 256, dtype)
    expected = value_and_grads(ClipLoss(), image.double(), text.double(), scale)
    got = value_and_grads(TiledClipLoss(tile_size=1024), image, text, scale)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=rtol * e.abs().max().item())


def test_siglip_loss_runs_tiled_on_cuda():
    image, text, scale = features(3000, 256, torch.float64)
    bias = torch.tensor([-10.0], device="cuda", dtype=torch.float64)
    small = value_and_grads(SigLipLoss(tile_size=1024), image, text, scale, bias)
    whole = value_and_grads(SigLipLoss(tile_size=4096), image, text, scale, bias)
    for a, b in zip(small, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_deepspeed_bf16_one_gpu_trains_evaluates_checkpoints_and_resumes(
    color_shards, color_eval_set, tmp_path
):
    run_dir = tmp_path / "run"
    deepspeed = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "1",
        f"--master_port={free_port()}",
    ]
    common = [
        "launch/train.py", "--config", "configs/tiny_test.yaml", f"data.train={color_shards}",
        f"eval.sets=[{color_eval_set}]", f"run.out_dir={run_dir}", "run.precision=bf16", "run.checkpoint_every=20",
        "data.num_workers=2",
    ]  # fmt: skip
    run(*deepspeed, *common, "run.steps=20")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    run(*deepspeed, *common, "run.steps=40", "--resume", "latest")
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "at step 20" in log, log[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(5, 41, 5))
    results_file = run_dir / "eval.json" if (run_dir / "eval.json").exists() else run_dir / "zeroshot.json"
    results = json.loads(results_file.read_text())["eval"]  # the set is named for its folder
    assert (results["num_samples"], results["num_skipped"]) == (40, 0)  # every sample, on one GPU
    assert set(results["per_class_accuracy"]) == set(COLORS)
    assert results["top1"] > 0.25  # above one colour for everything; 20 steps on the CPU reach 0.82
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"
