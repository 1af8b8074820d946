"""Exact symmetric InfoNCE in O(B·tile) memory: the CLIP loss without its (B, W·B) logit matrices.

`ClipLoss` holds, on every rank, the logits of its B rows against all W·B columns in both directions,
plus their softmaxes for the backward pass; that memory grows with B × W·B and is what stops large batches.
Here the logits exist one (tile × tile) block at a time, as in FlashAttention and Inf-CL (2024):

- One matrix serves both directions. Rank r computes S = s · I_r T_all^T (its B images against every
  rank's texts, only the texts are gathered). Row r of S is image i's image→text logits; column j holds
  part of text j's text→image logits, and the other ranks hold the rest. So the forward pass keeps an
  online log-sum-exp per row and per column, and one exchange of W·B floats (`all_reduce_logsumexp`)
  completes every column's. One logit matmul forward instead of ClipLoss's two.
- The backward pass recomputes each block and turns it straight into gradient:
  dL/dS = (softmax_row + softmax_column) / 2B − 1/B on the positives, then dI_r += dL/dS · T and
  dT += dL/dS^T · I_r, block by block. The texts' gradient flows back through the gather
  (a reduce-scatter) to the ranks that own them.

Rank r's backward thus carries the gradient of every rank's text→image loss with respect to its own
images, so the feature gradients each rank receives are exactly `ClipLoss`'s. The logit scale's gradient
is split differently between ranks (each takes the blocks it computed), and its mean over ranks, which is
what gradient averaging applies, is exactly ClipLoss's; `tests/test_loss.py` checks both at 2 and 3 ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from clip_pipe.losses.clip import MAX_LOGIT_SCALE, upcast
from clip_pipe.losses.gather import all_gather_with_grad, all_reduce_logsumexp

DEFAULT_TILE_SIZE = 1024


def tiles(num_rows: int, num_cols: int, tile_size: int) -> Iterator[tuple[slice, slice]]:
    """(rows, cols) slices covering a num_rows × num_cols matrix in blocks of at most tile_size²."""
    for start_row in range(0, num_rows, tile_size):
        for start_col in range(0, num_cols, tile_size):
            yield slice(start_row, start_row + tile_size), slice(start_col, start_col + tile_size)


class _TiledInfoNCE(torch.autograd.Function):
    """loss_r = ½ mean_i (lse_j S_ij − S_ii') + ½ mean over this rank's texts (lse_i S_ij − S_jj'),
    with S = scale · image @ all_text.T (i' = offset + i: each row's positive), never materialised whole."""

    @staticmethod
    def forward(ctx, image, all_text, scale, logit_bias, offset: int, tile_size: int, world_size: int):
        num_local, num_global = image.shape[0], all_text.shape[0]
        scaled_image = image * scale  # (B, D): scaling B·D numbers instead of every block of logits
        row_lse = image.new_full((num_local,), float("-inf"))  # (B,)
        col_lse = image.new_full((num_global,), float("-inf"))  # (W·B,): partial, over this rank's images
        for rows, cols in tiles(num_local, num_global, tile_size):
            logits = scaled_image[rows] @ all_text[cols].T  # (tile, tile)
            row_lse[rows] = torch.logaddexp(row_lse[rows], logits.logsumexp(dim=1))
            col_lse[cols] = torch.logaddexp(col_lse[cols], logits.logsumexp(dim=0))
        col_lse = all_reduce_logsumexp(col_lse, world_size)  # now over all W·B images
        local_text = all_text[offset : offset + num_local]  # (B, D): this rank's rows of the gather
        positive = (scaled_image * local_text).sum(dim=1)  # (B,)
        ctx.save_for_backward(image, all_text, scale, row_lse, col_lse)
        ctx.offset, ctx.tile_size = offset, tile_size
        ctx.bias_meta = None if logit_bias is None else (logit_bias.shape, logit_bias.dtype)
        return (row_lse.mean() + col_lse[offset : offset + num_local].mean()) / 2 - positive.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        image, all_text, scale, row_lse, col_lse = ctx.saved_tensors
        offset, num_local = ctx.offset, image.shape[0]
        scaled_image = image * scale
        # grad_image_unscaled = dL/dS @ all_text and grad_text_unscaled = dL/dS^T @ image, built block by
        # block; scale multiplies both at the end, and dL/dscale = Σ_ij dL/dS_ij · S_ij / scale falls out
        # as Σ image ⊙ grad_image_unscaled without dividing by the scale.
        grad_image = torch.zeros_like(image)  # (B, D)
        grad_text = torch.zeros_like(all_text)  # (W·B, D)
        for rows, cols in tiles(num_local, all_text.shape[0], ctx.tile_size):
            logits = scaled_image[rows] @ all_text[cols].T  # (tile, tile), recomputed
            # Both softmaxes of the block, image→text along rows and text→image along columns.
            softmaxes = torch.sub(logits, row_lse[rows, None]).exp_()
            softmaxes += logits.sub_(col_lse[cols]).exp_()
            grad_image[rows].addmm_(softmaxes, all_text[cols])
            grad_text[cols].addmm_(softmaxes.T, image[rows])
        # dL/dS = softmaxes / 2B − 1/B on the positives (S_i,offset+i), which were left out above.
        grad_image.div_(2 * num_local).sub_(all_text[offset : offset + num_local], alpha=1 / num_local)
        grad_text.div_(2 * num_local)
        grad_text[offset : offset + num_local].sub_(image, alpha=1 / num_local)
        grad_scale = (grad_image * image).sum().reshape(scale.shape) * grad_loss
        grad_image.mul_(scale * grad_loss)
        grad_text.mul_(scale * grad_loss)
        # A bias shared by all logits cancels in every softmax: its gradient is exactly zero.
        grad_bias = (
            None if ctx.bias_meta is None else image.new_zeros(ctx.bias_meta[0], dtype=ctx.bias_meta[1])
        )
        return grad_image, grad_text, grad_scale, grad_bias, None, None, None


class TiledClipLoss(nn.Module):
    """`ClipLoss`'s value and gradients, with peak memory O(B·tile_size + W·B·D) instead of O(B·W·B).

    Every rank must pass the same local batch size B (the loader guarantees equal batches).
    """

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
        # Clamped outside the custom function, so autograd gives the clamp's own gradient (0 above it).
        image_features, text_features, scale = upcast(
            image_features, text_features, logit_scale, self.max_logit_scale
        )  # (B, D), (B, D), (1,)
        all_text = all_gather_with_grad(text_features, self.rank, self.world_size)  # (W·B, D)
        offset = self.rank * image_features.shape[0]
        return _TiledInfoNCE.apply(
            image_features, all_text, scale, logit_bias, offset, self.tile_size, self.world_size
        )
