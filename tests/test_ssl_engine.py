"""The combined objective (InfoNCE + weight × NT-Xent over the views) through the DeepSpeed engine: 2 ranks,
ZeRO 0 and 3, whole and in 2 micro-batches, make exactly the updates of plain PyTorch on the full batch,
projection head included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clip_pipe.losses import ClipLoss
from clip_pipe.losses.ssl import NtXentLoss, WithImageSsl
from clip_pipe.model import add_image_ssl_head, build_model, export_state_dict
from clip_pipe.train import lr_at
from tests.conftest import run_ranks
from tests.test_engine import (
    NUM_LOCAL,
    NUM_STEPS,
    WORLD,
    global_batch,
    make_cfg,
    partition_everything,
    train_reference,
)
from tests.test_ssl import naive_nt_xent

WEIGHT, TEMPERATURE = 0.5, 0.2
RUNS = ((0, 1), (0, 2), (3, 2))  # (ZeRO stage, accum_steps)


def global_views(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(WORLD * NUM_LOCAL, 2, 3, 16, 16, generator=g)  # (N, 2, 3, H, W)


def head_state(engine) -> dict[str, torch.Tensor]:
    with engine.full_params():  # collective under ZeRO-3
        return {k: v.detach().clone() for k, v in engine.module.image_ssl_head.state_dict().items()}


def _train_ranks(rank: int, world_size: int, out: str) -> None:
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    for stage, accum_steps in RUNS:
        cfg = make_cfg(stage, partition_everything(Path(out).parent), f"optim.accum_steps={accum_steps}")
        torch.manual_seed(0)
        encoder = build_model(cfg.model)
        add_image_ssl_head(encoder)
        engine = Engine(encoder.model, cfg, world_size)
        loss_fn = WithImageSsl(ClipLoss(rank, world_size), NtXentLoss(rank, world_size, TEMPERATURE), WEIGHT)
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        for step in range(NUM_STEPS):
            images, texts = global_batch(step, encoder.tokenizer)
            lr = lr_at(step, cfg.optim, NUM_STEPS)
            engine.train_step(images[rows], texts[rows], loss_fn, lr, global_views(step)[rows])
        if stage == 3:  # really partitioned, the head too
            assert all(p.numel() == 0 for p in engine.module.parameters())
        weights, head = engine.export_state_dict(), head_state(engine)
        if rank == 0:
            torch.save({"weights": weights, "head": head}, f"{out}.zero{stage}.accum{accum_steps}")


def reference_params() -> tuple[dict, dict, dict]:
    """Plain torch, one process, the whole global batch and both views of every image."""

    cfg = make_cfg(0)
    torch.manual_seed(0)
    encoder = build_model(cfg.model)
    add_image_ssl_head(encoder)
    model = encoder.model
    initial = export_state_dict(model)

    def loss_at(step: int) -> torch.Tensor:
        views = global_views(step)
        view_embeddings = model.encode_image(views.flatten(0, 1), normalize=True)
        view_features = model.image_ssl_head(view_embeddings).unflatten(0, (len(views), 2))
        clip = ClipLoss()(*model(*global_batch(step, encoder.tokenizer)))
        return clip + WEIGHT * naive_nt_xent(view_features, TEMPERATURE)

    train_reference(model, cfg.optim, loss_at)
    head = {k: v.detach().clone() for k, v in model.image_ssl_head.state_dict().items()}
    return initial, export_state_dict(model), head


@pytest.mark.slow
def test_two_rank_engine_matches_single_process_with_the_image_ssl_term(tmp_path):
    out = str(tmp_path / "params")
    run_ranks(_train_ranks, WORLD, out, timeout=600)
    initial, reference, reference_head = reference_params()
    assert max((reference[k] - initial[k]).abs().max().item() for k in reference) > 1e-3
    for stage, accum_steps in RUNS:
        result = torch.load(f"{out}.zero{stage}.accum{accum_steps}", weights_only=True)
        assert result["weights"].keys() == reference.keys()  # the head is not exported
        for name, expected in (("weights", reference), ("head", reference_head)):
            for key in expected:
                torch.testing.assert_close(
                    result[name][key], expected[key], rtol=1e-5, atol=1e-6,
                    msg=f"ZeRO-{stage} accum {accum_steps} {name} {key}",
                )  # fmt: skip
