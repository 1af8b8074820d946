"""Gradient accumulation keeps the whole global batch's negatives: 2 ranks × 2 micro-batches of 2 make
exactly the updates of plain PyTorch on the full batch of 8 (the reference `tests/test_engine.py` uses)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clip_pipe.losses import build_loss
from clip_pipe.model import build_model
from clip_pipe.train import lr_at
from tests.conftest import run_ranks
from tests.test_engine import (
    NUM_LOCAL,
    NUM_STEPS,
    WORLD,
    global_batch,
    make_cfg,
    partition_everything,
    reference_params,
)

ACCUM_STEPS = 2
STAGES = (0, 2, 3)


def _train_ranks(rank: int, world_size: int, out: str) -> None:
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    for stage in STAGES:
        # The configured loss (tiled InfoNCE), in blocks of 3 that split the 4 local rows unevenly.
        cfg = make_cfg(
            stage,
            partition_everything(Path(out).parent),
            f"optim.accum_steps={ACCUM_STEPS}",
            "loss.tile_size=3",
        )
        torch.manual_seed(0)
        encoder = build_model(cfg.model)
        engine = Engine(encoder.model, cfg, world_size)
        assert engine.config["train_micro_batch_size_per_gpu"] == NUM_LOCAL // ACCUM_STEPS
        loss_fn = build_loss(cfg.loss, rank, world_size)
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        for step in range(NUM_STEPS):
            images, texts = global_batch(step, encoder.tokenizer)
            engine.train_step(images[rows], texts[rows], loss_fn, lr_at(step, cfg.optim, NUM_STEPS))
        weights = engine.export_state_dict()
        if rank == 0:
            torch.save(weights, f"{out}.zero{stage}")


@pytest.mark.slow
def test_accumulated_micro_batches_match_the_full_batch(tmp_path):
    out = str(tmp_path / "params")
    run_ranks(_train_ranks, WORLD, out)
    initial, reference = reference_params()
    assert max((reference[k] - initial[k]).abs().max().item() for k in reference) > 1e-3
    for stage in STAGES:
        params = torch.load(f"{out}.zero{stage}", weights_only=True)
        for key in reference:
            torch.testing.assert_close(
                params[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} accum {key}"
            )
