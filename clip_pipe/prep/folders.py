"""A folder of images, each with a sidecar caption file beside it (`frog.png` + `frog.txt`), as Rows.

The caption is the first non-blank line of the sidecar; Tux Paint's stamp descriptions put the English
sentence there and translations (`de.utf8=...`) below it. An image without a sidecar is kept as a row
with no caption, so it is rejected and counted rather than silently dropped.
"""

from pathlib import Path

from clip_pipe.prep.samples import Row

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".svg")


def list_images(root: str | Path) -> list[Path]:
    """Image files under `root`, relative to it, sorted so the row order is the same on every machine."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    found = [
        p.relative_to(root) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    ]
    if not found:
        raise ValueError(f"{root} holds no {', '.join(IMAGE_SUFFIXES)} files")
    return sorted(found, key=lambda p: p.as_posix())


def sidecar_caption(path: Path) -> str | None:
    """The first non-blank line of `path`'s .txt sidecar; None when there is none. Bytes that are not
    UTF-8 become U+FFFD, which check_caption rejects with its reason."""
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    text = sidecar.read_bytes().decode("utf-8", errors="replace")
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def sidecar_rows(root: str | Path) -> list[Row]:
    root = Path(root)
    rows = []
    for index, relative in enumerate(list_images(root)):
        rows.append(
            Row(
                index=index,
                image=relative.as_posix(),
                caption=sidecar_caption(root / relative),
                extra={"folder": relative.parent.as_posix()},
            )
        )
    return rows
