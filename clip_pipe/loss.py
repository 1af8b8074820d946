"""Symmetric InfoNCE (the CLIP loss) with negatives from every rank of the job.

Each rank computes its local-loss form: logits of its B local rows against all W·B gathered columns,
(B, W·B). The all-gather keeps its gradient, so every rank's loss also trains the encoders of the
samples it borrowed as negatives. With DeepSpeed averaging parameter gradients over ranks, the update
is exactly that of one process computing the loss over the whole global batch; `tests/test_loss.py`
checks this against the single-process reference in real multi-process runs.

This is the one collective in the model path; rank and world size are passed in, never discovered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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
    if world_size == 1:
        return x
    return _AllGatherWithGrad.apply(x, rank, world_size)


class ClipLoss(nn.Module):
    """Mean of image→text and text→image cross-entropy over the global batch.

    Every rank must pass the same local batch size B (the loader guarantees equal batches).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, max_logit_scale: float = 100.0):
        super().__init__()
        assert 0 <= rank < world_size
        self.rank, self.world_size, self.max_logit_scale = rank, world_size, max_logit_scale

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        # Softmax over thousands of columns is done in (at least) fp32 even when the towers run in bf16.
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        image_features, text_features = image_features.to(dtype), text_features.to(dtype)  # (B, D)
        # Clamping here rather than editing the parameter keeps ZeRO's fp32 master weights in charge.
        scale = logit_scale.to(dtype).clamp(max=self.max_logit_scale)
        num_local = image_features.shape[0]

        all_image = all_gather_with_grad(image_features, self.rank, self.world_size)  # (W·B, D)
        all_text = all_gather_with_grad(text_features, self.rank, self.world_size)  # (W·B, D)

        logits_per_image = scale * image_features @ all_text.T  # (B, W·B)
        logits_per_text = scale * text_features @ all_image.T  # (B, W·B)
        labels = torch.arange(num_local, device=image_features.device) + self.rank * num_local
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
