"""Two augmented views of one decoded image, for the image–image term (`loss.image_ssl_weight`).

SimCLR's augmentations, as SLIP uses them: random resized crop, colour jitter, grayscale, Gaussian
blur, horizontal flip. They are drawn from torch's CPU generator, which the loader seeds per sample, so
a resumed run draws the same views as an uninterrupted one. Like the training crops, the views stay
uint8 in the loader; the rank normalises them with the images (`TrainAugment.normalize`).
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

from clip_pipe.config import ImageSslConfig


class TwoViews:
    """image (PIL or uint8 tensor) -> uint8 (2, 3, S, S): two independent augmentations, at the model's input size."""

    def __init__(self, cfg: ImageSslConfig, preprocess_cfg: dict):
        size = preprocess_cfg["size"]
        side = size if isinstance(size, int) else min(size)
        kernel = max(3, int(0.1 * side) // 2 * 2 + 1)  # SimCLR: about a tenth of the side, odd
        jitter = cfg.color_jitter
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(
                    size, scale=tuple(cfg.crop_scale), interpolation=InterpolationMode.BICUBIC
                ),
                v2.RandomApply(
                    [v2.ColorJitter(jitter, jitter, jitter, min(0.5, jitter / 4))], p=cfg.color_jitter_p
                ),
                v2.RandomGrayscale(p=cfg.grayscale_p),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=cfg.blur_p),
                v2.RandomHorizontalFlip(p=cfg.flip_p),
                v2.ToImage(),
            ]
        )

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.transform(image), self.transform(image)])
