"""WebDataset shards -> batches, as an explicit list of stages.

    shard order (per rank and worker) -> tar samples -> shuffle buffer -> decode -> batch

A job hangs if one rank runs out of batches while the others wait in a collective, and webdataset's
round-robin `split_by_node`/`split_by_worker` give ranks unequal counts whenever shards don't divide
evenly. So each loader slot (a worker of a rank) reads an endless stream: epoch after epoch of its share
of the shards, reshuffled each epoch. Every rank then yields exactly as many batches as the trainer asks
for, however uneven the shards are. When there are fewer shards than slots, slots share a shard and
each keeps every k-th sample of it, so an epoch still sees each sample once.

Each batch says where its slot stands (epoch, samples read), so a checkpoint can hold every slot's
position and a resumed run can carry on at the very next sample (`LoaderPosition`, `slot_samples`).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
            # Data prep fixes shard numbers by input position, so a shard whose rows were all rejected
            # holds no samples; a loader slot given only such shards would read nothing.
            if int(sizes[name]) > 0:
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
    """Counts samples lost to unreadable tars or undecodable images (per loader worker).

    A truncated or corrupt tar loses samples without one error each (or any), so tar errors are only
    logged, and a shard's lost samples are counted when it ends: those sizes.json promised, less those
    read (`missing`). Undecodable samples are counted one by one (`__call__`).
    """

    def __init__(self):
        self.num_skipped = 0

    def __call__(self, exn: Exception) -> bool:
        self.num_skipped += 1
        log.warning("skipping unreadable sample: %r", exn)
        return True  # keep going

    def tar_error(self, exn: Exception) -> bool:
        log.warning("unreadable tar data: %r", exn)
        return True

    def missing(self, url: str, num_missing: int) -> None:
        if num_missing > 0:
            self.num_skipped += num_missing
            log.warning("%s: %d samples unreadable (truncated or corrupt tar)", url, num_missing)


@dataclass(frozen=True)
class SlotPosition:
    """How far one loader slot has read: `num_read` samples of epoch `epoch`'s shuffled order."""

    epoch: int = 0
    num_read: int = 0


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % 2**63
    return value


def epoch_samples(
    shards: list[Shard], slot: int, num_slots: int, seed: int, epoch: int, errors: SampleErrors
) -> Iterator[dict]:
    """One epoch of raw samples (dicts of bytes) for one loader slot, in shard order, unshuffled."""
    for shard_index, part, num_parts in assign_shards(len(shards), slot, num_slots, seed, epoch):
        shard, num_read = shards[shard_index], 0
        samples = wds.tariterators.tarfile_samples([{"url": shard.url}], handler=errors.tar_error)
        for i, sample in enumerate(samples):
            if i % num_parts == part:
                num_read += 1
                yield sample
        errors.missing(shard.url, len(range(part, shard.num_samples, num_parts)) - num_read)


def slot_samples(
    shards: list[Shard],
    slot: int,
    num_slots: int,
    seed: int,
    errors: SampleErrors,
    shuffle_buffer: int = 0,
    start: SlotPosition = SlotPosition(),
) -> Iterator[tuple[SlotPosition, dict]]:
    """An endless stream of (position after this sample, raw sample) for one loader slot.

    Exact resume replays rather than stores: an epoch's order (shards, then the shuffle buffer, seeded
    by seed, slot and epoch alone) is a pure function of those numbers, so a resumed slot re-reads its
    current epoch and drops the `start.num_read` samples it already gave out, without decoding them.
    Storing the shuffle buffer's sample keys instead would save nothing: tars have no index, so the
    buffered samples' bytes would have to be re-read from the same shards anyway. The buffer drains at
    each epoch's end so that no epoch's order depends on the one before, and replay never reaches
    further back than the start of the current epoch.
    """
    num_empty_epochs, num_skipped_before = 0, errors.num_skipped
    for epoch in itertools.count(start.epoch):
        samples = epoch_samples(shards, slot, num_slots, seed, epoch, errors)
        if shuffle_buffer > 1:
            rng = random.Random(_seed(seed, slot, epoch))
            samples = wds.shuffle(shuffle_buffer, shuffle_buffer // 4, rng=rng)(samples)
        num_read = 0
        for sample in samples:
            num_read += 1
            if epoch == start.epoch and num_read <= start.num_read:
                if num_read == start.num_read:
                    # The run that saved `start` counted every sample lost before this one already.
                    errors.num_skipped = num_skipped_before
                continue  # given out before the checkpoint
            yield SlotPosition(epoch, num_read), sample
        num_empty_epochs = 0 if num_read else num_empty_epochs + 1
        if num_empty_epochs >= 10:
            raise RuntimeError(f"loader slot {slot} read no samples in 10 epochs; are the shards readable?")


def decode_image(sample: dict) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            with Image.open(io.BytesIO(sample[ext])) as image:
                return image.convert("RGB")
    raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_EXTENSIONS)})")


@dataclass
class LoaderPosition:
    """One rank's place in its data: batches the trainer has taken, and each loader worker's slot position.

    Workers run ahead of the trainer (prefetch), so this is advanced from the batches actually consumed,
    in the trainer's process, never from what the workers have read.
    """

    num_batches: int = 0
    workers: list[SlotPosition] = field(default_factory=lambda: [SlotPosition()])

    @classmethod
    def start(cls, num_workers: int) -> LoaderPosition:
        return cls(0, [SlotPosition()] * max(1, num_workers))

    def advance(self, batch: dict) -> None:
        self.num_batches += 1
        self.workers[batch["worker"]] = SlotPosition(*batch["position"])

    def to_dict(self) -> dict:
        return {"num_batches": self.num_batches, "workers": [[p.epoch, p.num_read] for p in self.workers]}

    @classmethod
    def from_dict(cls, state: dict) -> LoaderPosition:
        return cls(int(state["num_batches"]), [SlotPosition(int(e), int(n)) for e, n in state["workers"]])


class ImageTextStream(IterableDataset):
    """Endless batches {images (B,3,H,W), texts (B,L), num_skipped, keys, worker, position} for one rank.

    `start` resumes exactly where a `LoaderPosition` saved from an earlier run of the same stream
    (same shards, seed, batch size, ranks and workers) left off.
    """

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
        start: LoaderPosition | None = None,
    ):
        super().__init__()
        self.shards, self.batch_size = shards, batch_size
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.start = start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        start = self.start or LoaderPosition.start(num_workers)
        assert len(start.workers) == num_workers, "resume with the loader's saved number of workers"
        # A DataLoader takes batches from its workers round-robin, starting at worker 0. After
        # `num_batches` batches the next one is due from worker num_batches % num_workers, so a fresh
        # DataLoader's worker 0 plays that worker's part (and its slot), and the order carries on.
        worker = (worker + start.num_batches) % num_workers
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        errors = SampleErrors()
        samples = slot_samples(
            self.shards, slot, num_slots, self.seed, errors, self.shuffle_buffer, start.workers[worker]
        )

        images, captions, keys, num_reported = [], [], [], 0
        for position, sample in samples:
            try:
                # Random augmentation is seeded by the sample's place in the stream, so a resumed run
                # crops exactly as the uninterrupted one would (and the caller's RNG is left alone).
                with _seeded_cpu_rng(_seed(self.seed, slot, position.epoch, position.num_read)):
                    image = self.preprocess(decode_image(sample))
                caption = sample["txt"].decode("utf-8")
            except Exception as exn:  # a bad sample is counted and skipped, never fatal
                errors(exn)
                continue
            images.append(image)
            captions.append(caption)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield {
                    "images": torch.stack(images),
                    "texts": self.tokenizer(captions),
                    "num_skipped": errors.num_skipped - num_reported,
                    "keys": keys,
                    "worker": worker,
                    "position": (position.epoch, position.num_read),
                }
                num_reported = errors.num_skipped
                images, captions, keys = [], [], []


@contextmanager
def _seeded_cpu_rng(seed: int) -> Iterator[None]:
    # torch.manual_seed and fork_rng also reseed every accelerator backend, which costs some 130 us a
    # call on a CUDA build; augmentation draws from the CPU generator alone, at 2 us to save and restore.
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def batch_loader(stream: ImageTextStream, num_workers: int) -> DataLoader:
    """Run `stream` in `num_workers` processes (0: in this one); each worker is its own loader slot."""
    return DataLoader(
        stream,
        batch_size=None,  # the stream batches itself
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_default_signals,
    )


def _default_signals(worker_id: int) -> None:
    # Forked workers inherit the trainer's preemption handlers, which only set a flag nobody in a
    # worker reads; then the DataLoader could not stop its own workers with SIGTERM at shutdown. The
    # trainer alone acts on the warning signal (SIGUSR1), so workers ignore it rather than die of it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
