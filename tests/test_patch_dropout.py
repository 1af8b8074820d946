"""Patch dropout (FLIP): masked while training, whole at evaluation, masks a pure function of (seed, step, rank,
micro-batch), and an unmasked tune at the end that a checkpoint on either side of the switch resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clip_pipe.config import ModelConfig, load_config
from clip_pipe.model import build_model, save_export, set_patch_dropout
from tests.conftest import REPO, run_ranks


def tokens_seen(model, images) -> int:
    """How many tokens (class token + patches) reach the image tower's transformer."""
    seen = []
    handle = model.visual.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model.encode_image(images)
    handle.remove()
    return seen[0]


def test_masked_in_training_whole_in_eval_and_left_out_of_the_export(tmp_path):
    torch.manual_seed(0)
    masked = build_model(ModelConfig(name="clip-pipe-small-28", patch_dropout=0.75)).model
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name="clip-pipe-small-28")).model
    images = torch.randn(4, 3, 28, 28)
    # 28 px in 7 px patches: 16 patches, of which a quarter (4) stay, plus the class token.
    assert tokens_seen(masked.train(), images) == 1 + 4
    assert tokens_seen(masked.eval(), images) == 1 + 16
    with torch.no_grad():
        torch.testing.assert_close(
            masked.encode_image(images), plain.eval().encode_image(images), rtol=0, atol=0
        )
        masked.train()
        a, b = masked.encode_image(images), masked.encode_image(images)
    assert not torch.equal(a, b), "each training pass draws its own masks"
    set_patch_dropout(masked, 0.0)  # the unmasked tune
    assert tokens_seen(masked.train(), images) == 1 + 16
    # A training setting, not architecture: open_clip rebuilds the exported model without it.
    encoder = build_model(ModelConfig(name="clip-pipe-small-28", patch_dropout=0.5))
    save_export(encoder.model, encoder.model_cfg, tmp_path)
    assert (
        "patch_dropout"
        not in json.loads((tmp_path / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    )


def test_bad_settings_are_one_line_errors():
    base = ["data.train=/x", "run.steps=100"]
    with pytest.raises(ValueError, match=r"model.patch_dropout must be in \[0, 1\)"):
        load_config(None, [*base, "model.patch_dropout=1.0"])
    with pytest.raises(ValueError, match=r"set model\.patch_dropout > 0 too"):
        load_config(None, [*base, "optim.tune_steps=10"])
    with pytest.raises(ValueError, match=r"must be less than run\.steps"):
        load_config(None, [*base, "model.patch_dropout=0.5", "optim.tune_steps=100"])
    with pytest.raises(ValueError, match="wholly locked image tower"):
        load_config(None, [*base, "model.patch_dropout=0.5", "model.lock_image=true"])
    load_config(
        None,
        [*base, "model.patch_dropout=0.5", "model.lock_image=true", "model.lock_image_unlocked_groups=2"],
    )
    with pytest.raises(ValueError, match="needs a ViT image tower"):
        build_model(ModelConfig(name="RN50", patch_dropout=0.5))


def _mask_draws(rank: int, world_size: int, out: str) -> None:
    """The generator state each patch-dropout draw starts from (it decides the mask), under 2 micro-batches."""
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group
    from clip_pipe.losses import ClipLoss

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    cfg = load_config(None, ["data.train=/x", "data.batch_size=4", "optim.accum_steps=2", "model.patch_dropout=0.5",
                             "model.name=clip-pipe-small-28", "optim.grad_clip=0"])  # fmt: skip
    torch.manual_seed(0)
    encoder = build_model(cfg.model)
    states = []
    encoder.model.visual.patch_dropout.register_forward_pre_hook(
        lambda m, args: states.append(torch.get_rng_state())
    )
    engine = Engine(encoder.model, cfg, world_size)
    loss_fn, texts = ClipLoss(rank, world_size), encoder.tokenizer(["a", "b", "c", "d"])
    for _ in range(2):
        engine.train_step(torch.randn(4, 3, 28, 28), texts, loss_fn, 1e-3)
    torch.save(states, f"{out}.{rank}")


@pytest.mark.slow
def test_masks_repeat_between_the_caching_and_gradient_passes_and_differ_elsewhere(tmp_path):
    run_ranks(_mask_draws, 2, str(tmp_path / "masks"))
    ranks = [torch.load(f"{tmp_path / 'masks'}.{r}", weights_only=True) for r in range(2)]
    draws = set()
    for states in ranks:
        # Per step: the caching pass of micro-batches 0 and 1, then their gradient passes.
        assert len(states) == 8
        for step in range(2):
            cache0, cache1, grad0, grad1 = states[4 * step : 4 * step + 4]
            # The gradient pass keeps the patches its cached features were computed from.
            assert torch.equal(cache0, grad0) and torch.equal(cache1, grad1)
            draws |= {bytes(cache0.numpy()), bytes(cache1.numpy())}
    assert len(draws) == 2 * 2 * 2, "every (rank, step, micro-batch) draws its own masks"


NUM_STEPS, TUNE_STEPS = 8, 3


def _switch_runs(rank: int, world_size: int, train: str, out: str) -> None:
    import multiprocessing

    import torch.distributed as dist

    from tests.test_resume import launch_main

    multiprocessing.set_start_method("fork", force=True)
    main = launch_main()
    command = [
        "--config", str(REPO / "configs" / "tiny_test.yaml"), f"data.train={train}", "eval.sets=[]",
        f"run.steps={NUM_STEPS}", "run.threads_per_rank=1", "run.checkpoint_every=1", "run.keep_checkpoints=0",
        "model.name=clip-pipe-small-28", "model.patch_dropout=0.5", f"optim.tune_steps={TUNE_STEPS}",
        "optim.tune_lr=3e-4", "optim.grad_clip=0", "eval.batch_size=16",
    ]  # fmt: skip
    assert main([*command, f"run.out_dir={out}/full"]) == 0
    # From a copy of the run at each side of the switch: the first unmasked step is step 5 (0-based).
    switch = NUM_STEPS - TUNE_STEPS
    for tag in (switch, switch + 1):
        if rank == 0:
            shutil.copytree(f"{out}/full", f"{out}/from{tag}")
        dist.barrier()
        assert main([*command, f"run.out_dir={out}/from{tag}", "--resume", f"step_{tag:08d}"]) == 0


def _tiny_28_shards(folder: Path) -> Path:
    from tests.conftest import write_train_shards

    return write_train_shards(folder, [40, 24])


@pytest.mark.slow
def test_checkpoints_either_side_of_the_unmasked_switch_resume_exactly(tmp_path):
    shards = _tiny_28_shards(tmp_path / "train")
    out = tmp_path / "runs"
    run_ranks(_switch_runs, 2, str(shards), str(out), timeout=600)
    expected = load_file(out / "full" / "model.safetensors")
    switch = NUM_STEPS - TUNE_STEPS
    before = load_file(out / "full" / "checkpoints" / f"step_{switch:08d}" / "model.safetensors")
    assert max((expected[k] - before[k]).abs().max() for k in expected) > 1e-4, "the tune steps train"
    log = (out / "full" / "train.log").read_text()
    assert f"step {switch}: unmasked tune for the last {TUNE_STEPS} steps, lr from 3.00e-04" in log
    for tag in (switch, switch + 1):
        resumed = out / f"from{tag}"
        assert f"resumed from {resumed / 'checkpoints'} at step {tag}" in (resumed / "train.log").read_text()
        actual = load_file(resumed / "model.safetensors")
        for key in expected:
            torch.testing.assert_close(
                actual[key], expected[key], rtol=0, atol=0, msg=f"from step {tag}: {key}"
            )
