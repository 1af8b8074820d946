"""The plan for one training setup: memory, traffic and time per GPU, the run's GPU-days, data prep.

`plan(Setup(...))` composes the pieces: `arch` (parameters, FLOPs), `memory` (model states,
activations, loss), `comms` (bytes per step) and `gpus` (peak, memory, bandwidth).

Step time = executed FLOPs / (utilisation × peak) + the communication that is not hidden. The
utilisation is the fraction of the bf16 peak the GPU sustains on the FLOPs it executes, recompute
included; without activation checkpointing it is the MFU. Its default, `DEFAULT_UTILISATION`, is the
one figure fitted to a published run (open_clip's ViT-B/32 on 128 A100s: `bench/plan_check.py`);
everything else is counted.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field

from clip_pipe.plan import arch as arch_
from clip_pipe.plan import comms, memory
from clip_pipe.plan.gpus import GIB, Gpu, gpu, link_gb_s

# Fitted by `bench/plan_check.py` to open_clip's ViT-B/32 (787-850 samples/s per A100-40GB, 128 GPUs,
# 32k batch); tests/test_plan.py checks that the fit still gives this value.
DEFAULT_UTILISATION = 0.120

# Data prep, measured by `bench/prep.py` (docs/benchmarks.md, "Data prep against img2dataset"): 23.1 CPU
# seconds for 10,000 images fetched from a local server, decoded, resized to 224 px, re-encoded at JPEG
# quality 95, hashed and written to shards.
PREP_CPU_SECONDS_PER_PAIR = 23.1 / 10_000
# Storage per pair: img2dataset's LAION-400M example (256 px, JPEG 95) came to 10 TB.
DEFAULT_BYTES_PER_PAIR = 25_000
DEFAULT_TILE_SIZE = (
    1024  # clip_pipe.losses.tiled.DEFAULT_TILE_SIZE (not imported: it pulls in torch.distributed)
)


@dataclass(frozen=True)
class Setup:
    """One training setup. Every field is an input of the plan; the defaults are clip-pipe's."""

    model: str
    """An open_clip or clip-pipe model config name (ViT image tower and open_clip text transformer)."""
    num_gpus: int
    global_batch: int
    """Samples per optimizer step, all GPUs together (the loss's negatives)."""
    gpu: str = "H100-SXM"
    zero_stage: int = 1
    precision: str = "bf16"
    """bf16 (bf16 weights, activations and gradients; fp32 master weights and Adam moments) or fp32."""
    loss: str = "tiled"
    """tiled (clip-pipe's default) or clip (open_clip's ClipLoss, local loss)."""
    tile_size: int = DEFAULT_TILE_SIZE
    patch_dropout: float = 0.0
    """Fraction of image patches dropped while training (FLIP)."""
    grad_checkpointing: bool = False
    lock_image: bool = False
    unlocked_image_layers: int = 0
    """With lock_image: the top N blocks (with the final norm and projection) stay trainable:
    open_clip's unlocked_groups = N + 1. 0: the whole image tower is frozen (LiT)."""
    lock_text: bool = False
    num_samples: int = 0
    """Samples seen in the whole run (0: no run line)."""
    utilisation: float = DEFAULT_UTILISATION
    """Fraction of the bf16 peak sustained on the executed FLOPs (the MFU when nothing is recomputed)."""
    image_size: int | None = None
    context_length: int | None = None
    gpu_flops: float | None = None
    """Override the table's bf16 peak, FLOP/s."""
    gpu_memory_gib: float | None = None
    network_gb_s: float | None = None
    """Override the bandwidth a ring collective runs at (GB/s per GPU)."""
    overlap_grad_comm: bool | None = None
    """Whether the gradient reduction hides behind the backward pass. None: as DeepSpeed does under
    clip-pipe's config: at stage 3 (overlap_comm), not at 0-2 (their 5e8-element buckets hold the
    whole model, so the reduction waits for the end of the backward pass)."""
    reserve_gib: float = 2.0
    """GPU memory not available to tensors: CUDA context, NCCL buffers, allocator fragmentation."""
    prep_cores: int = 64
    bytes_per_pair: int = DEFAULT_BYTES_PER_PAIR

    def __post_init__(self):
        _check(self.num_gpus >= 1, f"--gpus must be >= 1, not {self.num_gpus}")
        _check(self.global_batch >= 1, f"--batch must be >= 1, not {self.global_batch}")
        _check(
            self.global_batch % self.num_gpus == 0,
            f"global batch {self.global_batch} is not divisible by {self.num_gpus} GPUs: every rank "
            "takes the same number of samples",
        )
        _check(self.zero_stage in (0, 1, 2, 3), f"ZeRO stage must be 0, 1, 2 or 3, not {self.zero_stage}")
        _check(self.precision in ("bf16", "fp32"), f"precision must be bf16 or fp32, not {self.precision!r}")
        _check(self.loss in ("tiled", "clip"), f"loss must be tiled or clip, not {self.loss!r}")
        _check(0 <= self.patch_dropout < 1, f"patch dropout must be in [0, 1), not {self.patch_dropout}")
        _check(0 < self.utilisation <= 1, f"utilisation must be in (0, 1], not {self.utilisation}")
        _check(self.tile_size >= 1, f"tile size must be >= 1, not {self.tile_size}")
        _check(self.unlocked_image_layers >= 0, "unlocked image layers must be >= 0")
        _check(
            self.lock_image or self.unlocked_image_layers == 0,
            "unlocked image layers only apply with a locked image tower (--lock-image)",
        )
        _check(self.num_samples >= 0, f"samples must be >= 0, not {self.num_samples}")
        _check(self.reserve_gib >= 0, "reserve must be >= 0 GiB")
        _check(
            self.prep_cores >= 1 and self.bytes_per_pair >= 1, "prep cores and bytes per pair must be >= 1"
        )
        for name in ("gpu_flops", "gpu_memory_gib", "network_gb_s"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{name.replace('_', '-')} must be > 0, not {value}")

    @property
    def num_local(self) -> int:
        return self.global_batch // self.num_gpus


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class Plan:
    """Everything `plan` works out, in plain numbers (bytes, seconds, FLOPs): `asdict` is the JSON."""

    setup: dict
    gpu: dict
    model: dict
    memory: dict
    max_batch_per_gpu: dict
    comms: dict
    time: dict
    run: dict | None
    data: dict | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_gpu(setup: Setup) -> Gpu:
    try:
        g = gpu(setup.gpu)
    except ValueError:
        if setup.gpu_flops is None or setup.gpu_memory_gib is None:
            raise
        g = Gpu(setup.gpu, setup.gpu_flops, setup.gpu_memory_gib, 25, 25)  # another GPU, by its figures
    return Gpu(
        g.name,
        setup.gpu_flops or g.bf16_flops,
        setup.gpu_memory_gib or g.memory_gib,
        setup.network_gb_s or g.nvlink_gb_s,
        setup.network_gb_s or g.network_gb_s,
        g.gpus_per_node,
    )


@dataclass(frozen=True)
class _Model:
    """The model as a setup trains it: towers after patch dropout, and what trains."""

    arch: arch_.Architecture
    image: arch_.Tower
    text: arch_.Tower
    image_layers: int  # trainable blocks
    text_layers: int
    num_trainable: int


@functools.lru_cache(maxsize=32)
def _architecture(name: str, cfg_json: str) -> arch_.Architecture:
    return arch_.architecture(name, json.loads(cfg_json))  # builds the model on the meta device: cache it


def model_view(setup: Setup, model_cfg: dict | None = None) -> _Model:
    """The model as `setup` trains it (`model_cfg`: an architecture dict instead of the named one)."""
    cfg = (
        arch_.model_cfg(setup.model, setup.image_size, setup.context_length)
        if model_cfg is None
        else model_cfg
    )
    a = _architecture(setup.model, json.dumps(cfg, sort_keys=True))
    image = a.image
    if setup.patch_dropout > 0:  # open_clip's PatchDropout keeps int(patches × keep) and the class token
        image = image.with_tokens(max(1, int(image.num_patches * (1 - setup.patch_dropout))) + 1)
    if setup.unlocked_image_layers > image.num_layers:
        raise ValueError(
            f"--unlocked-image-layers {setup.unlocked_image_layers}: {setup.model}'s image tower has "
            f"{image.num_layers} blocks"
        )
    if setup.lock_image:
        image_layers = setup.unlocked_image_layers
        # the top blocks, ln_post (2d) and the projection (d × e)
        trainable_image = (
            image_layers * image.num_layer_params + 2 * image.width + image.width * image.embed_dim
            if image_layers
            else 0
        )
    else:
        image_layers, trainable_image = image.num_layers, image.num_params
    text_layers = 0 if setup.lock_text else a.text.num_layers
    trainable_text = 0 if setup.lock_text else a.text.num_params
    scalars = a.num_params - a.image.num_params - a.text.num_params
    num_trainable = trainable_image + trainable_text + scalars
    return _Model(a, image, a.text, image_layers, text_layers, num_trainable)


def activations(setup: Setup, m: _Model) -> tuple[memory.TowerActivations, memory.TowerActivations]:
    """Per sample, image tower and text tower."""
    return (
        memory.tower_activations(m.image, m.image_layers, setup.grad_checkpointing, setup.patch_dropout),
        memory.tower_activations(m.text, m.text_layers, setup.grad_checkpointing),
    )


def embedding_grad_bytes(setup: Setup, m: _Model) -> int:
    """The token embedding's dense gradient, made at the end of the text tower's backward pass."""
    return 0 if setup.lock_text else (2 if setup.precision == "bf16" else 4) * m.arch.num_token_embedding


def loss_bytes(setup: Setup, num_local: int, embed_dim: int) -> int:
    upcast = setup.precision != "fp32"
    if setup.loss == "tiled":
        return memory.tiled_loss_bytes(num_local, setup.num_gpus, embed_dim, setup.tile_size, upcast)
    return memory.clip_loss_bytes(num_local, setup.num_gpus, embed_dim, upcast)


def peak_memory(
    setup: Setup, m: _Model, num_local: int, touched_only: bool = False
) -> tuple[float, str, dict[str, float]]:
    """(peak bytes per rank, the phase it happens in, every phase's total)."""
    states = memory.model_states(
        m.arch.num_params, m.num_trainable, setup.num_gpus, setup.zero_stage, setup.precision, touched_only
    )
    image, text = activations(setup, m)
    dtype_bytes = 2 if setup.precision == "bf16" else 4
    loss = loss_bytes(setup, num_local, m.arch.embed_dim)
    extra = {
        "forward/backward": memory.backward_peak(
            image, text, num_local, dtype_bytes, loss, embedding_grad_bytes(setup, m)
        )
    }
    phases = {name: states.resident + p.total + extra.get(name, 0) for name, p in states.phases.items()}
    phase = max(phases, key=phases.get)
    return phases[phase], phase, phases


def plan(setup: Setup, model_cfg: dict | None = None) -> Plan:
    """The plan for `setup`; `model_cfg`: an open_clip architecture dict to use instead of the named
    model's (a model of one's own, not registered under a name)."""
    g = resolve_gpu(setup)
    m = model_view(setup, model_cfg)
    a, w, b = m.arch, setup.num_gpus, setup.num_local
    dtype_bytes = 2 if setup.precision == "bf16" else 4

    # --- model
    image_fwd, text_fwd = arch_.forward_flops(m.image), arch_.forward_flops(m.text)
    full = {"image": image_fwd, "text": text_fwd}

    def trainable(tower, layers):  # None: the whole tower trains (its embedding too)
        return (
            None
            if layers == tower.num_layers and not (tower.name == "image" and setup.lock_image)
            else layers
        )

    image_train = arch_.train_flops(m.image, trainable(m.image, m.image_layers))
    text_train = arch_.train_flops(m.text, trainable(m.text, m.text_layers))
    recompute = setup.grad_checkpointing * (
        m.image_layers * arch_.recompute_flops(m.image) + m.text_layers * arch_.recompute_flops(m.text)
    )
    model_flops = image_train + text_train  # per sample, what MFU counts
    loss_flops = comms.loss_flops(setup.loss, b, w, a.embed_dim)
    executed = b * (model_flops + recompute) + loss_flops  # per rank per step

    # --- memory
    states = memory.model_states(a.num_params, m.num_trainable, w, setup.zero_stage, setup.precision)
    image_acts, text_acts = activations(setup, m)
    saved = (image_acts.saved.nbytes(dtype_bytes) + text_acts.saved.nbytes(dtype_bytes)) * b
    working = max(image_acts.working.nbytes(dtype_bytes), text_acts.working.nbytes(dtype_bytes)) * b
    loss = loss_bytes(setup, b, a.embed_dim)
    peak, phase, phases = peak_memory(setup, m, b)
    capacity = g.memory_gib * GIB - setup.reserve_gib * GIB
    largest = _largest_batch(setup, m, capacity)

    # --- traffic and time
    link = link_gb_s(g, w) * 1e9
    grad_bytes = comms.gradient_bytes(a.num_params, m.num_trainable, w, setup.zero_stage, dtype_bytes)
    feat_bytes = comms.feature_bytes(setup.loss, b, w, a.embed_dim)
    compute_s = executed / (setup.utilisation * g.bf16_flops)
    grad_s, feat_s = grad_bytes / link, feat_bytes / link
    overlap = setup.zero_stage == 3 if setup.overlap_grad_comm is None else setup.overlap_grad_comm
    backward_s = compute_s * (1 - b * (image_fwd + text_fwd) / executed)  # all but the forward pass
    exposed_grad_s = max(0.0, grad_s - backward_s) if overlap else grad_s
    step_s = compute_s + exposed_grad_s + feat_s
    per_gpu = b / step_s

    notes = []
    if setup.zero_stage == 3 and a.num_params <= memory.MAX_LIVE_PARAMETERS:
        notes.append(
            "ZeRO-3 with DeepSpeed's default stage3_max_live_parameters (1e9) keeps a model this size "
            "whole on every GPU during forward and backward: it saves optimizer and gradient memory, "
            "not parameter memory"
        )
    if peak > capacity:
        notes.append(
            f"does not fit: the peak needs {peak / GIB:.1f} GiB of {capacity / GIB:.1f} GiB usable; "
            f"at most {largest['num_local']} per GPU fits"
        )
    run = None
    if setup.num_samples:
        num_steps = math.ceil(setup.num_samples / setup.global_batch)
        wall_s = num_steps * step_s
        run = {
            "num_samples": setup.num_samples,
            "num_steps": num_steps,
            "wall_hours": wall_s / 3600,
            "gpu_days": wall_s * w / 86400,
        }
    data = None
    if setup.num_samples:
        cpu_s = setup.num_samples * PREP_CPU_SECONDS_PER_PAIR
        data = {
            "num_pairs": setup.num_samples,
            "cpu_hours": cpu_s / 3600,
            "cores": setup.prep_cores,
            "wall_hours": cpu_s / setup.prep_cores / 3600,
            "storage_bytes": setup.num_samples * setup.bytes_per_pair,
            "bytes_per_pair": setup.bytes_per_pair,
            "note": "unique pairs: a run that sees each pair several times shards fewer",
        }
    return Plan(
        setup=asdict(setup),
        gpu=asdict(g),
        model={
            "num_params": a.num_params,
            "num_image_params": a.image.num_params,
            "num_text_params": a.text.num_params,
            "num_trainable": m.num_trainable,
            "image_tokens": m.image.num_tokens,
            "text_tokens": m.text.num_tokens,
            "forward_flops_per_sample": full,
            "train_flops_per_sample": model_flops,
            "recompute_flops_per_sample": recompute,
        },
        memory={  # each component at its most; the peak is the largest phase, not their sum
            "params": states.params,
            "grads": states.grad_partition + max(p.grads for p in states.phases.values()),
            "optimizer": states.optimizer,
            "deepspeed_buffers": states.bucket + max(p.buffers for p in states.phases.values()),
            "activations_saved": saved,
            "activations_working": working,
            "loss": loss,
            "peak": peak,
            "peak_phase": phase,
            "phases": phases,
            "zero_paper_model_states": memory.zero_paper_bytes(a.num_params, w, setup.zero_stage),
            "capacity": capacity,
            "fits": peak <= capacity,
        },
        max_batch_per_gpu=largest,
        comms={
            "gradient_bytes": grad_bytes,
            "feature_bytes": feat_bytes,
            "link_gb_s": link / 1e9,
            "gradient_s": grad_s,
            "gradient_overlapped": overlap,
            "feature_s": feat_s,
        },
        time={
            "executed_flops_per_step": executed,
            "compute_s": compute_s,
            "exposed_comm_s": exposed_grad_s + feat_s,
            "step_s": step_s,
            "samples_per_s_per_gpu": per_gpu,
            "samples_per_s": per_gpu * w,
            "utilisation": setup.utilisation,
            "mfu": b * model_flops / step_s / g.bf16_flops,
        },
        run=run,
        data=data,
        notes=notes,
    )


def _largest_batch(setup: Setup, m: _Model, capacity: float) -> dict:
    """The largest per-GPU batch whose peak fits in `capacity` (bisection: the peak grows with it)."""
    if peak_memory(setup, m, 1)[0] > capacity:
        return {"num_local": 0, "global_batch": 0}
    low, high = 1, 2
    while peak_memory(setup, m, high)[0] <= capacity and high < 2**24:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if peak_memory(setup, m, mid)[0] <= capacity else (low, mid)
    return {"num_local": low, "global_batch": low * setup.num_gpus}


def fit_utilisation(setup: Setup, samples_per_s_per_gpu: float, model_cfg: dict | None = None) -> float:
    """The utilisation at which `setup` runs at the given samples/s per GPU (bisection; samples/s grows
    with it). Raises ValueError if the exposed communication alone is too slow."""
    from dataclasses import replace

    def rate(u: float) -> float:
        return plan(replace(setup, utilisation=u), model_cfg).time["samples_per_s_per_gpu"]

    if rate(1.0) < samples_per_s_per_gpu:
        raise ValueError(f"{samples_per_s_per_gpu} samples/s is out of reach even at 100% of peak")
    low, high = 1e-4, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if rate(mid) < samples_per_s_per_gpu else (low, mid)
    return (low + high) / 2
