"""A sample's image bytes -> pixels, with the decompression-bomb check from the header first.

For training crops (`decode_for_crop`) a JPEG is decoded only as finely as its crop needs. The crop box
is drawn from the header's size first; where the box holds at least twice the output's pixels on each
side, libjpeg-turbo's scaled IDCT (through simplejpeg) decodes the picture at 1/2, 1/4 or 1/8 of its
size: 1.3-1.5x cheaper than the full decode, and the resize after it then works on a quarter of the
pixels. On 512-pixel shards at a 224-pixel output that is every crop, and the decode + crop + collate
path runs 1.4-1.6x faster (docs/benchmarks.md, "Decoding real image sizes"). Other formats, and crops
too small to reduce, decode in full as before."""

from __future__ import annotations

import io
import random
from typing import TYPE_CHECKING, NamedTuple

import simplejpeg
import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as decode_image_tensor

from clip_pipe.data.image_size import image_size
from clip_pipe.limits import DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from clip_pipe.data.augment import TrainAugment

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# libjpeg-turbo's SIMD IDCTs: 8x8 coefficients -> 4x4, 2x2 or 1x1 pixels. Its other scales (3/4, 5/8 ...)
# run in plain C and cost more than a full decode (measured), so only these are worth asking for.
JPEG_REDUCTIONS = (8, 4, 2)


class Box(NamedTuple):
    top: int
    left: int
    height: int
    width: int


class CropSource(NamedTuple):
    """An image decoded for one crop: `pixels` uint8 (3, ceil(H/r), ceil(W/r)) for `reduction` r, and
    the crop `box`, drawn on the full H x W picture."""

    pixels: torch.Tensor
    box: Box
    reduction: int

    def reduced_box(self) -> Box:
        """The box in `pixels`' own coordinates: each edge at the nearest reduced pixel (halves up), at
        most r/2 stored pixels from the drawn edge. The box itself when r is 1."""
        r, (top, left, height, width) = self.reduction, self.box
        top, left, bottom, right = ((2 * e + r) // (2 * r) for e in (top, left, top + height, left + width))
        return Box(top, left, bottom - top, right - left)


def _image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_EXTENSIONS)})")


def checked_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone (`image_size`; PIL for formats other than JPEG and PNG).

    Shards may come from anywhere, so an image over `DEFAULT_MAX_IMAGE_PIXELS` is refused before any
    pixel is decoded: a decompression bomb in a shard costs one skipped sample, not the rank's memory."""
    size = image_size(data)
    if size is None:  # not a JPEG or PNG: PIL reads the header (and only the header)
        with Image.open(io.BytesIO(data)) as header:
            size = header.size
    width, height = size
    if width * height > DEFAULT_MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{width}x{height} = {width * height} pixels, over the limit of {DEFAULT_MAX_IMAGE_PIXELS}"
        )
    return width, height


def _decode_full(data: bytes) -> torch.Tensor:
    image = decode_image_tensor(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if image.dtype == torch.uint16:  # a 16-bit PNG: keep the 8 high bits
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def decode_uint8(sample: dict) -> torch.Tensor:
    """The sample's image as a uint8 RGB tensor (3, H, W), decoded by libjpeg/libpng/libwebp directly:
    8x faster than through PIL on small images, with no PIL object in between. The size is checked
    from the header first (`checked_size`)."""
    data = _image_bytes(sample)
    checked_size(data)
    return _decode_full(data)


def jpeg_reduction(box: Box, size: tuple[int, int]) -> int:
    """The largest DCT reduction r at which the crop `box` still holds at least the (h, w) output's
    pixels on each side, so the resize after it never upsamples."""
    for r in JPEG_REDUCTIONS:
        if box.height >= r * size[0] and box.width >= r * size[1]:
            return r
    return 1


def decode_for_crop(sample: dict, augment: TrainAugment, rng: random.Random) -> CropSource:
    """The sample's image decoded for `augment.crop`, with its crop box drawn from `rng` beforehand.

    The box is what `augment.crop` would draw on the fully decoded image with the same generator (the
    header's size is the decoded size), so crops stay a pure function of the sample's seed. The size
    check precedes the draw and the decode."""
    data = _image_bytes(sample)
    width, height = checked_size(data)
    box = Box(*augment.crop_box(height, width, rng))
    is_jpeg = data[:2] == b"\xff\xd8"  # the start-of-image marker
    reduction = jpeg_reduction(box, augment.size) if is_jpeg else 1
    if reduction > 1:
        try:
            # Four-channel JPEGs (CMYK, YCCK; rare) convert to RGB differently here, so they go the full way.
            if simplejpeg.decode_jpeg_header(data)[2] not in ("CMYK", "YCCK"):
                # min_factor pins the scale to exactly 1/reduction; the size is then ceil(H/r) x ceil(W/r).
                array = simplejpeg.decode_jpeg(
                    data,
                    colorspace="RGB",
                    min_height=-(-height // reduction),
                    min_width=-(-width // reduction),
                    min_factor=reduction,
                )  # (h, w, 3)
                return CropSource(torch.from_numpy(array).permute(2, 0, 1), box, reduction)
        except ValueError:  # what simplejpeg cannot read (damaged data) goes the full way, as before
            pass
    return CropSource(_decode_full(data), box, 1)


def decode_image(sample: dict) -> Image.Image:
    with Image.open(io.BytesIO(_image_bytes(sample))) as image:
        return image.convert("RGB")
