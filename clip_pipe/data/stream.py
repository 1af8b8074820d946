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

import copy
import itertools
import logging
import queue
import random
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_pipe.data.augment import TrainAugment
from clip_pipe.data.decode import decode_for_crop, decode_uint8
from clip_pipe.data.open import ShardReader
from clip_pipe.data.order import LoaderPosition, SlotPosition, assign_shards, seed_of
from clip_pipe.data.sources import Shard
from clip_pipe.data.tar import TarError

log = logging.getLogger(__name__)


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
            log.warning(
                "%s: %d samples unreadable (a truncated or corrupt tar, or a failed fetch)", url, num_missing
            )


def epoch_samples(
    shards: list[Shard],
    slot: int,
    num_slots: int,
    seed: int,
    epoch: int,
    errors: SampleErrors,
    reader: ShardReader | None = None,
) -> Iterator[dict]:
    """One epoch of raw samples (dicts of bytes) for one loader slot, in shard order, unshuffled."""
    reader = reader or ShardReader()
    pieces = assign_shards(len(shards), slot, num_slots, seed, epoch)
    # This epoch's shards, then the next epoch's first: remote ones arrive while the ones before are read.
    following = assign_shards(len(shards), slot, num_slots, seed, epoch + 1)[:2]
    reader.prefetch([shards[i].url for i, _, _ in pieces + following])
    for shard_index, part, num_parts in pieces:
        shard, num_read = shards[shard_index], 0
        try:
            for i, sample in enumerate(reader.samples(shard.url)):
                if i % num_parts == part:
                    num_read += 1
                    yield sample
        except (OSError, TarError) as exn:  # the samples after it are lost, and counted just below
            errors.tar_error(exn)
        errors.missing(shard.url, len(range(part, shard.num_samples, num_parts)) - num_read)


def slot_samples(
    shards: list[Shard],
    slot: int,
    num_slots: int,
    seed: int,
    errors: SampleErrors,
    shuffle_buffer: int = 0,
    start: SlotPosition | None = None,
    reader: ShardReader | None = None,
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
    start = start or SlotPosition()
    reader = reader or ShardReader()  # one per slot: its fetches run ahead across shards and epochs
    num_empty_epochs, num_skipped_before = 0, errors.num_skipped
    for epoch in itertools.count(start.epoch):
        samples = epoch_samples(shards, slot, num_slots, seed, epoch, errors, reader)
        if shuffle_buffer > 1:
            rng = random.Random(seed_of(seed, slot, epoch))
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


class ImageTextStream(IterableDataset):
    """Endless batches {images (B,3,H,W), texts (B,L), num_skipped, keys, worker, position} for one rank.

    Per sample: decode to a uint8 tensor and crop it (`augment.crop`); per batch: convert and normalise
    (`augment.collate`) and tokenize. `start` resumes exactly where a `LoaderPosition` saved from an
    earlier run of the same stream (same shards, seed, batch size, ranks and workers) left off. `views`, if given, maps each decoded
    image to extra augmented views (V, 3, H, W), batched as `views` (B, V, 3, H, W); it draws after the
    crop, so `images` have the same crop boxes with or without it (with views the image is decoded in
    full for them, so where a JPEG would be decoded at a reduced scale its crop's pixels differ slightly).
    """

    def __init__(
        self,
        shards: list[Shard],
        batch_size: int,
        augment: TrainAugment,
        tokenizer: Callable,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        start: LoaderPosition | None = None,
        views: Callable | None = None,
        reader: ShardReader | None = None,
    ):
        super().__init__()
        self.reader = reader  # each loader worker gets its own copy (pickled), its threads start there
        self.shards, self.batch_size = shards, batch_size
        self.augment, self.tokenizer = augment, CachedTokenizer(tokenizer)
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.start, self.views = start, views

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
            self.shards, slot, num_slots, self.seed, errors, self.shuffle_buffer, start.workers[worker],
            copy.copy(self.reader) if self.reader else None,
        )  # fmt: skip

        images, image_views, captions, keys, num_reported = [], [], [], [], 0
        for position, sample in samples:
            # The crop is drawn from a generator seeded by the sample's place in the stream alone, so a
            # resumed run crops exactly as the uninterrupted one would.
            sample_seed = seed_of(self.seed, slot, position.epoch, position.num_read)
            rng = random.Random(sample_seed)
            try:  # only what depends on the data: a bad sample is counted and skipped, never fatal
                # The views need the whole image; the crop alone draws its box first and decodes
                # only as finely as that box needs.
                decoded = decode_uint8(sample) if self.views else decode_for_crop(sample, self.augment, rng)
                caption = sample["txt"].decode("utf-8")
            except Exception as exn:
                errors(exn)
                continue
            # Outside the try: an error here is a bug in our code or config (every sample would hit it),
            # and counting it as a skipped sample would make the loader spin forever instead of failing.
            image = self.augment.crop(decoded, rng)
            views = None
            if self.views:
                # From the same decoded image: never decoded twice. torchvision's transforms draw from
                # torch's CPU generator, seeded the same way for the same reason.
                with _seeded_cpu_rng(sample_seed):
                    views = self.views(decoded)
            images.append(image)
            if views is not None:
                image_views.append(views)
            captions.append(caption)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield {
                    "images": self.augment.collate(images),
                    **({"views": torch.stack(image_views)} if image_views else {}),
                    "texts": self.tokenizer(captions),
                    "num_skipped": errors.num_skipped - num_reported,
                    "keys": keys,
                    "worker": worker,
                    "position": (position.epoch, position.num_read),
                }
                num_reported = errors.num_skipped
                images, image_views, captions, keys = [], [], [], []


@contextmanager
def _seeded_cpu_rng(seed: int) -> Iterator[None]:
    # torch.manual_seed and fork_rng also reseed every accelerator backend, which costs some 130 us a
    # call on a CUDA build; the views draw from the CPU generator alone, at 2 us to save and restore.
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class CachedTokenizer:
    """A tokenizer that keeps the token ids of up to `max_size` distinct captions.

    Captions made from labels and templates repeat (the demo's 55k have at most 576 distinct ones), and
    open_clip's pure-Python tokenizer spends 30-170 us on each; a look-up costs well under one. Once
    full the cache stops growing, so web captions, which rarely repeat, cost one dict miss each.
    """

    def __init__(self, tokenizer: Callable, max_size: int = 100_000):
        self.tokenizer, self.max_size = tokenizer, max_size
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        new = dict(zip(missing, self.tokenizer(missing), strict=True)) if missing else {}
        if len(self.cache) < self.max_size:
            self.cache.update(new)
        return torch.stack([new[c] if c in new else self.cache[c] for c in captions])


def batch_loader(stream: ImageTextStream, num_workers: int) -> Iterable[dict]:
    """Run `stream` in `num_workers` processes, or with 0 in a thread of this one; each worker is its
    own loader slot."""
    if num_workers == 0:
        # Where worker processes would oversubscribe the cores (one rank per core), a thread still
        # overlaps loading with the step: decoding, cropping and the step's kernels release the GIL.
        return Prefetcher(stream, depth=2)
    return DataLoader(
        stream,
        batch_size=None,  # the stream batches itself
        num_workers=num_workers,
        persistent_workers=True,
        prefetch_factor=4,
        worker_init_fn=_default_signals,
    )


class Prefetcher:
    """Iterates `items` in a background thread, up to `depth` items ahead; an error is raised here."""

    _END = object()

    def __init__(self, items: Iterable, depth: int):
        self._queue: queue.Queue = queue.Queue(depth)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._fill, args=(items, self._queue, stop), name="clip-pipe-prefetch", daemon=True
        )
        thread.start()
        # The thread holds no reference to self, so an abandoned Prefetcher is collected and its
        # thread, blocked on a full queue, is told to stop. At exit (finalizers run then too) the
        # thread is also waited for: one still inside a torch kernel while the interpreter tears
        # down aborts the process ("terminate called without an active exception").
        weakref.finalize(self, self._stop, stop, thread)

    @staticmethod
    def _stop(stop: threading.Event, thread: threading.Thread) -> None:
        stop.set()
        if thread is not threading.current_thread():
            thread.join(timeout=30)

    @classmethod
    def _fill(cls, items: Iterable, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for item in items:
                if not put(item):
                    return
            put(cls._END)
        except BaseException as exn:  # handed to the consumer, which raises it
            put(exn)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> dict:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


def _default_signals(worker_id: int) -> None:
    # Forked workers inherit the trainer's preemption handlers, which only set a flag nobody in a
    # worker reads; then the DataLoader could not stop its own workers with SIGTERM at shutdown. The
    # trainer alone acts on the warning signal (SIGUSR1), so workers ignore it rather than die of it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
