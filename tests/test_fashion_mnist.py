"""Fashion-MNIST builder on a small slice of the real IDX files."""

import gzip
import io
import json
import re
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from clip_pipe.eval.sets import read_eval_set
from clip_pipe.prep.fashion_mnist import (
    CLASSNAMES,
    DEFAULT_ROOT,
    EVAL_TEMPLATES,
    SYNONYMS,
    TRAIN_TEMPLATES,
    build_fashion_mnist,
    load_split,
    train_caption,
    val_indices,
)
from clip_pipe.prep.idx import read_idx
from tests.capabilities import needs

needs_data = needs(
    (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    "Fashion-MNIST",
    f"not installed in {DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
)


def caption_pattern(label: int) -> re.Pattern:
    """Matches exactly the captions the templates and synonyms can produce for `label`."""
    synonyms = "|".join(map(re.escape, SYNONYMS[CLASSNAMES[label]]))
    templates = "|".join(re.escape(t).replace(re.escape("{c}"), f"(?:{synonyms})") for t in TRAIN_TEMPLATES)
    return re.compile(f"(?:{templates})")


def test_caption_vocabulary():
    assert len(TRAIN_TEMPLATES) >= 15 and len(set(TRAIN_TEMPLATES)) == len(TRAIN_TEMPLATES)
    assert all("{c}" in t for t in TRAIN_TEMPLATES + EVAL_TEMPLATES)
    shared = set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)
    assert len(shared) < len(EVAL_TEMPLATES) / 2, "eval prompts must mostly differ from training ones"
    assert all(len(SYNONYMS[c]) >= 2 for c in CLASSNAMES)
    # Captions depend on (seed, index) only, and vary.
    assert train_caption(9, 123, seed=0) == train_caption(9, 123, seed=0)
    captions = {train_caption(0, i, seed=0) for i in range(200)}
    assert len(captions) > 30 and all(caption_pattern(0).fullmatch(c) for c in captions)
    assert [train_caption(3, i, 0) for i in range(20)] != [train_caption(3, i, 1) for i in range(20)]


def test_idx_reader_rejects_bad_files(tmp_path):
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")  # says 5 bytes, holds 3
    with pytest.raises(ValueError, match="implies"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        load_split(tmp_path, "train")


def built_files(out: Path) -> dict[str, bytes]:
    """Every file of a build but the manifests (they record the arguments)."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_validation_slice_is_a_fixed_seeded_choice():
    rows = val_indices(60_000, 5000)
    assert len(rows) == len(set(rows.tolist())) == 5000 and (rows[1:] > rows[:-1]).all()
    assert rows.min() >= 0 and rows.max() < 60_000 and rows.max() > 50_000
    assert (val_indices(60_000, 5000) == rows).all()  # the same on every call, machine and run
    with pytest.raises(ValueError, match="num_val"):
        val_indices(100, 100)


@needs_data
def test_build_small_slice(tmp_path):
    slice_args = dict(image_size=32, shard_size=64, seed=0, num_train=150, num_val=20, num_test=70)
    out = tmp_path / "fm"
    summaries = build_fashion_mnist(out, num_workers=2, **slice_args)
    build_fashion_mnist(tmp_path / "one_worker", num_workers=1, **slice_args)
    assert built_files(out) == built_files(tmp_path / "one_worker")  # byte-reproducible
    train, evaluation = summaries["train"], summaries["eval"]
    assert (train.num_rows, train.num_written, len(train.shards)) == (130, 130, 3)
    assert (evaluation.num_rows, evaluation.num_written, len(evaluation.shards)) == (70, 70, 2)
    assert summaries["val"].num_written == summaries["val_pairs"].num_written == 20
    _, train_labels = load_split(DEFAULT_ROOT, "train")
    _, test_labels = load_split(DEFAULT_ROOT, "test")
    val_rows = val_indices(150, 20).tolist()
    train_rows = [row for row in range(150) if row not in val_rows]

    train_dir = out / "train"
    assert json.loads((train_dir / "sizes.json").read_text()) == {
        "shard-000000.tar": 64,
        "shard-000001.tar": 64,
        "shard-000002.tar": 2,
    }
    samples = list(wds.WebDataset(str(train_dir / "shard-{000000..000002}.tar"), shardshuffle=False))
    pair_samples = list(wds.WebDataset(str(out / "val_pairs" / "shard-000000.tar"), shardshuffle=False))
    for rows, shard_samples in ((train_rows, samples), (val_rows, pair_samples)):
        assert len(shard_samples) == len(rows)
        for index, (row, sample) in enumerate(zip(rows, shard_samples, strict=True)):
            label = int(sample["cls"])
            caption = sample["txt"].decode()
            assert sample["__key__"] == f"{index:09d}" and label == train_labels[row]
            # Captioned by the row of the train split, so a caption does not depend on the slicing.
            assert caption == train_caption(label, row, seed=0) and caption_pattern(label).fullmatch(caption)
            assert json.loads(sample["json"])["extra"] == {
                "class": CLASSNAMES[label],
                "split": "train",
                "row": row,
            }
            image = Image.open(io.BytesIO(sample["jpg"]))
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))

    for folder, labels in (("eval", test_labels[:70].tolist()), ("val", train_labels[val_rows].tolist())):
        eval_dir = out / folder
        assert (eval_dir / "classnames.txt").read_text().splitlines() == list(CLASSNAMES)
        templates = (eval_dir / "zeroshot_classification_templates.txt").read_text().splitlines()
        assert templates == list(EVAL_TEMPLATES)
        eval_set = read_eval_set(eval_dir)
        assert (eval_set.classnames, eval_set.templates) == (list(CLASSNAMES), list(EVAL_TEMPLATES))
        eval_samples = list(wds.WebDataset(eval_set.shard_urls, shardshuffle=False))
        assert [int(s["cls"]) for s in eval_samples] == labels
        assert all("txt" not in s for s in eval_samples)
    assert (out / "eval" / "test" / "nshards.txt").read_text().strip() == "2"
    eval_dir = out / "eval"
    assert read_eval_set(eval_dir).shard_urls == [str(eval_dir / "test" / f"{i}.tar") for i in range(2)]
