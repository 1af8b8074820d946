"""The planner: its counts against the real thing, its formulas on hand-worked cases, and its CLI.

- Parameters: equal to the instantiated open_clip model's, per tower, and under locking.
- FLOPs: equal to torch's FlopCounterMode on tiny models (forward, training step, patch dropout,
  checkpointing, locked towers). The counter does not count torch's fused CPU attention kernel, so the
  models run the plain matmul-softmax-matmul kernel there (the same FLOPs by definition).
- Activations: equal to the bytes autograd really saves (saved-tensor hooks), in fp32 and bf16, with
  checkpointing and locked towers.
- Memory, traffic, time: small cases worked by hand.
- CLI: the table, the JSON, and one-line errors for bad input.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import open_clip
import pytest
import torch
from conftest import REPO
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clip_pipe.cli import main
from clip_pipe.plan import DEFAULT_UTILISATION, Setup, fit_utilisation, format_plan, plan
from clip_pipe.plan import arch as A
from clip_pipe.plan import comms as C
from clip_pipe.plan import memory as M
from clip_pipe.plan.gpus import GIB
from clip_pipe.plan.planner import model_view, peak_memory

TINY = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 500, "width": 48, "heads": 4, "layers": 2},
}


def variant(**changes) -> dict:
    cfg = copy.deepcopy(TINY)
    for key, value in changes.items():
        if key in ("vision_cfg", "text_cfg"):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


VARIANTS = {
    "plain": TINY,
    "quick_gelu": variant(quick_gelu=True),
    "layer_scale": variant(vision_cfg={"ls_init_value": 0.1}, text_cfg={"ls_init_value": 0.1}),
    # CLIPA's pooling: mean of the patches, then the norm; the text tower's last token, no causal mask
    "clipa": variant(
        vision_cfg={"pool_type": "avg", "final_ln_after_pool": True, "no_ln_pre": True},
        text_cfg={"pool_type": "last", "final_ln_after_pool": True, "no_causal_mask": True},
    ),
    "class_token_norm_after_pool": variant(vision_cfg={"final_ln_after_pool": True}),
}


# --- Parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip-pipe-test", "clip-pipe-tiny-28", *VARIANTS])
def test_parameter_counts_equal_the_real_model(name):
    cfg = VARIANTS.get(name) or A.model_cfg(name)
    model = open_clip.CLIP(**cfg)
    a = A.architecture(name, cfg)
    assert a.num_params == sum(p.numel() for p in model.parameters())
    assert a.image.num_params == sum(p.numel() for p in model.visual.parameters())
    assert a.text.num_params == a.num_params - a.image.num_params - model.logit_scale.numel()
    assert a.num_token_embedding == model.token_embedding.weight.numel()


@pytest.mark.parametrize("num_unlocked", [0, 1, 2])
def test_trainable_count_equals_open_clips_lock(num_unlocked):
    """--unlocked-image-layers N is open_clip's lock_image_tower(unlocked_groups=N + 1); 0 locks all."""
    model = open_clip.CLIP(**TINY)
    model.lock_image_tower(unlocked_groups=num_unlocked + 1 if num_unlocked else 0)
    model.lock_text_tower()
    setup = Setup("tiny", 1, 1, lock_image=True, unlocked_image_layers=num_unlocked, lock_text=True)
    assert model_view(setup, TINY).num_trainable == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


# --- FLOPs ---------------------------------------------------------------------------------------


def counted_flops(fn, backward: bool) -> int:
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_flops_equal_the_flop_counter(name):
    cfg, batch = VARIANTS[name], 2
    model = open_clip.CLIP(**cfg).train()
    a = A.architecture(name, cfg)
    images, texts = torch.randn(batch, 3, 32, 32), torch.randint(1, 400, (batch, 12))
    assert counted_flops(lambda: model.encode_image(images), False) == batch * A.forward_flops(a.image)
    assert counted_flops(lambda: model.encode_text(texts), False) == batch * A.forward_flops(a.text)
    assert counted_flops(lambda: model.encode_image(images), True) == batch * A.train_flops(a.image)
    assert counted_flops(lambda: model.encode_text(texts), True) == batch * A.train_flops(a.text)
    model.set_grad_checkpointing(True)
    assert counted_flops(lambda: model.encode_image(images), True) == batch * A.train_flops(
        a.image, recompute=True
    )
    assert counted_flops(lambda: model.encode_text(texts), True) == batch * A.train_flops(
        a.text, recompute=True
    )


def test_flops_with_patch_dropout_and_locked_layers():
    cfg = variant(vision_cfg={"patch_dropout": 0.5})
    a, batch = A.architecture("tiny", cfg), 2
    kept = a.image.with_tokens(int(a.image.num_patches * 0.5) + 1)
    images = torch.randn(batch, 3, 32, 32)
    model = open_clip.CLIP(**cfg).train()
    assert counted_flops(lambda: model.encode_image(images), True) == batch * A.train_flops(kept)
    for num_unlocked in (0, 1, 2):
        model = open_clip.CLIP(**cfg).train()
        model.lock_image_tower(unlocked_groups=num_unlocked + 1 if num_unlocked else 0)
        backward = num_unlocked > 0  # a frozen tower has nothing to differentiate
        assert counted_flops(lambda m=model: m.encode_image(images), backward) == batch * A.train_flops(
            kept, num_unlocked
        )


def test_flops_of_published_models():
    """open_clip's own profile (GMACs, fvcore): ViT-B/32 7.40, ViT-L/14 87.73 (forward, per sample)."""
    for name, gmacs in (("ViT-B-32", 7.40), ("ViT-L-14", 87.73)):
        a = A.architecture(name)
        assert (A.forward_flops(a.image) + A.forward_flops(a.text)) / 2e9 == pytest.approx(gmacs, rel=0.005)


# --- Activations ---------------------------------------------------------------------------------


def saved_bytes_per_sample(model: torch.nn.Module, encode, inputs_of) -> int:
    """Bytes autograd saves for one more sample (batch 3 minus batch 2), parameters and buffers aside."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def run(batch: int) -> int:
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        inputs = inputs_of(batch)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            encode(inputs)
        return sum(storages.values())

    return run(3) - run(2)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_saved_activations_equal_autograds(name, dtype, checkpointing):
    cfg = VARIANTS[name]
    a = A.architecture(name, cfg)
    model = open_clip.CLIP(**cfg).train().to(dtype)
    model.set_grad_checkpointing(checkpointing)
    g = torch.Generator().manual_seed(0)
    towers = {
        "image": (model.encode_image, lambda b: torch.randn(b, 3, 32, 32, generator=g).to(dtype), a.image),
        "text": (model.encode_text, lambda b: torch.randint(1, 400, (b, 12), generator=g), a.text),
    }
    for encode, inputs_of, tower in towers.values():
        acts = M.tower_activations(tower, tower.num_layers, checkpointing)
        predicted = acts.saved.nbytes(dtype.itemsize, stats_bytes=dtype.itemsize)  # CPU: stats in bf16
        measured = saved_bytes_per_sample(model, lambda x, f=encode: f(x, normalize=True), inputs_of)
        # the normalised features: kept by the loss, which encode_* alone does not run
        assert measured + tower.embed_dim * dtype.itemsize == predicted, tower.name


def test_saved_activations_with_patch_dropout_and_a_locked_tower():
    cfg = variant(vision_cfg={"patch_dropout": 0.5})
    a = A.architecture("tiny", cfg)
    kept = a.image.with_tokens(int(a.image.num_patches * 0.5) + 1)
    model = open_clip.CLIP(**cfg).train()
    image = lambda b: torch.randn(b, 3, 32, 32)  # noqa: E731
    encode = lambda x: model.encode_image(x, normalize=True)  # noqa: E731
    predicted = M.tower_activations(kept, kept.num_layers, False, patch_dropout=0.5).saved.nbytes(4)
    assert saved_bytes_per_sample(model, encode, image) + 4 * a.image.embed_dim == predicted
    model.lock_image_tower(unlocked_groups=0)
    # frozen: autograd saves nothing; the loss still keeps the (constant) features
    assert saved_bytes_per_sample(model, encode, image) == 0
    assert M.tower_activations(kept, 0, False, 0.5).saved.nbytes(4) == 2 * 4 * a.image.embed_dim


# --- Memory, traffic and time on hand-worked cases ------------------------------------------------


def test_model_states_by_stage():
    """Ψ = 1000 parameters, 600 trainable, 4 ranks; touched_only so the 5e8 bucket is what is written."""
    p_all, p, w = 1000, 600, 4
    s = M.model_states(p_all, p, w, 0, "fp32")
    assert (s.params, s.optimizer, s.resident) == (4000, 4800, 8800)
    assert (s.reduction.grads, s.reduction.buffers) == (2400, 2400)  # gradients + their flat copy
    s = M.model_states(p_all, p, w, 0, "bf16")
    assert (s.params, s.optimizer) == (2000, 7200)  # bf16 model; fp32 master + moments, 12 bytes
    assert (s.step.grads, s.step.buffers) == (1200, 2400)  # bf16 gradients and their fp32 copies
    s = M.model_states(p_all, p, w, 1, "bf16", touched_only=True)
    assert (s.params, s.optimizer, s.grad_partition) == (2000, 12 * 150, 2 * 150)
    assert s.backward.buffers == 2 * 600 and s.reduction.buffers == 2 * (600 + 600)
    assert s.step.buffers == 2 * 150 + 4 * 150  # the slice's gradients flattened, then in fp32
    assert M.model_states(p_all, p, w, 2, "bf16", True) == s  # one code path in DeepSpeed
    assert M.model_states(p_all, p, w, 1, "bf16").backward.buffers == 2 * M.REDUCE_BUCKET_ELEMENTS
    s = M.model_states(p_all, p, w, 3, "fp32", touched_only=True)
    assert (s.params, s.optimizer, s.grad_partition, s.bucket) == (1000, 1800, 600, 2400)
    assert s.backward.buffers == 4000 + 4000  # every parameter gathered, through one flat buffer
    assert s.step.buffers == 600  # fp32 training: the flattened slice is already fp32
    assert M.zero_paper_bytes(p_all, w, 0) == 16_000 and M.zero_paper_bytes(p_all, w, 3) == 4000
    assert M.zero_paper_bytes(p_all, w, 1) == 4000 + 3000 and M.zero_paper_bytes(p_all, w, 2) == 2000 + 3500


def test_loss_memory():
    # tiled, B = 2, W = 3, D = 4, tile 2: forward 24 + 16 + 18 + 6 + 2·4 = 72; backward 48 + 24 + 8 = 80
    assert M.tiled_loss_bytes(2, 3, 4, tile_size=2) == 4 * 80
    assert M.tiled_loss_bytes(2, 3, 4, tile_size=2, upcast=True) == 4 * (80 + 16)
    # ClipLoss: four (B, W·B) matrices, the two gathered features, the two scaled local ones
    assert M.clip_loss_bytes(2, 3, 4) == 4 * (4 * 2 * 6 + 2 * 24 + 2 * 8)
    # The Inf-CL paper's OpenCLIP column (ViT-L/14, D 768, 8 GPUs): 33.64 GB at 128k
    assert M.clip_loss_bytes(128 * 1024 // 8, 8, 768) / GIB == pytest.approx(33.64, rel=0.03)


def test_traffic_and_loss_flops():
    # 4 ranks send 3/4 of 2Ψ (stages 0-2) or of 2Ψ + Ψ_t (stage 3), in the training dtype
    assert C.gradient_bytes(1000, 600, 4, 1, 2) == 0.75 * 1200 * 2
    assert C.gradient_bytes(1000, 600, 4, 3, 4) == 0.75 * 2600 * 4
    assert C.gradient_bytes(1000, 600, 1, 0, 2) == 0  # one rank: no traffic
    # tiled: texts both ways plus the (W, W·B) log-sum-exps; clip: images and texts both ways
    assert C.feature_bytes("tiled", 2, 3, 4) == 4 * 2 * (2 * 8 + 6)
    assert C.feature_bytes("clip", 2, 3, 4) == 4 * 2 * 4 * 8
    assert C.loss_flops("tiled", 2, 3, 4) == 4 * 2 * 2 * 6 * 4
    assert C.loss_flops("clip", 2, 3, 4) == 6 * 2 * 2 * 6 * 4


def test_plan_adds_up():
    p = plan(Setup("ViT-B-16", num_gpus=64, global_batch=32768, num_samples=10**9, gpu="A100-80GB"))
    t, r, mdl = p.time, p.run, p.model
    b = 32768 // 64
    assert t["samples_per_s_per_gpu"] == pytest.approx(b / t["step_s"])
    executed = b * mdl["train_flops_per_sample"] + C.loss_flops("tiled", b, 64, 512)
    assert t["compute_s"] == pytest.approx(executed / (DEFAULT_UTILISATION * 312e12))
    assert r["num_steps"] == math.ceil(10**9 / 32768)
    assert r["gpu_days"] == pytest.approx(r["num_steps"] * t["step_s"] * 64 / 86400)
    assert p.data["cpu_hours"] == pytest.approx(10**9 * 23.1 / 10_000 / 3600)
    assert p.memory["fits"] and p.memory["peak"] == max(p.memory["phases"].values())
    # checkpointing costs one more forward pass of the blocks, and frees most activations
    q = plan(Setup("ViT-B-16", 64, 32768, gpu="A100-80GB", grad_checkpointing=True))
    assert (
        q.time["step_s"] > t["step_s"] and q.memory["activations_saved"] < p.memory["activations_saved"] / 4
    )
    assert q.max_batch_per_gpu["num_local"] > 3 * p.max_batch_per_gpu["num_local"]


@pytest.mark.parametrize("loss", ["tiled", "clip"])
def test_largest_batch_is_where_memory_runs_out(loss):
    setup = Setup("ViT-B-32", num_gpus=8, global_batch=8, gpu="A100-40GB", loss=loss)
    p, m = plan(setup), model_view(setup)
    largest = p.max_batch_per_gpu["num_local"]
    capacity = p.memory["capacity"]
    assert peak_memory(setup, m, largest)[0] <= capacity < peak_memory(setup, m, largest + 1)[0]


def test_default_utilisation_is_the_b32_fit():
    """open_clip's ViT-B/32 on 128 A100-40GB, 32k batch: 787-850 samples/s per GPU (DDP: gradients
    reduced behind the backward pass; its ClipLoss)."""
    setup = Setup("ViT-B-32", 128, 32768, gpu="A100-40GB", zero_stage=0, overlap_grad_comm=True, loss="clip")
    assert fit_utilisation(setup, (787 + 850) / 2) == pytest.approx(DEFAULT_UTILISATION, abs=0.0005)


def test_gpu_by_table_key_or_nvidia_smi_name():
    from clip_pipe.plan.gpus import gpu

    assert gpu("h100-sxm").name == "H100-SXM" and gpu("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert gpu("NVIDIA H100 PCIe").name == "H100-PCIe" and gpu("NVIDIA H200").name == "H200"
    assert (
        gpu("NVIDIA A100-SXM4-80GB").name == "A100-80GB" and gpu("NVIDIA A100-SXM4-40GB").name == "A100-40GB"
    )
    with pytest.raises(ValueError, match="unknown GPU 'Tesla V100-SXM2-32GB'"):
        gpu("Tesla V100-SXM2-32GB")
    # another GPU, by its figures
    p = plan(Setup("ViT-B-32", 8, 256, gpu="V100", gpu_flops=125e12, gpu_memory_gib=32))
    assert p.gpu["bf16_flops"] == 125e12 and p.memory["capacity"] == 30 * GIB


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_prints_a_table(capsys):
    assert main(["plan", "--model", "ViT-B-16", "--gpus", "64", "--batch", "32768", "--samples", "1e9"]) == 0
    out = capsys.readouterr().out
    for label in ("memory per GPU", "largest batch per GPU", "bytes per step", "step time", "GPU-days",
                  "data prep"):  # fmt: skip
        assert label in out, out


def test_cli_json_is_the_plan(capsys):
    args = ["--model", "ViT-L-14", "--gpus", "256", "--batch", "262144", "--checkpointing", "--zero", "2"]
    assert main(["plan", *args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = plan(Setup("ViT-L-14", 256, 262144, zero_stage=2, grad_checkpointing=True)).to_dict()
    assert got == json.loads(json.dumps(want))
    assert got["setup"]["grad_checkpointing"] and got["run"] is None


def test_format_plan_names_a_setup_that_does_not_fit():
    text = format_plan(plan(Setup("ViT-L-14", 8, 8 * 4096, gpu="A100-40GB", loss="clip")))
    assert "DOES NOT FIT" in text and "note: does not fit" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "ViT-Nope", "--gpus", "8", "--batch", "64"], "error: unknown model 'ViT-Nope'"),
        (["--model", "RN50", "--gpus", "8", "--batch", "64"], "its image tower is a ResNet"),
        (["--model", "ViT-B-32", "--gpus", "8", "--batch", "64", "--gpu", "V100"], "unknown GPU 'V100'"),
        (["--model", "ViT-B-32", "--gpus", "64", "--batch", "1000"], "1000 is not divisible by 64 GPUs"),
        (["--model", "ViT-B-32", "--gpus", "8", "--batch", "64", "--zero", "4"], "ZeRO stage must be"),
        (["--model", "ViT-B-32", "--gpus", "8", "--batch", "64", "--patch-dropout", "1"], "patch dropout"),
        (
            ["--model", "ViT-B-32", "--gpus", "8", "--batch", "64", "--unlocked-image-layers", "2"],
            "--lock-image",
        ),
    ],
)
def test_bad_input_is_one_line(capsys, args, message):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bad_input_from_the_shell_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "clip_pipe.cli", "plan", "--model", "ViT-B-32", "--gpus", "3", "--batch", "64"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.startswith("error: global batch 64 is not divisible by 3 GPUs")
        and "Traceback" not in proc.stderr
    )
