"""Training objectives. Every loss is `(image_features, text_features, logit_scale, logit_bias=None) -> loss`
on this rank's features; the negatives of every rank come in through `gather.py`, the one collective.

    clip.py    ClipLoss: symmetric InfoNCE, the plain reference (B × W·B logits)
    tiled.py   TiledClipLoss: the same loss and gradients over (tile × tile) blocks, O(B·tile) memory
    siglip.py  SigLipLoss: the pairwise sigmoid loss over the same gathered texts and blocks
"""

from __future__ import annotations

from torch import nn

from clip_pipe.config import LossConfig
from clip_pipe.losses.clip import MAX_LOGIT_SCALE, ClipLoss
from clip_pipe.losses.gather import all_gather_with_grad, all_reduce_logsumexp
from clip_pipe.losses.siglip import SigLipLoss
from clip_pipe.losses.tiled import TiledClipLoss

__all__ = [
    "MAX_LOGIT_SCALE",
    "ClipLoss",
    "SigLipLoss",
    "TiledClipLoss",
    "all_gather_with_grad",
    "all_reduce_logsumexp",
    "build_loss",
]


def build_loss(cfg: LossConfig, rank: int = 0, world_size: int = 1) -> nn.Module:
    """The configured loss for this rank."""
    if cfg.kind == "siglip":
        return SigLipLoss(rank, world_size, tile_size=cfg.tile_size)
    return TiledClipLoss(rank, world_size, tile_size=cfg.tile_size)
