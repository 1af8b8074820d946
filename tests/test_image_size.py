"""Image sizes read from the header, against PIL, which reads them for every other format."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from clip_pipe.data import decode_uint8
from clip_pipe.data.image_size import image_size


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


CASES = {
    "jpeg baseline": lambda size: encode(Image.new("RGB", size, "red"), "JPEG"),
    "jpeg progressive": lambda size: encode(Image.new("RGB", size, "blue"), "JPEG", progressive=True),
    "jpeg grayscale": lambda size: encode(Image.new("L", size, 90), "JPEG"),
    "jpeg cmyk": lambda size: encode(Image.new("CMYK", size), "JPEG"),
    "jpeg with exif, icc and restart markers": lambda size: encode(
        Image.new("RGB", size, "green"),
        "JPEG",
        exif=Image.Exif().tobytes(),
        icc_profile=b"\0" * 3000,
        restart_marker_blocks=1,
    ),
    "png rgb": lambda size: encode(Image.new("RGB", size), "PNG"),
    "png palette": lambda size: encode(Image.new("P", size), "PNG"),
    "png 16-bit": lambda size: encode(Image.new("I;16", size), "PNG"),
}


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("size", [(1, 1), (28, 28), (300, 17), (17, 300), (1025, 770)])
def test_jpeg_and_png_sizes_match_pil(make, size):
    data = make(size)
    with Image.open(io.BytesIO(data)) as image:
        assert image_size(data) == image.size == size


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "BMP"])
def test_other_formats_are_left_to_pil(fmt):
    assert image_size(encode(Image.new("RGB", (30, 20)), fmt)) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8",
        b"\xff\xd8\xff\xe0\x00",
        b"\xff\xd8garbage",
        b"\x89PNG\r\n",
        # a restart marker before the frame header, then bytes that would read as a 1 x 1 frame
        b"\xff\xd8\xff\xd0\x00\x02\xff\xc0\x00\x11\x08\x00\x01\x00\x01\x03",
    ],
)
def test_cut_or_odd_headers_are_left_to_pil(data):
    assert image_size(data) is None


def test_a_jpeg_whose_header_claims_a_bomb_is_refused_before_decoding():
    # A real 8x8 JPEG with its frame header rewritten to 60000 x 60000: 10.8 GB of RGB if decoded.
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    assert image_size(bytes(data)) == (60000, 60000)
    with pytest.raises(ValueError, match="3600000000 pixels, over the limit"):
        decode_uint8({"__key__": "bomb", "jpg": bytes(data)})
