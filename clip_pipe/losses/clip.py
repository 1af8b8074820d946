"""Symmetric InfoNCE (the CLIP loss) with negatives from every rank of the job: the plain reference.

Each rank computes its local-loss form: logits of its B local rows against all W·B gathered columns,
(B, W·B), in both directions. The all-gather keeps its gradient, so every rank's loss also trains the
encoders of the samples it borrowed as negatives. With DeepSpeed averaging parameter gradients over
ranks, the update is exactly that of one process computing the loss over the whole global batch;
`tests/test_loss.py` checks this against the single-process reference in real multi-process runs.

It holds two (B, W·B) logit matrices and their softmaxes: `TiledClipLoss` computes the same loss in
O(B·tile) memory and is what training uses; this one stays as the readable definition it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_pipe.losses.gather import all_gather_with_grad

MAX_LOGIT_SCALE = 100.0
"""Ceiling on exp(logit_scale), as in CLIP: every loss and the zero-shot classifier clamp at it."""


def upcast(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    max_logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every loss's first step: features in (at least) fp32, since softmaxes and log-sum-exps over thousands
    of columns need it even when the towers run in bf16, and the scale clamped at `max_logit_scale`.
    Clamping here rather than editing the parameter keeps ZeRO's fp32 master weights in charge, and
    autograd gives the clamp's own gradient (0 above it)."""
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    return image_features.to(dtype), text_features.to(dtype), logit_scale.to(dtype).clamp(max=max_logit_scale)


class ClipLoss(nn.Module):
    """Mean of image→text and text→image cross-entropy over the global batch.

    Every rank must pass the same local batch size B (the loader guarantees equal batches).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, max_logit_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        assert 0 <= rank < world_size
        self.rank, self.world_size, self.max_logit_scale = rank, world_size, max_logit_scale

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        image_features, text_features, scale = upcast(
            image_features, text_features, logit_scale, self.max_logit_scale
        )  # (B, D), (B, D), (1,)
        num_local = image_features.shape[0]

        all_image = all_gather_with_grad(image_features, self.rank, self.world_size)  # (W·B, D)
        all_text = all_gather_with_grad(text_features, self.rank, self.world_size)  # (W·B, D)

        logits_per_image = scale * image_features @ all_text.T  # (B, W·B)
        logits_per_text = scale * text_features @ all_image.T  # (B, W·B)
        if logit_bias is not None:
            # A shared shift changes no softmax (its gradient is zero); added so a model trained
            # with a bias gives the same logits here as in open_clip's ClipLoss.
            bias = logit_bias.to(scale.dtype)
            logits_per_image, logits_per_text = logits_per_image + bias, logits_per_text + bias
        labels = torch.arange(num_local, device=image_features.device) + self.rank * num_local
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
