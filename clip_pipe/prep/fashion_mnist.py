"""Fashion-MNIST as image-caption training shards and zero-shot eval sets.

    OUT/train/      image-caption shards (.jpg .txt .cls .json) of the train split less the validation slice
    OUT/val/        the validation slice as a zero-shot eval set (CLIP_benchmark layout, as OUT/eval/)
    OUT/val_pairs/  the validation slice as image-caption shards made exactly as OUT/train/'s
    OUT/eval/       the test split (10k) as a zero-shot eval set

The validation slice (5,000 of the 60,000 train images, a fixed seeded choice) is for tuning and
retrieval checks, so that the test split is only ever used for the final figure.

Captions come from the labels through varied templates and synonyms, so a model trained on them has to
match paraphrases rather than one fixed string per class; the eval templates mostly differ from the
training ones, so zero-shot accuracy measures that generalisation. A training image's caption depends
on its row in the original train split and the seed alone, so it is the same whichever slice holds it.
"""

import hashlib
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

NUM_VAL = 5000
VAL_SEED = 1130  # fixes which train rows are held out; independent of the caption seed


def val_indices(num_rows: int, num_val: int) -> np.ndarray:
    """The rows of the train split held out for validation: `num_val` of `num_rows`, sorted, a fixed
    seeded choice (the same on every machine and run)."""
    if not 0 <= num_val < num_rows:
        raise ValueError(f"num_val must be in [0, {num_rows}) for {num_rows} train rows, got {num_val}")
    return np.sort(np.random.default_rng(VAL_SEED).choice(num_rows, size=num_val, replace=False))


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


def _inputs(root: str | Path, split: str, rows: np.ndarray, seed: int | None) -> dict:
    """What fixes a split's output, for job.json: a rerun with other files, rows or seed is refused."""
    paths = [Path(root) / f"{SPLIT_FILES[split]}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    return {
        "files": [[str(p.resolve()), p.stat().st_size] for p in paths],
        "num_rows": len(rows),
        "rows_sha256": hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest(),
        "seed": seed,
    }


def _rows(
    images: np.ndarray, labels: np.ndarray, rows: np.ndarray, split: str, seed: int | None
) -> Iterator[Row]:
    """Rows `rows` of a split, numbered 0, 1, ... in the output; with a seed, captioned by split row."""
    # A generator, so PNG encoding overlaps the worker processes' decoding.
    source = f"{SPLIT_FILES[split]}-images-idx3-ubyte.gz"
    for index, row in enumerate(rows.tolist()):
        label = int(labels[row])
        yield Row(
            index=index,
            image=png_bytes(images[row]),
            caption=None if seed is None else train_caption(label, row, seed),
            label=label,
            extra={"class": CLASSNAMES[label], "split": split, "row": row},
            source=f"{source}:{row}",
        )


def build_fashion_mnist(
    out_dir: str | Path,
    *,
    root: str | Path = DEFAULT_ROOT,
    image_size: int = 28,
    shard_size: int = 5000,
    num_workers: int = 1,
    seed: int = 0,
    num_val: int = NUM_VAL,
    num_train: int | None = None,
    num_test: int | None = None,
    args: Mapping[str, object] | None = None,
) -> dict[str, PrepSummary]:
    """Write `out_dir/{train,val,val_pairs,eval}` (see the module's doc); returns each one's summary.

    `num_val` rows of the train split are held out (`val_indices`). `num_train`/`num_test` keep only
    the first rows of each split (for tests); captions do not depend on them."""
    out_dir = Path(out_dir)
    train_images, train_labels = load_split(root, "train")
    test_images, test_labels = load_split(root, "test")
    num_rows = len(train_images) if num_train is None else min(num_train, len(train_images))
    val_rows = val_indices(num_rows, num_val)
    train_rows = np.setdiff1d(np.arange(num_rows), val_rows)
    test_rows = np.arange(len(test_images) if num_test is None else min(num_test, len(test_images)))

    def pairs(rows: np.ndarray, folder: str) -> PrepSummary:
        return build_dataset(
            _rows(train_images, train_labels, rows, "train", seed),
            out_dir / folder,
            EncodeConfig(image_size=image_size, labels=True, num_classes=len(CLASSNAMES)),
            shard_size=shard_size,
            # Dedup is for scraped corpora. This is a curated benchmark split: every row is kept, so
            # results compare with others' (it has no two identical images anyway, and with captions
            # drawn per row "exact" would make what counts as a duplicate depend on the draw).
            dedup="none",
            num_workers=num_workers,
            num_rows=len(rows),
            inputs=_inputs(root, "train", rows, seed),
            args=args,
        )

    def eval_set(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, split: str, folder: str):
        return write_eval_set(
            _rows(images, labels, rows, split, seed=None),
            out_dir / folder,
            CLASSNAMES,
            EVAL_TEMPLATES,
            image_size=image_size,
            shard_size=shard_size,
            num_workers=num_workers,
            num_rows=len(rows),
            inputs=_inputs(root, split, rows, seed=None),
            args=args,
        )

    return {
        "train": pairs(train_rows, "train"),
        "val": eval_set(train_images, train_labels, val_rows, "train", "val"),
        "val_pairs": pairs(val_rows, "val_pairs"),
        "eval": eval_set(test_images, test_labels, test_rows, "test", "eval"),
    }
