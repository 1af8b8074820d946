"""Bytes each rank sends per step (ring collectives: it receives as much), and the loss's FLOPs.

Gradients follow the ZeRO paper's accounting: data parallelism, and ZeRO stages 1 and 2, reduce-
scatter then all-gather Ψ elements, 2Ψ in all; stage 3 also all-gathers the parameters in the
forward and again in the backward pass, 3Ψ. A ring over W ranks sends (W-1)/W of that per rank.
Frozen parameters have no gradient to reduce, but ZeRO-3 still gathers them.
"""

from __future__ import annotations

FP32 = 4


def gradient_bytes(
    num_params: int, num_trainable: int, world_size: int, zero_stage: int, dtype_bytes: int
) -> float:
    """Per rank per step: gradients (and, at stage 3, parameters) in the training dtype."""
    ring = (world_size - 1) / world_size
    elements = 2 * num_trainable if zero_stage < 3 else 2 * num_params + num_trainable
    return ring * elements * dtype_bytes


def feature_bytes(loss: str, num_local: int, world_size: int, dim: int) -> float:
    """Per rank per step: the loss's exchange of features (fp32, as both losses compute in fp32).

    tiled: the texts all-gathered (forward) and their gradient reduce-scattered (backward), plus the
    per-rank column log-sum-exps gathered, (W, W·B) floats. clip: images and texts both ways.
    """
    w, b, d = world_size, num_local, dim
    if loss == "tiled":
        return FP32 * (w - 1) * (2 * b * d + w * b)
    return FP32 * (w - 1) * 4 * b * d


def loss_flops(loss: str, num_local: int, world_size: int, dim: int) -> int:
    """Per rank per step. tiled: one logit product forward; backward recomputes it and takes both
    gradients (8·B·WB·D). clip: two products forward, two gradients each backward (12·B·WB·D)."""
    per_product = 2 * num_local * world_size * num_local * dim
    return (4 if loss == "tiled" else 6) * per_product
