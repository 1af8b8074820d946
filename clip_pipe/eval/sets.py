"""Eval set readers. The kind of a set is read from its folder, never configured:

CLIP_benchmark's WebDataset layout (either tool reads the other's sets):
    SET/classnames.txt                          zero-shot classification: one class name per line
    SET/zeroshot_classification_templates.txt   one prompt per line, with {c} for the class name
    SET/dataset_type.txt                        "retrieval" for an image-captions set (no class files)
    SET/test/nshards.txt, SET/test/0.tar ...    samples: an image (jpg/png/webp) and its `cls` label, or
                                                for retrieval its captions in `txt`, one per line

Paired shards, as `data_prep/make_shards.py` writes (an image-text retrieval set):
    SET/sizes.json, SET/shard-000000.tar ...    samples: jpg, txt (one caption), json, optional cls
    A sample's image is identified by `group` in its key.json (`make_shards.py --group-col`), else by the
    sha256 of its source image: several samples with one image are one image with several captions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from clip_pipe.data import SampleErrors, decode_image, list_shards
from clip_pipe.data.tar import TarError, tar_samples

Kind = Literal["classification", "retrieval"]


@dataclass(frozen=True)
class EvalSet:
    name: str
    kind: Kind
    shard_urls: list[str]
    classnames: list[str] | None = None  # classification sets only
    templates: list[str] | None = None


@dataclass
class EvalSample:
    index: int  # position in the set's sample order, the same whatever the number of ranks
    key: str
    image: Image.Image
    captions: list[str]
    label: int | None
    group: str  # samples with the same group show the same image


def read_eval_set(root: str | Path, split: str = "test") -> EvalSet:
    """Any eval set, its kind detected from its files; a ValueError names what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"eval set {root}: no such folder")
    if (root / "sizes.json").is_file():
        return EvalSet(root.name, "retrieval", [s.url for s in list_shards([str(root)])])
    urls = _clip_benchmark_shards(root, split)
    dataset_type = root / "dataset_type.txt"
    if dataset_type.is_file() and dataset_type.read_text().strip().lower() == "retrieval":
        return EvalSet(root.name, "retrieval", urls)
    classnames_path = root / "classnames.txt"
    templates_path = root / "zeroshot_classification_templates.txt"
    for path in (classnames_path, templates_path):
        if not path.is_file():
            raise ValueError(
                f"eval set {root}: missing {path.name} (a CLIP_benchmark classification set needs it; "
                "a retrieval set has dataset_type.txt saying 'retrieval', or is a make_shards.py folder)"
            )
    classnames = [line.strip() for line in classnames_path.read_text().splitlines() if line.strip()]
    templates = [line.strip() for line in templates_path.read_text().splitlines() if line.strip()]
    if not classnames or not templates:
        raise ValueError(f"eval set {root}: classnames.txt and the templates file must not be empty")
    if bad := [t for t in templates if "{c}" not in t]:
        raise ValueError(f"eval set {root}: templates without {{c}}: {bad}")
    return EvalSet(root.name, "classification", urls, classnames, templates)


def _clip_benchmark_shards(root: Path, split: str) -> list[str]:
    nshards_path = root / split / "nshards.txt"
    if not nshards_path.is_file():
        raise ValueError(
            f"eval set {root}: neither sizes.json (a make_shards.py folder) nor {split}/nshards.txt "
            "(CLIP_benchmark's WebDataset layout)"
        )
    num_shards = int(nshards_path.read_text().strip())
    urls = [str(root / split / f"{i}.tar") for i in range(num_shards)]
    if missing := [u for u in urls if not Path(u).is_file()]:
        raise ValueError(f"eval set {root}: missing shards {missing}")
    return urls


def eval_samples(eval_set: EvalSet, rank: int, world_size: int, errors: SampleErrors) -> Iterator[EvalSample]:
    """This rank's share of the set, decoded: every world_size-th sample, so ranks split it evenly.
    Unreadable samples are counted in `errors` and skipped; the others keep their index."""
    samples = _shard_samples(eval_set.shard_urls, errors)
    num_classes = len(eval_set.classnames) if eval_set.classnames else None
    for index, sample in enumerate(samples):
        if index % world_size != rank:
            continue
        try:
            yield _decode(sample, index, eval_set.kind, num_classes)
        except Exception as exn:  # counted and reported, never fatal
            errors(exn)


def _shard_samples(urls: list[str], errors: SampleErrors | None) -> Iterator[dict]:
    """The samples of every shard in order; an unreadable rest of a shard is counted in `errors`
    (raised without it) and the next shard read."""
    for url in urls:
        try:
            yield from tar_samples(url)
        except (OSError, TarError) as exn:
            if errors is None:
                raise
            errors(exn)


def _decode(sample: dict, index: int, kind: Kind, num_classes: int | None) -> EvalSample:
    key = sample["__key__"]
    label = int(sample["cls"]) if "cls" in sample else None
    if kind == "classification":
        if label is None:
            raise ValueError(f"sample {key} has no cls label")
        if not 0 <= label < num_classes:
            raise ValueError(f"sample {key}: label {label} out of range for {num_classes} classes")
    captions, group = [], key
    if kind == "retrieval":
        captions = [line.strip() for line in sample["txt"].decode().splitlines() if line.strip()]
        if not captions:
            raise ValueError(f"sample {key} has no caption")
        if "json" in sample:
            meta = json.loads(sample["json"])
            group = str(meta.get("group") or meta.get("sha256") or key)
    return EvalSample(index, key, decode_image(sample), captions, label, group)


def read_images(eval_set: EvalSet, keys: set[str]) -> dict[str, Image.Image]:
    """The images of the samples named `keys` (one pass over the shards), e.g. for a report's pictures."""
    found = {}
    for sample in _shard_samples(eval_set.shard_urls, errors=None):
        if sample["__key__"] in keys:
            found[sample["__key__"]] = decode_image(sample)
            if len(found) == len(keys):
                break
    return found
