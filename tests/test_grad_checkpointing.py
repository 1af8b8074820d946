"""Activation checkpointing changes memory, not maths: in real 2-rank DeepSpeed runs at ZeRO 0-3, in fp32
and bf16, the gradients (and the parameters after the step) equal those of the same run without it."""

from __future__ import annotations

import pytest
import torch

from clip_pipe.model import build_model
from tests.conftest import run_ranks
from tests.test_engine import WORLD, make_cfg, partition_everything

NUM_LOCAL = 4
RUNS = ((0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (3, "bf16"))


def batch(rank: int, tokenizer):
    g = torch.Generator().manual_seed(10 + rank)
    images = torch.randn(NUM_LOCAL, 3, 28, 28, generator=g)
    return images, tokenizer([f"a photo of thing {i} on rank {rank}" for i in range(NUM_LOCAL)])


def _ranks(rank: int, world_size: int, out: str) -> None:
    from deepspeed.utils import safe_get_full_grad

    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group
    from clip_pipe.losses import ClipLoss

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    results = {}
    for stage, precision in RUNS:
        for checkpointing in (False, True):
            cfg = make_cfg(
                stage, partition_everything(out.rsplit("/", 1)[0]), f"run.precision={precision}",
                "model.name=clip-pipe-tiny-28", f"model.grad_checkpointing={str(checkpointing).lower()}",
            )  # fmt: skip
            torch.manual_seed(0)
            encoder = build_model(cfg.model)
            model = encoder.model
            calls = []  # forward runs of the first block of each tower: twice a step when checkpointed
            for block in (model.visual.transformer.resblocks[0], model.transformer.resblocks[0]):
                block.register_forward_pre_hook(lambda m, args, calls=calls: calls.append(1))
            engine = Engine(model, cfg, world_size)
            engine.ds.train()
            images, texts = batch(rank, encoder.tokenizer)
            loss = ClipLoss(rank, world_size)(**engine.forward(images, texts))
            engine.backward(loss)  # recomputes the checkpointed blocks
            # Collective under ZeRO-3 (the gradient is partitioned): every rank asks for every parameter.
            grads = {n: safe_get_full_grad(p).float().clone() for n, p in engine.module.named_parameters()}
            engine.ds.step()
            weights = engine.export_state_dict()
            results[stage, precision, checkpointing] = {
                "grads": grads,
                "weights": weights,
                "calls": len(calls),
            }
    if rank == 0:
        torch.save(results, out)


@pytest.mark.slow
def test_checkpointed_gradients_equal_plain_ones_at_zero_0_1_2_3_fp32_and_bf16(tmp_path):
    out = str(tmp_path / "grads.pt")
    run_ranks(_ranks, WORLD, out, timeout=600)
    results = torch.load(out, weights_only=True)
    for stage, precision in RUNS:
        plain, checkpointed = results[stage, precision, False], results[stage, precision, True]
        assert plain["calls"] == 2 and checkpointed["calls"] == 4, "recomputed in the backward pass"
        assert plain["grads"].keys() == checkpointed["grads"].keys()
        assert any(g.abs().max() > 0 for g in plain["grads"].values())
        # The recomputed forward runs the same kernels on the same inputs, so the gradients are the same
        # bits, not merely close.
        for name, grad in plain["grads"].items():
            torch.testing.assert_close(
                checkpointed["grads"][name], grad, rtol=0, atol=0, msg=f"ZeRO-{stage} {precision} {name}"
            )
        for name, value in plain["weights"].items():
            torch.testing.assert_close(
                checkpointed["weights"][name], value, rtol=0, atol=0, msg=f"ZeRO-{stage} {precision} {name}"
            )
