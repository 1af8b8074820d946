"""Memory per GPU: model states by ZeRO stage as DeepSpeed allocates them, activations, and the loss.

Every term is counted from what the code allocates, not fitted to a measurement:

- **Activations** are the tensors autograd saves for the backward pass, block by block (listed in
  `block_saved`), plus the transient of one block's backward pass. With activation checkpointing
  only each block's input is saved, and one block at a time is recomputed.
- **Model states** follow the ZeRO paper (parameters, gradients, fp32 master weights and Adam's two
  moments, each partitioned from the stage that partitions it), plus the buffers DeepSpeed adds on
  top, as configured by clip-pipe (`engine.py`, DeepSpeed's defaults otherwise; see `model_states`).
- **The loss**: the tiled loss holds the gathered texts and their gradient, O(W·B·D), and two
  tile × tile blocks; open_clip's ClipLoss (local loss) four (B, W·B) fp32 matrices.

Sizes are bytes per GPU (per rank); counts of elements are named `num_*`.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

from clip_pipe.plan.arch import Tower

FP32, INT64 = 4, 8

# DeepSpeed's defaults, which clip-pipe's generated config leaves alone (deepspeed/runtime/zero/config.py).
REDUCE_BUCKET_ELEMENTS = 500_000_000  # reduce_bucket_size; also ZeRO-0's all-reduce chunk
PREFETCH_BUCKET_ELEMENTS = 50_000_000  # stage3_prefetch_bucket_size: one all-gather's flat buffer
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters: gathered parameters kept whole


# --- Activations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Saved:
    """Elements autograd keeps for one sample, by how they are stored."""

    model: int = 0  # in the model's dtype (bf16: 2 bytes, fp32: 4)
    stats: int = 0  # LayerNorm means and 1/stds: fp32 on a GPU; on a CPU, the input's dtype
    fp32: int = 0  # attention log-sum-exps
    int64: int = 0  # token ids, patch-dropout indices

    def nbytes(self, dtype_bytes: int, stats_bytes: int = FP32) -> int:
        return self.model * dtype_bytes + self.stats * stats_bytes + self.fp32 * FP32 + self.int64 * INT64

    def __add__(self, other: Saved) -> Saved:
        return Saved(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __mul__(self, k: int) -> Saved:
        return Saved(*(a * k for a in astuple(self)))


def block_saved(tower: Tower, num_tokens: int | None = None) -> Saved:
    """What one of open_clip's residual attention blocks saves for backward, per sample.

    Per token (width d, MLP width h), in the model's dtype:
      ln_1's input x (d) · in_proj's input, ln_1's output (d) · q, k, v: the contiguous copy of the
      packed projection (3d), kept by the fused attention kernel · the kernel's output (d), which is
      also out_proj's input (the kernel writes it in the token-major layout out_proj reads, so
      nn.MultiheadAttention's `.contiguous()` copies nothing) · ln_2's input, x + attention (d) ·
      c_fc's input, ln_2's output (d) · GELU's input (h) · c_proj's input, GELU's output (h).
      QuickGELU, x·sigmoid(1.702x), keeps the sigmoid's output too (h); LayerScale keeps each branch's
      output (2d).
    Statistics: each LayerNorm's mean and 1/std (2 × 2); in fp32, the kernel's log-sum-exp per head.
    A fused kernel (flash or memory-efficient; torch's CPU kernel too) never stores the n × n matrix.
    """
    n = tower.num_tokens if num_tokens is None else num_tokens
    d, h = tower.width, tower.mlp_width
    per_token = 8 * d + 2 * h + (h if tower.quick_gelu else 0) + (2 * d if tower.layer_scale else 0)
    return Saved(model=n * per_token, stats=4 * n, fp32=n * tower.num_heads)


def block_backward_transient(tower: Tower) -> Saved:
    """Gradients alive at once inside one block's backward pass, beyond what it saved: the gradient
    of the residual stream, twice (the input's and the branch's), and of the MLP's hidden layer
    (GELU's input; its output's gradient replaces the c_proj input that was just freed)."""
    return Saved(model=tower.num_tokens * (tower.mlp_width + 2 * tower.width))


def embed_saved(tower: Tower, patch_dropout: float = 0.0) -> Saved:
    """Before the blocks. Image: the patch convolution's input (the pixels), ln_pre's input and
    statistics, patch dropout's kept indices. Text: the token ids (the embedding's backward needs them)."""
    if tower.name == "text":
        return Saved(int64=tower.num_tokens)
    n, d = tower.num_tokens, tower.width
    saved = Saved(model=tower.num_pixels)
    if tower.ln_pre:
        saved += Saved(model=n * d, stats=2 * n)
    if patch_dropout > 0:  # the kept patches' indices, and each sample's row index
        saved += Saved(int64=n)
    return saved


def head_saved(tower: Tower) -> Saved:
    """After the blocks: the final LayerNorm and pooling, the projection's input, and the normalised
    features (F.normalize keeps its input and the norm; the loss keeps its output).

    Whether a tensor outlives the pooling depends on the pooling: a view (the class token, the first
    or last token) keeps the whole (n, d) tensor it views alive; a mean or a gathered row does not.
    open_clip's text tower always norms every token, then pools (its `final_ln_after_pool` is
    honoured by the image tower only).
    """
    n, d, e = tower.num_tokens, tower.width, tower.embed_dim
    view_pool = tower.pool in ("tok", "first", "last")
    if tower.name == "image" and tower.final_ln_after_pool:  # pool, then norm one token
        # norm's input: the pooled row, a view of the last block's output, or a new mean (d)
        saved = Saved(model=(n * d if view_pool else d) + d, stats=2)
    else:  # norm every token, then pool: a view keeps the norm's output, an index copies one row
        saved = Saved(model=n * d + (n * d if view_pool else d), stats=2 * n)
        if tower.pool in ("argmax", "eos"):
            saved += Saved(int64=2)  # the gather's row and column indices
    return saved + Saved(model=2 * e + 2)


@dataclass(frozen=True)
class TowerActivations:
    """Per sample: kept through the step (`saved`), and the most added at once while a block's backward
    runs (`working`: with checkpointing, the recomputed block's own saved tensors plus its gradients)."""

    saved: Saved
    working: Saved


def tower_activations(
    tower: Tower, num_trainable_layers: int, checkpointing: bool, patch_dropout: float = 0.0
) -> TowerActivations:
    """A tower whose top `num_trainable_layers` blocks train (all: the whole tower trains; 0: it is
    frozen, and autograd saves nothing in it: no input or weight of it needs a gradient)."""
    if num_trainable_layers == 0:
        return TowerActivations(saved=Saved(model=2 * tower.embed_dim), working=Saved())
    whole = num_trainable_layers == tower.num_layers
    embed = embed_saved(tower, patch_dropout) if whole else Saved()
    block = block_saved(tower)
    transient = block_backward_transient(tower)
    if checkpointing:  # each block keeps its input (the residual stream, n·d); one block is recomputed
        inputs = Saved(model=tower.num_tokens * tower.width)
        return TowerActivations(
            saved=embed + inputs * num_trainable_layers + head_saved(tower),
            working=Saved(block.model - inputs.model, block.stats, block.fp32) + transient,
        )
    return TowerActivations(saved=embed + block * num_trainable_layers + head_saved(tower), working=transient)


def backward_peak(
    image: TowerActivations,
    text: TowerActivations,
    num_local: int,
    dtype_bytes: int,
    loss: int,
    embedding_grad: int,
    stats_bytes: int = FP32,
) -> int:
    """The most activation memory alive at once in a step, bytes per rank (the loss's included):

    - at the top of the backward pass: everything saved, plus the loss's backward or one block's
      backward working set, whichever is larger (they run one after the other);
    - at the end of the text tower's backward, which autograd runs first (its nodes are newer): the
      token embedding's gradient, a dense (vocab, width) tensor, made while the image tower's saved
      tensors are all still alive.
    """
    saved = (
        image.saved.nbytes(dtype_bytes, stats_bytes) + text.saved.nbytes(dtype_bytes, stats_bytes)
    ) * num_local
    working = max(
        image.working.nbytes(dtype_bytes, stats_bytes), text.working.nbytes(dtype_bytes, stats_bytes)
    )
    image_saved = image.saved.nbytes(dtype_bytes, stats_bytes) * num_local
    return max(saved + max(loss, working * num_local), image_saved + embedding_grad)


# --- The loss ------------------------------------------------------------------------------------


def tiled_loss_bytes(num_local: int, world_size: int, dim: int, tile_size: int, upcast: bool = False) -> int:
    """Peak bytes of clip-pipe's tiled InfoNCE (`losses/tiled.py`), fp32, beyond its input features.

    Forward: the gathered texts (W·B, D), the scaled images and the positives' product (B, D each),
    the gathered per-rank column log-sum-exps (W, W·B) and one logit block. Backward: the gathered
    texts, their gradient (W·B, D), the scaled images, the images' gradient and the scale's product
    (B, D each), and two blocks (logits, softmaxes). `upcast`: bf16 features are copied to fp32 first.
    """
    b, w, d = num_local, world_size, dim
    block = min(tile_size, b) * min(tile_size, w * b)
    forward = w * b * d + 2 * b * d + w * w * b + w * b + 2 * block
    backward = 2 * w * b * d + 3 * b * d + 2 * block
    return FP32 * (max(forward, backward) + (2 * b * d if upcast else 0))


def clip_loss_bytes(num_local: int, world_size: int, dim: int, upcast: bool = False) -> int:
    """Peak bytes of open_clip's ClipLoss (local_loss=True, gather_with_grad=True), fp32, beyond its inputs.

    At the end of its forward pass it holds both directions' logits and both log-softmaxes, four
    (B, W·B) matrices, plus both gathered features (W·B, D) and both scaled local features (B, D); in
    the backward pass two saved log-softmaxes, their gradient and the logits' gradient: four again.
    """
    b, w, d = num_local, world_size, dim
    return FP32 * (4 * b * w * b + 2 * w * b * d + 2 * b * d + (2 * b * d if upcast else 0))


# --- Model states --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """What a phase of the step adds to the resident states: gradients, and DeepSpeed's buffers."""

    grads: float = 0
    buffers: float = 0

    @property
    def total(self) -> float:
        return self.grads + self.buffers


@dataclass(frozen=True)
class ModelStates:
    """Bytes per rank. `resident` is held between steps; each phase adds its own transients on top:
    `backward` while the activations are alive, `reduction` at the end of the backward pass, `step`
    in the optimizer step."""

    params: float
    optimizer: float  # fp32 master weights (where DeepSpeed keeps a copy) + Adam's two moments
    grad_partition: float  # ZeRO 1-3: this rank's reduced gradients, kept between steps
    bucket: float  # ZeRO-3: the reduce bucket, allocated once and kept
    backward: Phase
    reduction: Phase
    step: Phase

    @property
    def resident(self) -> float:
        return self.params + self.optimizer + self.grad_partition + self.bucket

    @property
    def phases(self) -> dict[str, Phase]:
        return {
            "forward/backward": self.backward,
            "gradient reduction": self.reduction,
            "optimizer step": self.step,
        }


def model_states(
    num_params: int,
    num_trainable: int,
    world_size: int,
    zero_stage: int,
    precision: str,
    touched_only: bool = False,
) -> ModelStates:
    """What DeepSpeed (0.16-0.19, as clip-pipe configures it: torch AdamW, `bf16.enabled` or fp32,
    default buckets) holds per rank, with Ψ = `num_params` and Ψ_t = `num_trainable` (frozen
    parameters get no gradient, master copy or moments), W = `world_size`.

    - Stage 0, fp32: the model is the master copy; moments 8Ψ_t. After backward the gradients (4Ψ_t)
      and the all-reduce's flattened copy of them (4Ψ_t, in chunks of 5e8 elements).
    - Stage 0, bf16 (DeepSpeed's FP16_UnfusedOptimizer): bf16 model 2Ψ, fp32 master 4Ψ_t, moments 8Ψ_t;
      the step holds the bf16 gradients (2Ψ_t) and their fp32 copies (4Ψ_t) at once.
    - Stages 1-2 (one code path in DeepSpeed): the whole model, a 1/W slice of the fp32 master and
      moments (12Ψ_t/W, kept in fp32 even when training in fp32), this rank's reduced gradients
      (Ψ_t/W), a reduce bucket of 5e8 elements allocated as the backward pass starts, plus one
      flattened copy of its contents while it is reduced; the step flattens the slice's gradients and
      (bf16) copies them to fp32.
    - Stage 3: 1/W of everything, plus the reduce bucket, kept; in forward and backward DeepSpeed
      gathers whole parameters and keeps up to 1e9 elements of them (stage3_max_live_parameters:
      every model under a billion parameters stays whole), with one all-gather's flat buffer (5e7).

    `touched_only`: count an allocation only as far as it is written (what a CPU's RSS sees: the
    5e8-element buckets are `torch.empty`, and pages never touched cost nothing there; a GPU's
    allocator reserves them whole).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, not {zero_stage}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', not {precision!r}")
    w, p_all, p = world_size, num_params, num_trainable
    lp = 2 if precision == "bf16" else FP32  # parameter and gradient bytes
    chunk = min(p, REDUCE_BUCKET_ELEMENTS)  # what one flattened reduction holds
    bucket = 0 if p == 0 else chunk if touched_only else REDUCE_BUCKET_ELEMENTS
    if zero_stage == 0:
        if precision == "fp32":
            return ModelStates(
                params=FP32 * p_all, optimizer=8 * p, grad_partition=0, bucket=0, backward=Phase(),
                reduction=Phase(grads=FP32 * p, buffers=FP32 * chunk), step=Phase(grads=FP32 * p),
            )  # fmt: skip
        return ModelStates(
            params=2 * p_all, optimizer=12 * p, grad_partition=0, bucket=0, backward=Phase(),
            reduction=Phase(grads=2 * p, buffers=2 * chunk), step=Phase(grads=2 * p, buffers=FP32 * p),
        )  # fmt: skip
    slice_ = p / w
    step = Phase(buffers=lp * slice_ + (0 if precision == "fp32" else FP32 * slice_))
    if zero_stage in (1, 2):
        return ModelStates(
            params=lp * p_all, optimizer=12 * slice_, grad_partition=lp * slice_, bucket=0,
            backward=Phase(buffers=lp * bucket), reduction=Phase(buffers=lp * (bucket + chunk)), step=step,
        )  # fmt: skip
    gathered = lp * min(p_all, MAX_LIVE_PARAMETERS)
    return ModelStates(
        params=lp * p_all / w, optimizer=12 * slice_, grad_partition=lp * slice_, bucket=lp * bucket,
        backward=Phase(buffers=gathered + lp * min(p_all, PREFETCH_BUCKET_ELEMENTS)),
        reduction=Phase(buffers=gathered), step=step,
    )  # fmt: skip


def zero_paper_bytes(num_params: int, world_size: int, zero_stage: int) -> float:
    """The ZeRO paper's model-state memory for mixed-precision Adam (2Ψ + 2Ψ + 12Ψ, K = 12), for
    reference beside DeepSpeed's actual buffers: 16Ψ, 4Ψ + 12Ψ/W, 2Ψ + 14Ψ/W, 16Ψ/W."""
    p, w = num_params, world_size
    return {0: 16 * p, 1: 4 * p + 12 * p / w, 2: 2 * p + 14 * p / w, 3: 16 * p / w}[zero_stage]
