"""Zero-shot classification eval sets in CLIP_benchmark's WebDataset layout.

OUT/classnames.txt                          one class name per line; line i is label i
OUT/zeroshot_classification_templates.txt   one prompt per line, each with "{c}"
OUT/dataset_type.txt                        "classification"
OUT/test/nshards.txt, OUT/test/0.tar ...    samples key.jpg + key.cls (unpadded shard names)
OUT/test/sizes.json, manifest.json, rejected.csv ...   as clip_pipe.prep.dataset writes them (resumable)
"""

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from clip_pipe.prep.dataset import build_dataset
from clip_pipe.prep.images import DEFAULT_MAX_PIXELS
from clip_pipe.prep.samples import EncodeConfig, Row
from clip_pipe.prep.writer import PrepSummary

# Generic prompts (a subset of OpenAI's ImageNet ensemble) for sets that bring no templates of their own.
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "a photo of the {c}.",
    "a bad photo of a {c}.",
    "a cropped photo of the {c}.",
    "a close-up photo of a {c}.",
    "a bright photo of a {c}.",
    "a dark photo of the {c}.",
    "a low resolution photo of a {c}.",
    "a blurry photo of the {c}.",
    "a good photo of a {c}.",
)


def read_lines(path: str | Path, what: str) -> list[str]:
    """The non-blank lines of a text file, one entry each (trailing blank lines are ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {what} file {path}: {e}") from e
    lines = [line.strip() for line in text.rstrip().splitlines()]
    if "" in lines:
        # A blank line in the middle would shift every later class index by one.
        raise ValueError(f"{what} file {path} has a blank line at line {lines.index('') + 1}")
    return lines


def check_templates(templates: Sequence[str]):
    if not templates:
        raise ValueError("need at least one template")
    for template in templates:
        try:
            filled = template.format(c="CLASS")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template {template!r} must only use the {{c}} placeholder: {e!r}") from None
        if "{c}" not in template or "\n" in filled:
            raise ValueError(f"template {template!r} must be one line containing {{c}}")


def check_classnames(classnames: Sequence[str]):
    if not classnames:
        raise ValueError("need at least one class name")
    for index, name in enumerate(classnames):
        if not name.strip() or "\n" in name:
            raise ValueError(f"class name {index} ({name!r}) must be one non-blank line")


def write_eval_set(
    rows: Iterable[Row],
    out_dir: str | Path,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    images_dir: str | Path | None = None,
    image_size: int = 224,
    jpeg_quality: int = 95,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    shard_size: int = 1000,
    num_workers: int = 1,
    num_rows: int | None = None,
    inputs: Mapping[str, object] | None = None,
    args: Mapping[str, object] | None = None,
) -> PrepSummary:
    """Write `rows` (images with integer labels indexing `classnames`) as an eval set at `out_dir`.
    Rows whose label is not an integer in [0, len(classnames)) are rejected like bad images.
    `inputs` and `args` are as for build_dataset; a rerun of the same job resumes it."""
    check_classnames(classnames)
    check_templates(templates)
    cfg = EncodeConfig(
        images_dir=None if images_dir is None else Path(images_dir),
        image_size=image_size,
        jpeg_quality=jpeg_quality,
        max_pixels=max_pixels,
        captions=False,
        labels=True,
        num_classes=len(classnames),
    )
    out_dir = Path(out_dir)
    summary = build_dataset(
        rows,
        out_dir / "test",
        cfg,
        shard_size=shard_size,
        shard_format="{}.tar",  # CLIP_benchmark reads test/{0..n-1}.tar
        # A benchmark keeps every test image, repeats included, so its scores compare with others'.
        dedup="none",
        num_workers=num_workers,
        num_rows=num_rows,
        inputs=inputs,
        args=args,
    )
    (out_dir / "test" / "nshards.txt").write_text(f"{len(summary.shards)}\n")
    (out_dir / "classnames.txt").write_text(
        "".join(f"{name.strip()}\n" for name in classnames), encoding="utf-8"
    )
    (out_dir / "zeroshot_classification_templates.txt").write_text(
        "".join(f"{t}\n" for t in templates), encoding="utf-8"
    )
    (out_dir / "dataset_type.txt").write_text("classification\n")
    return summary
