"""Training objectives. Every loss is `(image_features, text_features, logit_scale, logit_bias=None) -> loss`
on this rank's features; the negatives of every rank come in through `gather.py`, the one collective.

    clip.py    ClipLoss: symmetric InfoNCE, the plain reference (B × W·B logits)
    tiled.py   TiledClipLoss: the same loss and gradients over (tile × tile) blocks, O(B·tile) memory
    siglip.py  SigLipLoss: the pairwise sigmoid loss over the same gathered texts and blocks
    ssl.py     NtXentLoss, the image–image term, and WithImageSsl, which adds it to either of the above
"""

from __future__ import annotations

from torch import nn

from clip_pipe.config import LossConfig
from clip_pipe.losses.clip import MAX_LOGIT_SCALE, ClipLoss
from clip_pipe.losses.gather import all_gather_with_grad, all_reduce_logsumexp
from clip_pipe.losses.siglip import SigLipLoss
from clip_pipe.losses.ssl import NtXentLoss, WithImageSsl
from clip_pipe.losses.tiled import TiledClipLoss

__all__ = [
    "MAX_LOGIT_SCALE",
    "ClipLoss",
    "NtXentLoss",
    "SigLipLoss",
    "TiledClipLoss",
    "WithImageSsl",
    "all_gather_with_grad",
    "all_reduce_logsumexp",
    "build_loss",
]


def build_loss(cfg: LossConfig, rank: int = 0, world_size: int = 1) -> nn.Module:
    """The configured training objective for this rank: the image–text loss, plus the image–image term
    when `cfg.image_ssl_weight` > 0 (it then also takes `view_features`)."""
    if cfg.kind == "siglip":
        loss_fn = SigLipLoss(rank, world_size, tile_size=cfg.tile_size)
    else:
        loss_fn = TiledClipLoss(rank, world_size, tile_size=cfg.tile_size)
    if cfg.image_ssl_weight > 0:
        ssl_loss = NtXentLoss(rank, world_size, cfg.image_ssl.temperature)
        loss_fn = WithImageSsl(loss_fn, ssl_loss, cfg.image_ssl_weight)
    return loss_fn
