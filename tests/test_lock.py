"""Locked towers (LiT): frozen parts stay frozen and in eval mode, and get no optimizer state and no gradient
traffic at any ZeRO stage, while the trainable rest trains exactly as plain PyTorch trains it (2 ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from clip_pipe.config import ModelConfig
from clip_pipe.model import build_model, export_state_dict
from clip_pipe.train import lr_at
from tests.conftest import run_ranks
from tests.test_engine import NUM_LOCAL, NUM_STEPS, WORLD, global_batch, make_cfg, train_reference
from tests.test_model import tiny_hf_text_model

# The image tower locked but its top two groups (the last block with ln_post, and the projection); the text
# tower locked whole. The token embedding, most of clip-pipe-test's parameters, is then frozen.
LOCKS = ("model.lock_image=true", "model.lock_image_unlocked_groups=2", "model.lock_text=true")


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_unlocked_groups_are_the_top_of_the_tower():
    model = build_model(ModelConfig(name="clip-pipe-small-28", lock_image=True)).model
    assert not any(n.startswith("visual.") for n in trainable(model))
    assert "token_embedding.weight" in trainable(model)  # the text tower is not locked
    model = build_model(
        ModelConfig(name="clip-pipe-small-28", lock_image=True, lock_image_unlocked_groups=1)
    ).model
    assert {n for n in trainable(model) if n.startswith("visual.")} == {"visual.proj"}
    model = build_model(
        ModelConfig(name="clip-pipe-small-28", lock_image=True, lock_image_unlocked_groups=2)
    ).model
    visual = {n for n in trainable(model) if n.startswith("visual.")}
    assert visual == {"visual.proj"} | {
        n for n in visual if n.startswith(("visual.transformer.resblocks.5.", "visual.ln_post."))
    }
    assert any(n.startswith("visual.transformer.resblocks.5.") for n in visual)
    # 6 blocks make 8 groups; unlocking all 8 would lock nothing.
    with pytest.raises(ValueError, match="nothing is locked; use at most 7"):
        build_model(ModelConfig(name="clip-pipe-small-28", lock_image=True, lock_image_unlocked_groups=8))
    model = build_model(ModelConfig(name="clip-pipe-test", lock_text=True, lock_text_unlocked_groups=1)).model
    assert {n for n in trainable(model) if not n.startswith("visual.")} == {"text_projection", "logit_scale"}


def test_frozen_dropout_stays_off_after_model_train(tmp_path):
    hf_dir = tiny_hf_text_model(tmp_path / "bert")  # BERT: dropout 0.1 on embeddings, attention, outputs
    tokens = None
    for lock in (False, True):
        torch.manual_seed(0)
        encoder = build_model(ModelConfig(name="clip-pipe-test", hf_text_model=hf_dir, lock_text=lock))
        model, tokens = encoder.model, encoder.tokenizer(["a photo of the red square", "a dog"])
        model.train()  # as the engine does every step
        with torch.no_grad():
            a, b = model.encode_text(tokens), model.encode_text(tokens)
        frozen = [m for m in model.text.transformer.modules() if isinstance(m, torch.nn.Dropout)]
        assert frozen and all(m.training != lock for m in frozen)
        # Locked: the frozen BERT computes what it computes in eval mode, every time; unlocked, dropout draws.
        assert torch.equal(a, b) == lock
        assert model.visual.training  # the unlocked image tower trains as usual
        assert model.text.proj.training  # an HF tower's projection head stays trainable, in train mode


def test_frozen_batch_norm_keeps_its_statistics(tmp_path, monkeypatch):
    # A CLIP with open_clip's ModifiedResNet image tower, which has batch norm, small enough for a test.
    folder = tmp_path / "configs"
    folder.mkdir()
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip
    (folder / "test-resnet-clip.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    open_clip.add_model_config(folder)
    images = torch.randn(4, 3, 32, 32)
    for lock in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="test-resnet-clip", lock_image=lock)).model
        norms = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms
        before = [n.running_mean.clone() for n in norms]
        with torch.no_grad():
            expected = model.eval().encode_image(images)
            model.train()
            actual = model.encode_image(images)
        unchanged = all(torch.equal(n.running_mean, b) for n, b in zip(norms, before, strict=True))
        assert unchanged == lock and torch.equal(actual, expected) == lock


def optimizer_state_numel(engine) -> int:
    """Elements of Adam's first moment this rank holds (ZeRO 1-3 and bf16 wrap a torch optimizer over
    flat partitions; ZeRO-0 fp32 is the torch optimizer itself)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(state["exp_avg"].numel() for state in inner.state.values())


def reduced_bytes() -> int:
    """Bytes this rank sent through DeepSpeed's reducing collectives since the comms logger was reset."""
    import deepspeed

    logged = deepspeed.comm.comms_logger.comms_dict
    return sum(size * v[0] for name, sizes in logged.items() if "reduce" in name for size, v in sizes.items())


def _locked_ranks(rank: int, world_size: int, out: str) -> None:
    import deepspeed

    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group
    from clip_pipe.losses import ClipLoss

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    ds_json = Path(out).parent / f"ds{rank}.json"
    # DeepSpeed's own comms logger measures what its collectives move; ZeRO-3 partitions every parameter.
    ds_json.write_text(json.dumps({
        "comms_logger": {"enabled": True, "prof_all": True},
        "zero_optimization": {"stage3_param_persistence_threshold": 0},
    }))  # fmt: skip
    report = {}
    for stage, precision in ((0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (3, "bf16")):
        cfg = make_cfg(stage, str(ds_json), f"run.precision={precision}", *LOCKS)
        torch.manual_seed(0)
        encoder = build_model(cfg.model)
        frozen_before = {
            n: p.detach().clone() for n, p in encoder.model.named_parameters() if not p.requires_grad
        }
        engine = Engine(encoder.model, cfg, world_size)
        loss_fn = ClipLoss(rank, world_size)
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        for step in range(NUM_STEPS):
            if step == NUM_STEPS - 1:
                deepspeed.comm.comms_logger.comms_dict = {}
            images, texts = global_batch(step, encoder.tokenizer)
            engine.train_step(images[rows], texts[rows], loss_fn, lr_at(step, cfg.optim, NUM_STEPS))
        tag = f"zero{stage}_{precision}"
        report[tag] = {
            "num_params": engine.num_params, "num_trainable": engine.num_trainable,
            "state_numel": optimizer_state_numel(engine), "reduced_bytes": reduced_bytes(),
            "bytes_per_element": 2 if precision == "bf16" else 4,
        }  # fmt: skip
        weights = engine.export_state_dict()
        if rank == 0:
            torch.save({"weights": weights, "frozen_before": frozen_before}, f"{out}.{tag}")
    Path(f"{out}.report{rank}.json").write_text(json.dumps(report))


def reference(*overrides: str) -> tuple[dict, set[str]]:
    """Plain torch, one process, the whole global batch, the same locks."""
    from clip_pipe.losses import ClipLoss

    cfg = make_cfg(0, None, *overrides)
    torch.manual_seed(0)
    encoder = build_model(cfg.model)
    model = encoder.model.train()
    train_reference(model, cfg.optim, lambda step: ClipLoss()(*model(*global_batch(step, encoder.tokenizer))))
    return export_state_dict(model), trainable(model)


@pytest.mark.slow
def test_locked_towers_train_exactly_and_frozen_parts_cost_nothing_at_zero_0_1_2_3(tmp_path):
    out = str(tmp_path / "locked")
    run_ranks(_locked_ranks, WORLD, out, timeout=600)
    expected, names = reference(*LOCKS)
    for tag in ("zero0_fp32", "zero1_fp32", "zero2_fp32", "zero3_fp32", "zero0_bf16", "zero3_bf16"):
        saved = torch.load(f"{out}.{tag}", weights_only=True)
        weights = saved["weights"]
        for name, before in saved["frozen_before"].items():  # not moved by a single ulp
            if tag.endswith("bf16"):  # DeepSpeed's bf16 holds the module's weights, frozen ones too, in bf16
                before = before.to(torch.bfloat16).float()
            torch.testing.assert_close(
                weights[name].reshape(before.shape), before, rtol=0, atol=0, msg=f"{tag} {name}"
            )
        if tag.endswith("fp32"):  # the trainable rest trained as plain PyTorch trains it
            for name in names:
                torch.testing.assert_close(
                    weights[name], expected[name], rtol=1e-5, atol=1e-6, msg=f"{tag} {name}"
                )
        for rank in range(WORLD):
            r = json.loads(Path(f"{out}.report{rank}.json").read_text())[tag]
            assert r["num_trainable"] == sum(weights[n].numel() for n in names) < r["num_params"] / 20
            # Adam's moments for the trainable parameters only (a partition of them at ZeRO 1-3 or in bf16;
            # ZeRO's flat buffers pad each group to an alignment).
            assert 0 < r["state_numel"] <= r["num_trainable"] + 64, (tag, r)
            # Gradients reduced in the last step: the trainable parameters' only. (ZeRO-0 in fp32 sends the
            # token embedding's gradient sparse, by all-gather, but a locked text tower has none.)
            assert r["num_trainable"] * r["bytes_per_element"] <= r["reduced_bytes"], (tag, r)
            assert r["reduced_bytes"] <= (r["num_trainable"] + 64) * r["bytes_per_element"] + 64, (tag, r)
