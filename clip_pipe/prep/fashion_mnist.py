"""Fashion-MNIST as image-caption training shards (train split) and a zero-shot eval set (test split).

Captions come from the labels through varied templates and synonyms, so a model trained on them has to
match paraphrases rather than one fixed string per class; the eval templates mostly differ from the
training ones, so zero-shot accuracy measures that generalisation.
"""

import io
import random
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from clip_pipe.prep.dataset import build_dataset
from clip_pipe.prep.evalset import write_eval_set
from clip_pipe.prep.idx import read_idx
from clip_pipe.prep.samples import EncodeConfig, Row
from clip_pipe.prep.writer import PrepSummary

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

CLASSNAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# The class name itself comes first; singular nouns, to fit "a photo of a {c}.".
SYNONYMS = {
    "t-shirt": ("t-shirt", "top", "tee", "t-shirt top"),
    "trouser": ("trouser", "pair of trousers", "pair of pants", "pair of slacks"),
    "pullover": ("pullover", "sweater", "jumper"),
    "dress": ("dress", "frock", "gown"),
    "coat": ("coat", "jacket", "overcoat"),
    "sandal": ("sandal", "summer sandal", "strappy sandal"),
    "shirt": ("shirt", "button-up shirt", "blouse"),
    "sneaker": ("sneaker", "trainer", "running shoe"),
    "bag": ("bag", "handbag", "purse"),
    "ankle boot": ("ankle boot", "boot", "short boot"),
}
assert tuple(SYNONYMS) == CLASSNAMES and all(SYNONYMS[c][0] == c for c in CLASSNAMES)

TRAIN_TEMPLATES = (
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a grayscale product photo of a {c}.",
    "a low resolution picture of the {c}.",
    "a small image of a {c} on a dark background.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a catalogue photo of a {c}.",
    "a tiny grayscale image of a {c}.",
    "a centered photo of a {c}.",
    "a pixelated photo of a {c}.",
    "a {c} on a black background.",
    "a monochrome picture of a {c}.",
    "an online shop thumbnail of a {c}.",
    "this is a {c}.",
    "a product shot of a {c}.",
    "a close-up of a {c}.",
    "a {c} for sale.",
)

EVAL_TEMPLATES = (
    "a photo of a {c}.",  # the one prompt shared with training
    "a photo of the {c}.",
    "a black and white photo of the {c}.",
    "a cropped photo of a {c}.",
    "a blurry photo of a {c}.",
    "a picture of a {c}, a type of fashion item.",
    "a bad photo of the {c}.",
    "a low contrast photo of a {c}.",
    "a dark photo of the {c}.",
    "a photo of a {c}, a type of clothing or accessory.",
)

SPLIT_FILES = {"train": "train", "test": "t10k"}  # our split name -> the IDX files' prefix


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the "train" or "test" split."""
    root = Path(root)
    prefix = SPLIT_FILES[split]
    paths = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    for path in paths:
        if not path.is_file():
            raise ValueError(
                f"Fashion-MNIST file {path} not found; install the dataset with "
                "`apt-get install dataset-fashion-mnist` or point --root at a directory holding it"
            )
    images, labels = (read_idx(p) for p in paths)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{paths[0]} should hold uint8 28x28 images, got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{paths[1]} should hold {len(images)} uint8 labels, got {labels.dtype} {labels.shape}"
        )
    if labels.max(initial=0) >= len(CLASSNAMES):
        raise ValueError(
            f"{paths[1]} has label {labels.max()}, but Fashion-MNIST has {len(CLASSNAMES)} classes"
        )
    return images, labels


def train_caption(label: int, index: int, seed: int) -> str:
    """A caption for training row `index`: a template and a synonym picked by (seed, index) alone."""
    rng = random.Random(f"{seed}/{index}")  # str seeds hash with SHA-512: stable across runs and hosts
    return rng.choice(TRAIN_TEMPLATES).format(c=rng.choice(SYNONYMS[CLASSNAMES[label]]))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)  # fast; it is decoded at once
    return buffer.getvalue()


def _inputs(root: str | Path, split: str, num_rows: int, seed: int | None) -> dict:
    """What fixes a split's output, for job.json: a rerun with other files, counts or seed is refused."""
    paths = [Path(root) / f"{SPLIT_FILES[split]}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    return {
        "files": [[str(p.resolve()), p.stat().st_size] for p in paths],
        "num_rows": num_rows,
        "seed": seed,
    }


def _rows(images: np.ndarray, labels: np.ndarray, split: str, seed: int | None) -> Iterator[Row]:
    # A generator, so PNG encoding overlaps the worker processes' decoding.
    source = f"{SPLIT_FILES[split]}-images-idx3-ubyte.gz"
    for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        label = int(label)
        yield Row(
            index=index,
            image=png_bytes(pixels),
            caption=None if seed is None else train_caption(label, index, seed),
            label=label,
            extra={"class": CLASSNAMES[label], "split": split},
            source=f"{source}:{index}",
        )


def build_fashion_mnist(
    out_dir: str | Path,
    *,
    root: str | Path = DEFAULT_ROOT,
    image_size: int = 28,
    shard_size: int = 5000,
    num_workers: int = 1,
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
    args: Mapping[str, object] | None = None,
) -> tuple[PrepSummary, PrepSummary]:
    """Write `out_dir/train` (image-caption shards with cls labels) from the train split and
    `out_dir/eval` (a CLIP_benchmark eval set) from the test split. `num_train`/`num_test` keep only
    the first rows of each split (for tests); captions do not depend on them."""
    out_dir = Path(out_dir)
    train_images, train_labels = load_split(root, "train")
    test_images, test_labels = load_split(root, "test")
    train_images, train_labels = train_images[:num_train], train_labels[:num_train]
    test_images, test_labels = test_images[:num_test], test_labels[:num_test]

    train = build_dataset(
        _rows(train_images, train_labels, "train", seed),
        out_dir / "train",
        EncodeConfig(image_size=image_size, labels=True, num_classes=len(CLASSNAMES)),
        shard_size=shard_size,
        # Dedup is for scraped corpora. This is a curated benchmark split: every row is kept, so results
        # compare with others' (it has no two identical images anyway, and with captions drawn per row
        # "exact" would make what counts as a duplicate depend on the draw).
        dedup="none",
        num_workers=num_workers,
        num_rows=len(train_images),
        inputs=_inputs(root, "train", len(train_images), seed),
        args=args,
    )
    evaluation = write_eval_set(
        _rows(test_images, test_labels, "test", seed=None),
        out_dir / "eval",
        CLASSNAMES,
        EVAL_TEMPLATES,
        image_size=image_size,
        shard_size=shard_size,
        num_workers=num_workers,
        num_rows=len(test_images),
        inputs=_inputs(root, "test", len(test_images), seed=None),
        args=args,
    )
    return train, evaluation
