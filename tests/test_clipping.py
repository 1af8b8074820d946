"""Gradient clipping under DeepSpeed ZeRO 0-3 equals plain PyTorch's, and the reported norm is the true one.

`optim.grad_clip` is small enough here that every step clips, so a stage that clipped differently (per
rank, per partition, after instead of before the all-reduce) or not at all would end elsewhere. The
reference builds its own decay / no-decay split (open_clip_train's rule), not ours.

With `optim.accum_steps` the norm must not change either: every micro-step's loss uses the logit scale,
so a scale gradient summed over micro-steps (open_clip_train's `accum_freq` does that) would be
accum_steps times too large, and clipping would see an inflated norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clip_pipe.losses import ClipLoss
from clip_pipe.model import build_model, export_state_dict
from clip_pipe.train import lr_at
from tests.conftest import run_ranks
from tests.test_engine import NUM_LOCAL, WORLD, global_batch, make_cfg, partition_everything

pytestmark = pytest.mark.slow
NUM_STEPS, GRAD_CLIP = 4, 0.2
STAGES = (0, 1, 2, 3)
RUNS = [(stage, 1) for stage in STAGES] + [(0, 2), (3, 2)]  # (ZeRO stage, accum_steps)


def _train_ranks(rank: int, world_size: int, out: str) -> None:
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    norms = {}
    for stage, accum_steps in RUNS:
        run = f"zero{stage}-accum{accum_steps}"
        cfg = make_cfg(
            stage,
            partition_everything(Path(out).parent),
            f"optim.grad_clip={GRAD_CLIP}",
            f"optim.accum_steps={accum_steps}",
        )
        torch.manual_seed(0)
        encoder = build_model(cfg.model)
        engine = Engine(encoder.model, cfg, world_size)
        loss_fn = ClipLoss(rank, world_size)
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        norms[run] = []
        for step in range(NUM_STEPS):
            images, texts = global_batch(step, encoder.tokenizer)
            _, grad_norm = engine.train_step(
                images[rows], texts[rows], loss_fn, lr_at(step, cfg.optim, NUM_STEPS)
            )
            norms[run].append(None if grad_norm is None else float(grad_norm))
        weights = engine.export_state_dict()
        if rank == 0:
            torch.save(weights, f"{out}.{run}")
    Path(f"{out}.norms{rank}.json").write_text(json.dumps(norms))


def open_clip_train_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip_train's split (src/open_clip_train/main.py): no decay for gains, biases, norms, logit_scale."""

    def exclude(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def clipped_reference() -> tuple[dict, dict, list[float]]:
    """Plain torch, one process, the whole global batch, clip_grad_norm_ before each step."""
    cfg = make_cfg(0)
    torch.manual_seed(0)
    encoder = build_model(cfg.model)
    model = encoder.model
    initial = export_state_dict(model)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        open_clip_train_param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
    )
    loss_fn, norms = ClipLoss(), []
    for step in range(NUM_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, o, NUM_STEPS)
        images, texts = global_batch(step, encoder.tokenizer)
        loss = loss_fn(*model(images, texts))
        optimizer.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)))
        optimizer.step()
    return initial, export_state_dict(model), norms


def test_clipping_and_grad_norm_match_plain_pytorch_for_zero_0_1_2_3_and_accumulation(tmp_path):
    out = str(tmp_path / "params")
    run_ranks(_train_ranks, WORLD, out)
    initial, reference, reference_norms = clipped_reference()
    assert min(reference_norms) > 2 * GRAD_CLIP, f"clipping must trigger at every step: {reference_norms}"
    assert max((reference[k] - initial[k]).abs().max().item() for k in reference) > 1e-3
    for rank in range(WORLD):
        norms = json.loads(Path(f"{out}.norms{rank}.json").read_text())
        for stage, accum_steps in RUNS:
            run = f"zero{stage}-accum{accum_steps}"
            # Every rank reports the global norm (of the whole model's gradient), before clipping.
            assert norms[run] == pytest.approx(reference_norms, rel=1e-4), f"{run} rank {rank}"
    for stage, accum_steps in RUNS:
        run = f"zero{stage}-accum{accum_steps}"
        params = torch.load(f"{out}.{run}", weights_only=True)
        for key in reference:
            torch.testing.assert_close(
                params[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{run} clipped {key}"
            )
