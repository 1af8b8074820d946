"""One input row -> one WebDataset sample or one rejection; the unit of work a worker process runs."""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clip_pipe.prep.images import DEFAULT_MAX_PIXELS, Rejected, encode_image, read_source, resolve_inside


@dataclass(frozen=True)
class Row:
    """One input row. `index` is its position in the input and fixes the sample key."""

    index: int
    image: str | bytes  # a path relative to EncodeConfig.images_dir, or the image file's bytes
    caption: str | None = None
    label: object = None  # as read; checked to be an integer class index when labels are written
    extra: dict = field(default_factory=dict)  # JSON-safe values copied into key.json
    source: str | None = None  # how key.json and rejected.csv name the image; defaults to the path
    url: str | None = None  # http(s) URL to download the image from (then `image` is unused)
    group: str | None = None  # rows of one image share it (several captions); key.json's "group"

    @property
    def key(self) -> str:
        return f"{self.index:09d}"  # zero-padded so keys sort like rows; digits only, so no dots

    @property
    def source_name(self) -> str:
        if self.source is not None:
            return self.source
        if self.url is not None:
            return self.url
        return self.image if isinstance(self.image, str) else f"<{len(self.image)} bytes>"


@dataclass(frozen=True)
class EncodeConfig:
    images_dir: Path | None = None  # root of relative image paths; a path may not leave it
    image_size: int = 224  # shorter side of the written JPEG, in pixels
    jpeg_quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger sources are rejected from their header, undecoded
    captions: bool = True  # image-text samples (jpg, txt, json); False: image-only (jpg)
    labels: bool = False  # also write key.cls; the row's label must be an integer
    num_classes: int | None = None  # when set, labels must lie in [0, num_classes)
    min_side: int = 1  # sources whose shorter side is smaller are rejected (from the header)
    max_aspect_ratio: float | None = None  # longer / shorter side; None: no limit
    min_caption_chars: int = 1  # captions shorter than this (after stripping) are rejected

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.min_side < 1 or self.min_caption_chars < 1:
            raise ValueError("min_side and min_caption_chars must be at least 1")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be at least 1, got {self.max_aspect_ratio}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.images_dir is not None and not Path(self.images_dir).is_dir():
            raise ValueError(f"images directory {self.images_dir} does not exist")


@dataclass(frozen=True)
class Sample:
    key: str
    fields: dict[str, bytes]  # extension -> file content, in tar member order


@dataclass(frozen=True)
class Rejection:
    index: int
    source: str
    caption: object
    reason: str


def encode_row(row: Row, cfg: EncodeConfig, data: bytes | None = None) -> Sample | Rejection:
    """`data`: the image bytes when the caller fetched them already (downloads)."""
    try:
        return Sample(row.key, sample_fields(row, cfg, data))
    except Rejected as e:
        return Rejection(row.index, row.source_name, row.caption, str(e))


def sample_fields(row: Row, cfg: EncodeConfig, data: bytes | None = None) -> dict[str, bytes]:
    # Cheap checks first, so a row with a bad caption or label costs no file read or decode.
    caption = check_caption(row.caption, cfg.min_caption_chars) if cfg.captions else None
    label = parse_label(row.label, cfg.num_classes) if cfg.labels else None
    if data is None and isinstance(row.image, bytes):
        data = row.image
    elif data is None:
        assert cfg.images_dir is not None, "rows with image paths need EncodeConfig.images_dir"
        data = read_source(resolve_inside(Path(cfg.images_dir), row.image))
    image = encode_image(
        data,
        image_size=cfg.image_size,
        jpeg_quality=cfg.jpeg_quality,
        max_pixels=cfg.max_pixels,
        min_side=cfg.min_side,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )

    fields = {"jpg": image.jpeg}
    if cfg.captions:
        meta = {
            "source": row.source_name,
            "caption": caption,
            "width": image.width,
            "height": image.height,
            "sha256": hashlib.sha256(data).hexdigest(),
            "extra": row.extra,  # nested, so a column called "width" cannot clobber ours
        }
        if label is not None:
            meta["label"] = label
        if row.group is not None:
            meta["group"] = row.group
        fields["txt"] = caption.encode()
        fields["json"] = json.dumps(meta, ensure_ascii=False, allow_nan=False, sort_keys=True).encode()
    if label is not None:
        fields["cls"] = str(label).encode("ascii")
    return fields


def check_caption(caption: object, min_chars: int = 1) -> str:
    if caption is None:
        raise Rejected("caption is missing")
    assert isinstance(caption, str), f"captions reach the encoder as str or None, got {type(caption)}"
    # Tables are read with errors="replace", so bytes that are not UTF-8 arrive as U+FFFD; other sources
    # may hand over surrogate escapes.
    if "\ufffd" in caption or _has_surrogates(caption):
        raise Rejected("caption is not valid UTF-8")
    if not caption.strip():
        raise Rejected("caption is empty")
    if len(caption.strip()) < min_chars:
        raise Rejected(f"caption shorter than {min_chars} characters")
    return caption.strip()


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)


def parse_label(value: object, num_classes: int | None = None) -> int:
    """An integer class index from a table cell; anything that is not an integer is a rejection."""
    label = _as_int(value)
    if label is None:
        raise Rejected("label is missing" if value is None else f"label {value!r} is not an integer")
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"in [0, {num_classes})" if num_classes is not None else "non-negative"
        raise Rejected(f"label {label} is out of range (must be {bound})")
    return label


def _as_int(value: object) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):  # pandas stores an int column with gaps as float
        return int(value) if float(value).is_integer() else None
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    return None
