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


def encode_image(
    data: bytes,
    *,
    image_size: int,
    jpeg_quality: int,
    max_pixels: int,
    min_side: int = 1,
    max_aspect_ratio: float | None = None,
) -> EncodedImage:
    """Fully decode `data`, orient, flatten alpha onto white, resize the shorter side to `image_size`, JPEG.
    SVG is rendered first. Size filters (`max_pixels`, `min_side`, `max_aspect_ratio`) are checked from the
    header, before any pixel is decoded."""
    # A global that some libraries flip on; it would let truncated files through as half-grey images.
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False"
    if is_svg(data):
        data = render_svg(data, image_size, max_pixels)
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
        if min(image.size) < min_side:
            raise Rejected(f"image too small: {image.width}x{image.height}, shorter side under {min_side}")
        aspect = max(image.size) / max(1, min(image.size))
        if max_aspect_ratio is not None and aspect > max_aspect_ratio:
            raise Rejected(
                f"aspect ratio {aspect:.1f} of {image.width}x{image.height} over {max_aspect_ratio}"
            )
        try:
            # The source size as displayed: EXIF orientations 5-8 swap width and height.
            orientation = image.getexif().get(0x0112, 1)
            source_size = image.size[::-1] if orientation in (5, 6, 7, 8) else image.size
            if image.format == "JPEG":
                # libjpeg decodes straight to 1/2, 1/4 or 1/8 scale, never below the requested size: the
                # biggest saving when shrinking large photos. (s, s) keeps the shorter side >= s whatever
                # the EXIF orientation.
                image.draft("RGB", (image_size, image_size))
            image.load()
            if orientation != 1:
                image = ImageOps.exif_transpose(image)  # copies the pixels, so only when it has work to do
            image = to_rgb(image)
        # PIL's decoders raise a zoo of types (OSError, SyntaxError, ValueError, struct.error ...)
        # on malformed input; any of them means this file is unusable, not that the pipeline is broken.
        except Exception as e:
            raise Rejected(f"cannot decode image: {type(e).__name__}: {e}") from None

    width, height = source_size
    scale = image_size / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size[0] * size[1] > max_pixels:  # a 100000x1 strip would otherwise upscale to billions of pixels
        raise Rejected(f"{width}x{height} resized to {size[0]}x{size[1]} is over {max_pixels} pixels")
    if size != image.size:
        # As img2dataset's defaults (OpenCV's INTER_AREA down, Lanczos up): averaging over each output
        # pixel's area is the right filter for shrinking and costs a third of a Lanczos kernel.
        shrinking = size[0] < image.width
        image = image.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=jpeg_quality)
    return EncodedImage(buffer.getvalue(), width, height)


def is_svg(data: bytes) -> bool:
    head = data[:1024].lstrip()
    return head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096])


def render_svg(data: bytes, image_size: int, max_pixels: int) -> bytes:
    """A PNG of the SVG, its shorter side `image_size` pixels. cairosvg's default (unsafe=False) refuses
    external entities and files, so an SVG cannot make us read local files or fetch URLs."""
    import cairosvg  # imported here: only SVG inputs need cairo

    try:
        # Render once at its own size to learn the aspect ratio, then at the size we want.
        probe = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data, output_width=64)))
        width, height = probe.size
        scale = image_size / min(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if size[0] * size[1] > max_pixels:
            raise Rejected(f"SVG rendered at {size[0]}x{size[1]} is over {max_pixels} pixels")
        return cairosvg.svg2png(bytestring=data, output_width=size[0], output_height=size[1])
    except Rejected:
        raise
    except Exception as e:  # cairosvg raises XML, value and cairo errors on malformed input
        raise Rejected(f"cannot render SVG: {type(e).__name__}: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L"):
        # 16-bit grayscale: PIL's convert() clips to 255 (a white image), so rescale to 8 bits first.
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")
