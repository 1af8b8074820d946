"""`run.compile`: the compiled model computes the eager model's loss on a fixed batch, and trains the same.

Not bit for bit: inductor fuses each block's element-wise and reduction ops into its own C++ loops
(vectorised, with another summation order than ATen's kernels), so fp32 results differ in the last bits,
about 1e-7 relative. The tolerance, 1e-5 relative on the loss and 1e-5 absolute on parameters after two
AdamW steps, is two orders above that rounding and far below any real difference (a wrong graph).
"""

from __future__ import annotations

import pytest
import torch

from clip_pipe.model import build_model
from tests.conftest import run_ranks
from tests.test_engine import make_cfg

NUM_LOCAL = 8


def _ranks(rank: int, world_size: int, out: str) -> None:
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group
    from clip_pipe.losses import ClipLoss

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    g = torch.Generator().manual_seed(rank)
    images = torch.randn(NUM_LOCAL, 3, 16, 16, generator=g)
    results = {}
    for compiled in (False, True):
        cfg = make_cfg(0, None, f"run.compile={str(compiled).lower()}", f"data.batch_size={NUM_LOCAL}")
        torch.manual_seed(0)
        encoder = build_model(cfg.model)
        texts = encoder.tokenizer([f"a photo of thing {i}" for i in range(NUM_LOCAL)])
        engine = Engine(encoder.model, cfg, world_size)
        assert engine.ds.is_compiled == compiled
        losses = [
            engine.train_step(images, texts, ClipLoss(rank, world_size), 1e-3)[0].item() for _ in range(2)
        ]
        results[compiled] = {"losses": losses, "weights": engine.export_state_dict()}
    if rank == 0:
        torch.save(results, out)


@pytest.mark.slow
def test_compiled_model_computes_the_eager_loss(tmp_path):
    out = str(tmp_path / "compile.pt")
    run_ranks(_ranks, 2, out, timeout=900)
    results = torch.load(out, weights_only=True)
    eager, compiled = results[False], results[True]
    assert eager["losses"][0] != eager["losses"][1]
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-5, atol=0)
    for name, value in eager["weights"].items():
        torch.testing.assert_close(compiled["weights"][name], value, rtol=0, atol=1e-5, msg=name)
