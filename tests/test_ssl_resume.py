"""The image–image term from the config, end to end: 2 ranks through `launch/train.py`, ZeRO-3 with 2
micro-batches. A run stopped after 3 steps and resumed to 6 ends where an uninterrupted 6-step run does,
so the projection head and its optimizer state are checkpointed and the views are drawn again exactly.
Resuming with the term switched off is refused as a user error, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

import clip_pipe.model  # noqa: F401  (registers our model configs with open_clip)
from tests.conftest import REPO, run_ranks
from tests.test_resume import launch_main

pytestmark = pytest.mark.slow


def _runs(rank: int, world_size: int, train: str, out: str) -> None:
    main = launch_main()
    command = [
        "--config", str(REPO / "configs" / "tiny_test.yaml"), f"data.train={train}", "eval.sets=[]",
        "data.num_workers=0", "run.threads_per_rank=1", "run.log_every=1", "run.checkpoint_every=1000",
        "run.zero_stage=3", "optim.accum_steps=2", "optim.schedule=constant", "loss.image_ssl_weight=0.5",
    ]  # fmt: skip
    statuses = [
        main([*command, "run.steps=6", f"run.out_dir={out}/full"]),
        main([*command, "run.steps=3", f"run.out_dir={out}/resumed"]),
        main([*command, "run.steps=6", f"run.out_dir={out}/resumed", "--resume", "latest"]),
        # The term switched off: the checkpoint's head has no place in the model, a user error (exit 2).
        main([*command, "loss.image_ssl_weight=0", "run.steps=8", f"run.out_dir={out}/resumed", "--resume", "latest"]),
    ]  # fmt: skip
    Path(out, f"status{rank}.json").write_text(json.dumps(statuses))


def test_resumed_run_with_the_image_ssl_term_matches_the_uninterrupted_one(tmp_path, color_shards):
    out = tmp_path / "runs"
    out.mkdir()
    run_ranks(_runs, 2, str(color_shards), str(out), timeout=600)
    for rank in range(2):
        assert json.loads((out / f"status{rank}.json").read_text()) == [0, 0, 0, 2]
    expected = load_file(out / "full" / "model.safetensors")
    actual = load_file(out / "resumed" / "model.safetensors")
    stopped = load_file(out / "resumed" / "checkpoints" / "step_00000003" / "model.safetensors")
    assert max((expected[k] - stopped[k]).abs().max() for k in expected) > 1e-4, "steps after the stop count"
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    # The export is open_clip's model alone, without the head: open_clip loads it strictly.
    assert not any(k.startswith("image_ssl_head.") for k in actual)
    open_clip.create_model("clip-pipe-test", pretrained=str(out / "resumed" / "model.safetensors"))
