"""2-rank DeepSpeed training equals a single-process full-batch run; checkpoints load weights-only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from clip_pipe.config import load_config
from clip_pipe.losses import ClipLoss
from clip_pipe.model import build_model, export_state_dict
from clip_pipe.train import lr_at
from tests.conftest import run_ranks

NUM_LOCAL, WORLD, NUM_STEPS = 4, 2, 5
STAGES = (0, 1, 2, 3)


def partition_everything(folder) -> str:
    """A DeepSpeed JSON that makes ZeRO-3 partition every parameter.

    By default ZeRO-3 keeps parameters under 100k elements whole on every rank, which is all of a tiny
    test model's: without this, a stage-3 test would not test partitioning at all.
    """
    path = Path(folder) / f"zero3_partition_all.{os.getpid()}.json"  # one per rank: no torn reads
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return str(path)


def make_cfg(stage: int, ds_json: str | None = None, *overrides: str):
    return load_config(
        None,
        [
            *([f"run.deepspeed_config={ds_json}"] if ds_json else []),
            "data.train=/unused", f"data.batch_size={NUM_LOCAL}", f"run.zero_stage={stage}", f"run.steps={NUM_STEPS}",
            "optim.grad_clip=0", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.weight_decay=0.1",
            # Some parameters (attention key biases) have an exactly zero true gradient, so theirs is
            # rounding noise that depends on reduction order; Adam with a tiny eps scales that noise up
            # to full-size steps. A larger eps keeps the comparison about the maths, not the rounding.
            "optim.eps=1e-4",
            *overrides,  # last, so that they win
        ],
    )  # fmt: skip


def global_batch(step: int, tokenizer):
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(WORLD * NUM_LOCAL, 3, 16, 16, generator=g)
    words = ["red", "green", "blue", "cat", "dog", "car", "tree", "sky"]
    order = torch.randperm(len(words), generator=g).tolist()
    texts = tokenizer([f"a photo of a {words[i]}" for i in order])
    return images, texts


def _train_ranks(rank: int, world_size: int, out: str) -> None:
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    for stage in STAGES:
        cfg = make_cfg(stage, partition_everything(Path(out).parent))
        torch.manual_seed(0)
        encoder = build_model(cfg.model)
        engine = Engine(encoder.model, cfg, world_size)
        loss_fn = ClipLoss(rank, world_size)
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        for step in range(NUM_STEPS):
            images, texts = global_batch(step, encoder.tokenizer)
            engine.train_step(images[rows], texts[rows], loss_fn, lr_at(step, cfg.optim, NUM_STEPS))
        if stage == 0:  # the token embedding's gradient travels sparse here, so that path is the one tested
            assert engine.sparse_params == [engine.module.token_embedding.weight]
            assert engine.module.token_embedding.sparse
        if stage == 3:  # really partitioned: each rank holds a slice of every parameter
            assert all(p.numel() == 0 for p in engine.module.parameters())
        weights = engine.export_state_dict()  # collective: ZeRO-3 gathers onto rank 0
        if rank == 0:
            torch.save(weights, f"{out}.zero{stage}")


def train_reference(model: torch.nn.Module, o, loss_at) -> None:
    """Plain torch, one process: NUM_STEPS AdamW steps with the engine's parameter groups, betas, eps and
    schedule (optim config `o`) on `loss_at(step)`, the whole global batch's loss. The single-process
    reference each multi-rank engine test compares against."""
    from clip_pipe.engine import param_groups

    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
    )
    for step in range(NUM_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, o, NUM_STEPS)
        loss = loss_at(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def reference_params() -> tuple[dict, dict]:
    """Plain torch, one process, the whole global batch: what the distributed run must reproduce."""
    cfg = make_cfg(0)
    torch.manual_seed(0)
    encoder = build_model(cfg.model)
    model = encoder.model
    initial = export_state_dict(model)
    loss_fn = ClipLoss()
    train_reference(model, cfg.optim, lambda step: loss_fn(*model(*global_batch(step, encoder.tokenizer))))
    return initial, export_state_dict(model)


@pytest.mark.slow
def test_two_rank_deepspeed_matches_single_process_for_zero_0_1_2_3(tmp_path):
    out = str(tmp_path / "params")
    run_ranks(_train_ranks, WORLD, out)
    initial, reference = reference_params()
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference)
    assert moved > 1e-3, "the reference must actually train, or the comparison proves nothing"
    for stage in STAGES:
        params = torch.load(f"{out}.zero{stage}", weights_only=True)
        assert params.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(
                params[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} {key}"
            )


def _checkpoint_roundtrip(rank: int, world_size: int, checkpoint_dir: str) -> None:
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    for stage, precision in ((0, "fp32"), (1, "fp32"), (2, "bf16"), (3, "fp32")):
        cfg = make_cfg(stage, partition_everything(Path(checkpoint_dir).parent), f"run.precision={precision}")
        torch.manual_seed(0)
        encoder = build_model(cfg.model)
        engine = Engine(encoder.model, cfg, world_size)
        loss_fn = ClipLoss(rank, world_size)
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        for step in range(2):
            images, texts = global_batch(step, encoder.tokenizer)
            engine.train_step(images[rows], texts[rows], loss_fn, 1e-3)
        tag = f"zero{stage}_{precision}"
        engine.save(checkpoint_dir, tag, client_state={"step": 2})
        trained = engine.export_state_dict()

        torch.manual_seed(1)  # different initial weights, which the load must overwrite
        fresh = Engine(build_model(cfg.model).model, cfg, world_size)
        # Through WeightsOnlyCheckpointEngine: model states and ZeRO optimizer partitions.
        assert fresh.load(checkpoint_dir, tag=tag)["step"] == 2
        loaded = fresh.export_state_dict()
        if rank == 0:
            assert loaded.keys() == trained.keys()
            for key, value in loaded.items():
                torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=f"{tag} {key}")
        # The optimizer state came back too: one more identical step keeps them identical.
        images, texts = global_batch(2, encoder.tokenizer)
        engine.train_step(images[rows], texts[rows], loss_fn, 1e-3)
        fresh.train_step(images[rows], texts[rows], loss_fn, 1e-3)
        after, fresh_after = engine.export_state_dict(), fresh.export_state_dict()
        if rank == 0:
            assert not all(torch.equal(after[k], trained[k]) for k in after), "the extra step moved nothing"
            for key in after:
                torch.testing.assert_close(
                    fresh_after[key], after[key], rtol=0, atol=0, msg=f"{tag} step {key}"
                )


@pytest.mark.slow
def test_zero_checkpoints_round_trip_through_the_weights_only_loader(tmp_path):
    run_ranks(_checkpoint_roundtrip, WORLD, str(tmp_path / "checkpoints"))


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_engine_refuses_arbitrary_pickles(tmp_path):
    from clip_pipe.engine import WeightsOnlyCheckpointEngine

    path = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": Evil()}, path)
    engine = WeightsOnlyCheckpointEngine()
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        engine.load(str(path))
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, path)
    assert engine.load(str(path))["step"] == 3


def test_generated_deepspeed_config_is_explicit_and_user_json_overrides_it(tmp_path):
    from clip_pipe.engine import deepspeed_config

    cfg = load_config(
        None,
        [
            "data.train=/x",
            "data.batch_size=16",
            "run.precision=bf16",
            "run.zero_stage=2",
            "optim.grad_clip=0",
        ],
    )
    config = deepspeed_config(cfg, world_size=4)
    assert config["gradient_clipping"] == 0.0  # explicit even when off: DeepSpeed's default is 1.0
    assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 16
    assert config["bf16"] == {"enabled": True} and config["zero_optimization"] == {"stage": 2}

    user = tmp_path / "ds.json"
    user.write_text('{"zero_optimization": {"overlap_comm": true}, "wall_clock_breakdown": true}')
    cfg.run.deepspeed_config = str(user)
    merged = deepspeed_config(cfg, world_size=4)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["wall_clock_breakdown"] is True and merged["gradient_clipping"] == 0.0

    user.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        deepspeed_config(cfg, world_size=4)


@pytest.mark.parametrize(
    "overrides, sparse",
    [
        ([], True),
        (["run.precision=bf16"], False),  # DeepSpeed's bf16 optimizer flattens gradients into buffers
        (["run.zero_stage=1"], False),  # so does ZeRO
        (["run.zero_stage=3"], False),
    ],
)
def test_embedding_gradients_are_sparse_only_where_deepspeed_reduces_them_so(overrides, sparse):
    from clip_pipe.engine import deepspeed_config, reduces_sparse_gradients

    cfg = make_cfg(0, None, *overrides)
    assert reduces_sparse_gradients(deepspeed_config(cfg, world_size=2)) is sparse


# What each DeepSpeed collective takes from this rank: the argument that travels (the rest are outputs).
SENT_ARGUMENT = {
    "all_reduce": 0, "inference_all_reduce": 0, "broadcast": 0, "all_gather": 1, "all_gather_into_tensor": 1,
    "allgather_fn": 1, "reduce_scatter_tensor": 1, "reduce_scatter_fn": 1, "all_to_all_single": 1,
}  # fmt: skip


def _sparse_gradient_traffic(rank: int, world_size: int, out: str) -> None:
    """Train 2 steps at ZeRO-0 fp32, recording every tensor this rank hands to DeepSpeed's collectives."""
    import deepspeed.comm

    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    cfg = make_cfg(0)
    torch.manual_seed(0)
    encoder = build_model(cfg.model)
    engine = Engine(encoder.model, cfg, world_size)
    sent: list[tuple[str, list[int], str]] = []

    def recording(name: str, collective):
        def record(*args, **kwargs):
            tensor = args[SENT_ARGUMENT[name]]
            sent.append((name, list(tensor.shape), str(tensor.dtype)))
            return collective(*args, **kwargs)

        return record

    # DeepSpeed's engine calls them as `deepspeed.comm.<name>`; the loss's own collectives are torch's.
    for name in SENT_ARGUMENT:
        setattr(deepspeed.comm, name, recording(name, getattr(deepspeed.comm, name)))
    steps = []
    rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
    for step in range(2):
        images, texts = global_batch(step, encoder.tokenizer)
        sent.clear()
        engine.train_step(images[rows], texts[rows], ClipLoss(rank, world_size), 1e-3)
        steps.append({"sent": list(sent), "num_rows_used": len(texts[rows].unique())})
    parameters = {name: p.numel() for name, p in engine.module.named_parameters()}
    Path(f"{out}.{rank}").write_text(json.dumps({"steps": steps, "parameters": parameters}))


@pytest.mark.slow
def test_only_the_embedding_rows_used_travel_at_zero_0(tmp_path):
    """The point of sparse embedding gradients: each step, DeepSpeed sends the token-embedding rows the
    batch used (rows x width), not the whole table (vocab x width, 97% of this model), and every other
    gradient densely once. A gradient densified before the reduction, or an embedding left dense,
    sends the table."""
    out = str(tmp_path / "traffic")
    run_ranks(_sparse_gradient_traffic, WORLD, out)
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(WORLD)]
    parameters = ranks[0]["parameters"]
    vocab_size, width = build_model(make_cfg(0).model).model.token_embedding.weight.shape
    assert parameters["token_embedding.weight"] == vocab_size * width
    num_dense = sum(parameters.values()) - vocab_size * width
    for step in range(2):
        # DeepSpeed pads every rank's rows to the most any rank used, so each sends that many.
        num_rows = max(r["steps"][step]["num_rows_used"] for r in ranks)
        assert num_rows < vocab_size // 100
        for rank, r in enumerate(ranks):
            sent = r["steps"][step]["sent"]
            where = f"step {step} rank {rank}: {sent}"
            # The embedding's values: its rows used, each `width` floats ...
            assert ["all_gather", [num_rows, width], "torch.float32"] in sent, where
            # ... and every other parameter's gradient in the dense all-reduce, the table not among them.
            reduced = sum(math.prod(shape) for name, shape, _ in sent if name == "all_reduce")
            assert reduced == num_dense, where
            # Nothing else of any size travelled: the rows' indices and their counts, no more.
            total = sum(math.prod(shape) for _, shape, _ in sent)
            assert num_dense + num_rows * width < total <= num_dense + num_rows * (width + 1) + 2, where


def _attention_kernels(rank: int, world_size: int, out: str) -> None:
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    kernels = {}
    for precision in ("fp32", "bf16"):
        cfg = make_cfg(0, None, f"run.precision={precision}")
        encoder = build_model(cfg.model)
        engine = Engine(encoder.model, cfg, world_size)
        images, texts = global_batch(0, encoder.tokenizer)
        with torch.profiler.profile() as prof:
            engine.train_step(images, texts, ClipLoss(rank, world_size), 1e-3)
        kernels[precision] = sorted({e.name for e in prof.events() if "scaled_dot_product" in e.name})
    Path(out).write_text(json.dumps(kernels))


def test_bf16_attention_on_cpu_avoids_the_fused_kernel_whose_backward_is_slow(tmp_path):
    # torch's fused CPU attention backward in bf16 cost 4x the rest of the demo model's backward.
    run_ranks(_attention_kernels, 1, str(tmp_path / "kernels.json"))
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert any("flash_attention_for_cpu_backward" in name for name in kernels["fp32"])  # fp32 keeps it
    assert not any("flash" in name for name in kernels["bf16"]), kernels["bf16"]
    assert any("attention_math" in name for name in kernels["bf16"]), kernels["bf16"]
