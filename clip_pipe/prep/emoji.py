"""Emoji as image-caption pairs: Noto Color Emoji glyphs rendered with Pillow, captioned with their
Unicode CLDR short names from emoji-test.txt (Debian: fonts-noto-color-emoji, unicode-data)."""

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from clip_pipe.prep.samples import Row

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DEFAULT_EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT_SIZE = 109  # the one bitmap strike size of Noto Color Emoji; FreeType refuses other sizes


@dataclass(frozen=True)
class Emoji:
    text: str
    name: str
    group: str
    subgroup: str


def read_emoji_test(path: str | Path = DEFAULT_EMOJI_TEST, skin_tones: bool = False) -> list[Emoji]:
    """The fully-qualified emoji of emoji-test.txt, in file order; skin-tone variants only if asked."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found; install it with `apt-get install unicode-data`")
    emoji, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and "#" in line:
            codepoints = line.split(";", 1)[0].split()
            # "# 😀 E1.0 grinning face": the name follows the emoji and its version.
            name = line.split("#", 1)[1].strip().split(" ", 2)[2]
            if skin_tones or "skin tone" not in name:
                emoji.append(Emoji("".join(chr(int(c, 16)) for c in codepoints), name, group, subgroup))
    return emoji


def render(text: str, font: ImageFont.FreeTypeFont) -> bytes | None:
    """A PNG (RGBA) of the emoji cropped to its glyph, or None when the font has no glyph for it."""
    canvas = Image.new("RGBA", (4 * FONT_SIZE, 2 * FONT_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    buffer = io.BytesIO()
    canvas.crop(box).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def emoji_rows(
    font_path: str | Path = DEFAULT_FONT,
    emoji_test: str | Path = DEFAULT_EMOJI_TEST,
    limit: int | None = None,
) -> tuple[Iterator[Row], int]:
    """(rows, number of rows). Emoji the font cannot draw (newer than the font) are left out before
    numbering, so keys stay dense; the caption is the emoji's name, e.g. "grinning face"."""
    if not Path(font_path).is_file():
        raise ValueError(f"{font_path} not found; install it with `apt-get install fonts-noto-color-emoji`")
    font = ImageFont.truetype(str(font_path), FONT_SIZE)
    drawable = []
    for emoji in read_emoji_test(emoji_test)[:limit]:
        png = render(emoji.text, font)
        if png is not None:
            drawable.append((emoji, png))

    def rows() -> Iterator[Row]:
        for index, (emoji, png) in enumerate(drawable):
            extra = {"group": emoji.group, "subgroup": emoji.subgroup, "emoji": emoji.text}
            yield Row(index, png, emoji.name, extra=extra, source=f"emoji:{emoji.text}")

    return rows(), len(drawable)
