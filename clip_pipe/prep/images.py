"""Validate and normalise one source image: safe path lookup, full decode, RGB, resize, JPEG."""

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

DEFAULT_MAX_PIXELS = 64_000_000


class Rejected(Exception):
    """A row that cannot become a sample. The message is the reason recorded in rejected.csv."""


@dataclass(frozen=True)
class EncodedImage:
    jpeg: bytes
    width: int  # of the source after EXIF orientation, before resizing
    height: int


def resolve_inside(root: Path, relative: object) -> Path:
    """The file `relative` names under `root`, rejected before any open if it would leave `root`."""
    if not isinstance(relative, str) or not relative.strip():
        raise Rejected("image path is missing")
    if "\0" in relative:
        raise Rejected("image path contains a NUL byte")
    if os.path.isabs(relative):
        raise Rejected("absolute image path is outside the images directory")
    root = root.resolve()
    # realpath follows symlinks without opening the target, so links out of `root` are caught too.
    path = Path(os.path.realpath(root / relative))
    if not path.is_relative_to(root):
        raise Rejected("image path resolves outside the images directory")
    return path


def read_source(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise Rejected("image file not found") from None
    except IsADirectoryError:
        raise Rejected("image path is a directory") from None
    except OSError as e:
        raise Rejected(f"cannot read image file: {e.strerror or e}") from None


def encode_image(data: bytes, *, image_size: int, jpeg_quality: int, max_pixels: int) -> EncodedImage:
    """Fully decode `data`, orient, flatten alpha onto white, resize the shorter side to `image_size`, JPEG."""
    # A global that some libraries flip on; it would let truncated files through as half-grey images.
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False"
    with warnings.catch_warnings():
        # PIL warns (rather than raises) between its own limit and twice that; treat both as bombs.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Rejected(f"decompression bomb: {e}") from None
        except Image.UnidentifiedImageError:
            raise Rejected("not a recognised image file") from None
        except Exception as e:  # a known format whose header is cut short or malformed
            raise Rejected(f"cannot read image header: {type(e).__name__}: {e}") from None
        # Image.open reads only the header, so this check runs before any pixel is decoded.
        num_pixels = image.width * image.height
        if num_pixels > max_pixels:
            raise Rejected(
                f"decompression bomb: {image.width}x{image.height} is {num_pixels} pixels, "
                f"over the limit of {max_pixels}"
            )
        try:
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
        # PIL's decoders raise a zoo of types (OSError, SyntaxError, ValueError, struct.error ...)
        # on malformed input; any of them means this file is unusable, not that the pipeline is broken.
        except Exception as e:
            raise Rejected(f"cannot decode image: {type(e).__name__}: {e}") from None

    width, height = image.size
    scale = image_size / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size[0] * size[1] > max_pixels:  # a 100000x1 strip would otherwise upscale to billions of pixels
        raise Rejected(f"{width}x{height} resized to {size[0]}x{size[1]} is over {max_pixels} pixels")
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=jpeg_quality)
    return EncodedImage(buffer.getvalue(), width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L"):
        # 16-bit grayscale: PIL's convert() clips to 255 (a white image), so rescale to 8 bits first.
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")
