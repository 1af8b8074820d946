"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023), negatives from every rank, in O(B·tile) memory.

Every image–text pair is its own binary problem: z_ij = scale · I_i·T_j + bias, label +1 for the
caption of image i and −1 for every other text of the global batch, and rank r's loss is
(1/B) Σ_{i local, j global} softplus(−label_ij · z_ij), as in open_clip's SigLipLoss. Unlike the softmax
there is no normalisation over a row, so each (tile × tile) block of z is final as soon as it is
computed: the forward pass turns every block into its loss and its gradient at once (dL/dz =
(sigmoid(z) − [positive]) / B) and never revisits it. The texts come from the same gather with gradient
as InfoNCE's; the block walk is `tiles`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_pipe.losses.clip import MAX_LOGIT_SCALE, upcast
from clip_pipe.losses.gather import all_gather_with_grad
from clip_pipe.losses.tiled import DEFAULT_TILE_SIZE, tiles

INIT_LOGIT_SCALE = 2.302585092994046  # log 10: the paper's t' initialisation (scale 10)
INIT_LOGIT_BIAS = -10.0
"""The paper's initial bias: with it the many negatives start near their target, so early steps are stable."""


class _TiledSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, all_text, scale, bias, offset: int, tile_size: int):
        num_local, num_global = image.shape[0], all_text.shape[0]
        scaled_image = image * scale  # (B, D)
        local_text = all_text[offset : offset + num_local]  # (B, D): this rank's rows of the gather
        # Every pair counted as a negative, softplus(z); each positive's softplus(−z) = softplus(z) − z.
        positive = (scaled_image * local_text).sum(dim=1) + bias  # (B,)
        total = -positive.sum()
        needs_grad = any(ctx.needs_input_grad[:4])
        if needs_grad:
            grad_image = torch.zeros_like(image)  # (B, D), dL/dz @ all_text before the scale
            grad_text = torch.zeros_like(all_text)  # (W·B, D), dL/dz^T @ image before the scale
            sum_sigmoid = image.new_zeros(())
        for rows, cols in tiles(num_local, num_global, tile_size):
            logits = torch.addmm(bias, scaled_image[rows], all_text[cols].T)  # (tile, tile)
            total = total + F.softplus(logits).sum()
            if needs_grad:
                probs = logits.sigmoid_()
                sum_sigmoid = sum_sigmoid + probs.sum()
                grad_image[rows].addmm_(probs, all_text[cols])
                grad_text[cols].addmm_(probs.T, image[rows])
        if needs_grad:
            # dL/dz = (sigmoid(z) − 1 on the positives) / B
            grad_image.sub_(local_text).div_(num_local)
            grad_text[offset : offset + num_local].sub_(image)
            grad_text.div_(num_local)
            grad_scale = (grad_image * image).sum().reshape(scale.shape)
            grad_bias = ((sum_sigmoid - num_local) / num_local).reshape(bias.shape)
            ctx.save_for_backward(grad_image.mul_(scale), grad_text.mul_(scale), grad_scale, grad_bias)
        return total / num_local

    @staticmethod
    def backward(ctx, grad_loss):
        grad_image, grad_text, grad_scale, grad_bias = (g * grad_loss for g in ctx.saved_tensors)
        return grad_image, grad_text, grad_scale, grad_bias, None, None


class SigLipLoss(nn.Module):
    """Mean over this rank's images of the sigmoid loss against every text of the global batch.

    The model must carry a learnable `logit_bias` (built with `INIT_LOGIT_BIAS`, see `build_model`).
    Every rank must pass the same local batch size B (the loader guarantees equal batches).
    """

    init_logit_scale, init_logit_bias = INIT_LOGIT_SCALE, INIT_LOGIT_BIAS

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        tile_size: int = DEFAULT_TILE_SIZE,
        max_logit_scale: float = MAX_LOGIT_SCALE,
    ):
        super().__init__()
        assert 0 <= rank < world_size and tile_size >= 1
        self.rank, self.world_size, self.tile_size = rank, world_size, tile_size
        self.max_logit_scale = max_logit_scale

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError(
                "the sigmoid loss needs a model with a logit_bias; build it with loss.kind=siglip"
            )
        image_features, text_features, scale = upcast(
            image_features, text_features, logit_scale, self.max_logit_scale
        )  # (B, D), (B, D), (1,)
        all_text = all_gather_with_grad(text_features, self.rank, self.world_size)  # (W·B, D)
        offset = self.rank * image_features.shape[0]
        return _TiledSigmoid.apply(
            image_features, all_text, scale, logit_bias.to(scale.dtype), offset, self.tile_size
        )
