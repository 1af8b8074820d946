"""The image–image term (SLIP): NT-Xent between two augmented views of each image, over the global batch.

Each image of the global batch of N = W·B images has two views, so there are 2N view embeddings. Each
view's positive is the other view of its image; its negatives are the other 2N − 2 views, from every
rank (SimCLR's NT-Xent, as SLIP adds it to the CLIP loss). Like `ClipLoss`, each rank computes the
local-loss form, its 2B rows against all 2N gathered columns, and the all-gather keeps its gradient,
so the mean over ranks is exactly the single-process loss over the whole global batch, in value and in
gradient (`tests/test_ssl_loss.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_pipe.losses.gather import all_gather_with_grad


class NtXentLoss(nn.Module):
    """Mean over all 2N views of −log softmax(positive) among every other view, at a fixed temperature."""

    def __init__(self, rank: int = 0, world_size: int = 1, temperature: float = 0.1):
        super().__init__()
        assert 0 <= rank < world_size and temperature > 0
        self.rank, self.world_size, self.temperature = rank, world_size, temperature

    def forward(self, view_features: torch.Tensor) -> torch.Tensor:
        """`view_features`: (B, 2, P), the head's outputs for both views of this rank's B images."""
        num_local, num_views, _ = view_features.shape
        assert num_views == 2, "two views per image"
        dtype = torch.promote_types(view_features.dtype, torch.float32)
        # (2B, P): the views of local image i are rows 2i and 2i + 1.
        local = F.normalize(view_features.to(dtype), dim=-1).flatten(0, 1)
        everyone = all_gather_with_grad(local, self.rank, self.world_size)  # (2N, P), ranks in order
        logits = local @ everyone.T / self.temperature  # (2B, 2N)
        rows = torch.arange(2 * num_local, device=logits.device) + self.rank * 2 * num_local
        # A view is not its own negative: mask the self-similarity, whose logit would be 1/temperature.
        columns = torch.arange(logits.shape[1], device=logits.device)
        logits = logits.masked_fill(rows[:, None] == columns, -torch.inf)
        return F.cross_entropy(logits, rows ^ 1)  # the positive of view 2i is 2i+1, and back


class WithImageSsl(nn.Module):
    """An image–text loss plus `weight` × NT-Xent over the image views' head outputs.

    Called as the image–text loss is, plus `view_features`; everything else passes through unchanged.
    """

    def __init__(self, image_text_loss: nn.Module, image_ssl_loss: NtXentLoss, weight: float):
        super().__init__()
        self.image_text_loss, self.image_ssl_loss, self.weight = image_text_loss, image_ssl_loss, weight

    @property
    def max_logit_scale(self) -> float:
        return self.image_text_loss.max_logit_scale

    def forward(self, *args, view_features: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.image_text_loss(*args, **kwargs) + self.weight * self.image_ssl_loss(view_features)
