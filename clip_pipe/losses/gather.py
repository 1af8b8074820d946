"""The collectives of the model path, all in one place: every loss exchanges features only through here.

Rank and world size are passed in, never discovered; with `world_size == 1` each function is the identity
(or its single-process equivalent), so one code path serves both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.14 renamed these two; keep working on the older releases users run on clusters.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (B, ...) tensor into (W·B, ...); backward sends each rank its slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.world_size = rank, world_size
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        _all_gather_into(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss depends on every rank's features, so the gradient of this rank's slice
        # is the sum of the slice's gradients over all ranks' losses: exactly a reduce-scatter.
        out = grad.new_empty((grad.shape[0] // ctx.world_size, *grad.shape[1:]))
        _reduce_scatter_into(out, grad.contiguous())
        return out, None, None


def all_gather_with_grad(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Every rank's `x` (B, ...) stacked in rank order, (W·B, ...); gradients flow back to their owners."""
    if world_size == 1:
        return x
    return _AllGatherWithGrad.apply(x, rank, world_size)


def all_reduce_logsumexp(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """log Σ_ranks exp(x), elementwise, exactly (no gradient): combines per-rank partial log-sum-exps.

    Gathers the (W, ...) partials rather than all-reducing max and then sum, so the result is the same
    bits on every rank and needs one round trip.
    """
    if world_size == 1:
        return x
    parts = x.new_empty((world_size * x.shape[0], *x.shape[1:]))  # gloo wants the ranks concatenated
    _all_gather_into(parts, x.contiguous())
    return parts.view(world_size, *x.shape).logsumexp(dim=0)
