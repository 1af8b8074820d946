"""Training augmentation on uint8 images, normalised once per batch on the rank's device.

open_clip's training transform (RandomResizedCrop, bicubic, scale 0.9-1, then to float and normalise)
runs per sample on PIL images. Here the same crop runs on the decoded uint8 tensor (torch's antialiased
bicubic, which follows PIL's kernel), the loader batches the crops as uint8 (`collate`), and the rank
converts and normalises each batch once, after moving it to its device (`normalize`), as GPU loaders
(FFCV, DALI) do: a quarter of float's bytes through the worker queues and the host-to-device copy, and
no fresh float tensor a batch in the loader, whose first touch of each page was 18% of its time
(docs/benchmarks.md, bench/loader.py, bench/remote_loader.py).

Crop parameters are drawn from a `random.Random` the caller seeds per sample, so a sample's crop
depends on its place in the data stream alone (exact resume), not on any global generator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clip_pipe.data.decode import Box, CropSource

# open_clip's defaults (open_clip.transform.AugmentationCfg and RandomResizedCrop's ratio).
CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


class TrainAugment:
    """In the loader `crop(uint8 (3, H, W), rng) -> uint8 (3, h, w)` per sample and `collate(crops) -> uint8
    (B, 3, h, w)`; on the rank `normalize(uint8 (..., 3, h, w)) -> float`, the model's input."""

    def __init__(
        self,
        size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
    ):
        self.size = (size, size) if isinstance(size, int) else tuple(size[-2:])
        self.scale, self.log_ratio = scale, (math.log(ratio[0]), math.log(ratio[1]))
        # x / 255 then (x - mean) / std, folded into one multiply-add on the uint8 values.
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.mul = 1 / (255 * std_t)
        self.add = -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t

    @classmethod
    def from_preprocess_cfg(cls, cfg) -> TrainAugment:
        """From an open_clip `PreprocessCfg` (what `image_transform_v2(cfg, is_train=True)` would do)."""
        return cls(cfg.size, cfg.mean, cfg.std)

    def crop_box(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, h, w): a random area fraction in `scale` and aspect ratio in `ratio`, as
        torchvision's RandomResizedCrop draws them; the whole image if 10 draws do not fit."""
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        return 0, 0, height, width

    def crop(self, image: torch.Tensor | CropSource, rng: random.Random) -> torch.Tensor:
        """A uint8 (3, H, W) image's random crop, resized to `size`; or that of a `CropSource`, whose box
        was drawn from `rng` before decoding, on pixels perhaps decoded at 1/r of the full size (the
        box's edges then on that grid, at most r/2 stored pixels off)."""
        if isinstance(image, torch.Tensor):
            image = CropSource(image, Box(*self.crop_box(image.shape[-2], image.shape[-1], rng)), 1)
        top, left, h, w = image.reduced_box()
        patch = image.pixels[None, :, top : top + h, left : left + w]
        # torch's uint8 path (antialiased bicubic, PIL's a = -0.5 kernel), rounded and clamped to uint8.
        return F.interpolate(patch, size=self.size, mode="bicubic", antialias=True, align_corners=False)[0]

    def collate(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(crops)

    def normalize(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 images (..., 3, h, w) to float32 (x / 255 - mean) / std, on their device; into `out`
        (float32, their shape) if given, which a CPU rank reuses: a fresh tensor's first touch of each
        page costs more than the arithmetic (17 ms against 2.5 ms for 64 at 224 px)."""
        assert images.dtype == torch.uint8, "the loader hands on uint8 batches"
        # The integer to float conversion is exact either way, so `out` changes no bit of the result.
        out = images.float() if out is None else out.copy_(images)
        mul, add = (t.view(-1, 1, 1).to(images.device) for t in (self.mul, self.add))  # any leading dims
        return out.mul_(mul).add_(add)
