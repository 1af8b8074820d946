"""WebDataset shards -> batches, as an explicit list of stages.

    shard order (per rank and worker) -> tar samples -> shuffle buffer -> decode -> batch

A job hangs if one rank runs out of batches while the others wait in a collective, and webdataset's
round-robin `split_by_node`/`split_by_worker` give ranks unequal counts whenever shards don't divide
evenly. So each loader slot (a worker of a rank) reads an endless stream: epoch after epoch of its share
of the shards, reshuffled each epoch. Every rank then yields exactly as many batches as the trainer asks
for, however uneven the shards are. When there are fewer shards than slots, slots share a shard and
each keeps every k-th sample of it, so an epoch still sees each sample once.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int


def list_shards(folders: list[str]) -> list[Shard]:
    """The shards of one or more shard folders, from each folder's `sizes.json`."""
    shards = []
    for folder in map(Path, folders):
        sizes_path = folder / "sizes.json"
        if not sizes_path.is_file():
            raise ValueError(
                f"{folder}: no sizes.json; is this a folder written by data_prep/make_shards.py?"
            )
        sizes = json.loads(sizes_path.read_text())
        for name in sorted(sizes):
            if not (folder / name).is_file():
                raise ValueError(f"{folder}: sizes.json lists {name}, which does not exist")
            shards.append(Shard(str(folder / name), int(sizes[name])))
    if not shards or sum(s.num_samples for s in shards) == 0:
        raise ValueError(f"no samples in {folders}")
    return shards


def assign_shards(
    num_shards: int, slot: int, num_slots: int, seed: int, epoch: int
) -> list[tuple[int, int, int]]:
    """This slot's work for one epoch: (shard index, part, num_parts) triples.

    A slot reads samples `i` of its shard with `i % num_parts == part`. Shards are split into parts
    only when there are fewer shards than slots, so that every slot gets work.
    """
    assert 0 <= slot < num_slots and num_shards > 0
    num_parts = -(-num_slots // num_shards)  # ceil
    order = list(range(num_shards))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    pieces = [(shard, part, num_parts) for part in range(num_parts) for shard in order]
    return pieces[slot::num_slots]


class SampleErrors:
    """Counts samples lost to unreadable tars or undecodable images (per loader worker)."""

    def __init__(self):
        self.num_skipped = 0

    def __call__(self, exn: Exception) -> bool:
        self.num_skipped += 1
        log.warning("skipping unreadable data: %r", exn)
        return True  # keep going


def slot_samples(
    shards: list[Shard], slot: int, num_slots: int, seed: int, errors: SampleErrors
) -> Iterator[dict]:
    """An endless stream of raw samples (dicts of bytes) for one loader slot."""
    num_empty_epochs = 0
    for epoch in itertools.count():
        num_yielded = 0
        for shard_index, part, num_parts in assign_shards(len(shards), slot, num_slots, seed, epoch):
            samples = wds.tariterators.tarfile_samples([{"url": shards[shard_index].url}], handler=errors)
            for i, sample in enumerate(samples):
                if i % num_parts == part:
                    num_yielded += 1
                    yield sample
        num_empty_epochs = 0 if num_yielded else num_empty_epochs + 1
        if num_empty_epochs >= 10:
            raise RuntimeError(f"loader slot {slot} read no samples in 10 epochs; are the shards readable?")


def decode_image(sample: dict) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            with Image.open(io.BytesIO(sample[ext])) as image:
                return image.convert("RGB")
    raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_EXTENSIONS)})")


class ImageTextStream(IterableDataset):
    """Endless batches {images (B,3,H,W), texts (B,L), num_skipped} for one rank."""

    def __init__(
        self,
        shards: list[Shard],
        batch_size: int,
        preprocess: Callable,
        tokenizer: Callable,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
    ):
        super().__init__()
        self.shards, self.batch_size = shards, batch_size
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        errors = SampleErrors()
        samples = slot_samples(self.shards, slot, num_slots, self.seed, errors)
        if self.shuffle_buffer > 1:
            rng = random.Random(self.seed * 1_000_003 + slot)
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer // 4, rng=rng)(samples)

        images, captions, num_reported = [], [], 0
        for sample in samples:
            try:
                image = self.preprocess(decode_image(sample))
                caption = sample["txt"].decode("utf-8")
            except Exception as exn:  # a bad sample is counted and skipped, never fatal
                errors(exn)
                continue
            images.append(image)
            captions.append(caption)
            if len(images) == self.batch_size:
                yield {
                    "images": torch.stack(images),
                    "texts": self.tokenizer(captions),
                    "num_skipped": errors.num_skipped - num_reported,
                }
                num_reported = errors.num_skipped
                images, captions = [], []


def batch_loader(stream: ImageTextStream, num_workers: int) -> DataLoader:
    """Run `stream` in `num_workers` processes (0: in this one); each worker is its own loader slot."""
    return DataLoader(
        stream,
        batch_size=None,  # the stream batches itself
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
