"""Two augmented views of one decoded image, for the image–image term (`loss.image_ssl_weight`).

SimCLR's augmentations, as SLIP uses them: random resized crop, colour jitter, grayscale, Gaussian
blur, horizontal flip. Every draw comes from the `random.Random` the loader seeds per sample, never
from torch's global generator: with `data.num_workers: 0` the loader is a thread beside the training
step, and a generator the two share (torchvision's random transforms draw from it) made two identical
runs differ from their second step. Like the training crops, the views stay uint8 in the loader; the
rank normalises them with the images (`TrainAugment.normalize`).
"""

from __future__ import annotations

import math
import random

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from clip_pipe.config import ImageSslConfig

RATIO = (3 / 4, 4 / 3)  # the crop's aspect ratio range, torchvision's and SimCLR's


class TwoViews:
    """image (PIL or uint8 tensor) -> uint8 (2, 3, S, S): two independent augmentations, at the model's input size."""

    def __init__(self, cfg: ImageSslConfig, preprocess_cfg: dict):
        size = preprocess_cfg["size"]
        self.size = [size, size] if isinstance(size, int) else list(size)
        self.kernel = max(3, int(0.1 * min(self.size)) // 2 * 2 + 1)  # SimCLR: about a tenth of the side, odd
        self.cfg = cfg

    def __call__(self, image, rng: random.Random) -> torch.Tensor:
        image = F.pil_to_tensor(image) if not isinstance(image, torch.Tensor) else image
        return torch.stack([self._view(image, rng), self._view(image, rng)])

    def _view(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        cfg = self.cfg
        top, left, height, width = _crop_box(image.shape[-2], image.shape[-1], cfg.crop_scale, rng)
        view = F.resized_crop(
            image, top, left, height, width, self.size, InterpolationMode.BICUBIC, antialias=True
        )
        if cfg.color_jitter > 0 and rng.random() < cfg.color_jitter_p:
            view = _jitter(view, cfg.color_jitter, min(0.5, cfg.color_jitter / 4), rng)
        if rng.random() < cfg.grayscale_p:
            view = F.rgb_to_grayscale(view, num_output_channels=3)
        if rng.random() < cfg.blur_p:
            view = F.gaussian_blur(view, [self.kernel, self.kernel], [rng.uniform(0.1, 2.0)] * 2)
        if rng.random() < cfg.flip_p:
            view = F.horizontal_flip(view)
        return view


def _crop_box(height: int, width: int, scale: list[float], rng: random.Random) -> tuple[int, int, int, int]:
    """A random resized crop's box (top, left, h, w), drawn as torchvision's RandomResizedCrop draws it:
    ten tries at an area fraction in `scale` and a log-uniform aspect ratio, else the centred largest box
    within the ratio range."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _jitter(image: torch.Tensor, amount: float, hue: float, rng: random.Random) -> torch.Tensor:
    """ColorJitter(amount, amount, amount, hue): the four adjustments in a random order."""
    adjust = [
        (F.adjust_brightness, rng.uniform(max(0.0, 1 - amount), 1 + amount)),
        (F.adjust_contrast, rng.uniform(max(0.0, 1 - amount), 1 + amount)),
        (F.adjust_saturation, rng.uniform(max(0.0, 1 - amount), 1 + amount)),
        (F.adjust_hue, rng.uniform(-hue, hue)),
    ]
    rng.shuffle(adjust)
    for fn, factor in adjust:
        image = fn(image, factor)
    return image
