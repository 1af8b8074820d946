"""Shards -> batches, as an explicit list of stages, in the order of `order.py`:

    the slot's streams (order.py) -> tar blocks (TarBlocks, through ShardReader) -> decode and crop at
    the slot's positions -> one piece per step -> the rank's batch (a piece from each worker, joined)

A loader slot is a worker of a rank (or, with `data.num_workers: 0`, the rank's prefetch thread). It
fills a contiguous run of positions of every global batch, reading only the streams that reach them,
so the global batch at step t is the same whatever the ranks and workers (docs/design.md, "The elastic
order"). Every slot gives exactly one piece a step, however uneven the shards, so no rank runs dry.

Each batch says where each stream it read stands after it (`positions`), so the trainer can hold every
stream's place and a resumed run carries on at the very next sample (`StreamPositions`).
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
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_pipe.data.augment import TrainAugment
from clip_pipe.data.decode import CropSource, decode_for_crop, decode_uint8
from clip_pipe.data.open import ShardReader
from clip_pipe.data.order import (
    SAMPLE_AUGMENT,
    SAMPLE_VIEWS,
    DataOrder,
    Item,
    OrderSpec,
    Piece,
    Resume,
    Segment,
    StreamPosition,
    resume_order,
    seed_of,
    slot_pieces,
    slot_range,
)
from clip_pipe.data.sources import Shard, Source
from clip_pipe.data.tar import TarError

log = logging.getLogger(__name__)

# A sample that cannot be decoded is stood in for by the next one of its stream that can; past this
# many in a row the shards are not image-text data, and the run stops with that message.
MAX_STAND_IN_SEARCH = 10_000


class SampleErrors:
    """Counts samples lost to undecodable data (the eval sets' reader)."""

    def __init__(self):
        self.num_skipped = 0

    def __call__(self, exn: Exception) -> bool:
        self.num_skipped += 1
        log.warning("skipping unreadable sample: %r", exn)
        return True  # keep going


class TarBlocks:
    """Reads a stream's blocks from tar shards through `ShardReader`: order.py's `BlockReader`.

    The shard being read stays open from one block to the next, so a stream reads each shard once,
    front to back; a block that starts mid-shard (a stream's first, or a resumed one) reads the shard
    from its start and drops the samples before the block, without decoding them. A shard that stops
    being readable (truncated, corrupt, missing) gives what it had; the promised samples from there on
    are lost, counted once by the stream (order.py) and logged once per shard here.

    Each stream tells the slot's reader which shards it opens next (its own plan, beside the other
    streams'), so that they are fetched ahead. A fork (a stand-in's search) reads without hints.
    """

    def __init__(
        self,
        shards: list[Shard],
        reader: ShardReader,
        unreadable: dict[int, int] | None = None,
        hints: bool = True,
    ):
        self.shards, self.reader, self.hints = shards, reader, hints
        self._open: tuple[int, int, Iterator[dict]] | None = None  # shard, index of its next sample, samples
        self._unreadable = {} if unreadable is None else unreadable  # shard -> its first unreadable sample
        self._hinted: list[int] = []

    def fork(self) -> TarBlocks:
        return TarBlocks(self.shards, self.reader, self._unreadable, hints=False)

    def hint(self, upcoming: list[int]) -> None:
        """Tell the reader the shards this stream opens next."""
        if self.hints and upcoming != self._hinted:
            self.reader.prefetch([self.shards[s].url for s in upcoming], stream=self)
            self._hinted = upcoming

    def __call__(self, segments: list[Segment], upcoming: list[int]) -> tuple[list[dict], int]:
        # `upcoming` starts with this block's shard: already open if the block carries on in it.
        carries_on = self._open is not None and self._open[:2] == segments[0][:2]
        self.hint(upcoming[1:] if carries_on else upcoming)
        samples: list[dict] = []
        num_lost = 0
        for shard, first, end in segments:
            num_lost += end - first - self._read(shard, first, end, samples)
        return samples, num_lost

    def _read(self, shard: int, first: int, end: int, out: list[dict]) -> int:
        if first >= self._unreadable.get(shard, end):
            return 0
        if self._open is not None and self._open[:2] == (shard, first):
            _, index, samples = self._open
        else:
            self._close_shard()
            index, samples = 0, self.reader.samples(self.shards[shard].url, stream=self)
        self._open, num_read, why = None, 0, "it ends early"
        try:
            while index < end:
                sample = next(samples, None)
                if sample is None:
                    break
                if index >= first:
                    out.append(sample)
                    num_read += 1
                index += 1
        except (OSError, TarError) as exn:
            why = repr(exn)
        if index < end:
            samples.close()
            self._unreadable[shard] = index
            url, size = self.shards[shard].url, self.shards[shard].num_samples
            log.warning("%s: samples %d to %d of %d unreadable (%s)", url, index, size - 1, size, why)
        elif index == self.shards[shard].num_samples:
            # Read to the end of the archive, so that the reader finishes the shard (a remote one is
            # then kept in the cache; a local one is closed now) rather than abandon it.
            try:
                for _ in samples:  # a tar that holds more than its count promised: the rest goes unused
                    samples.close()
            except (OSError, TarError) as exn:  # every sample was read: nothing is lost
                log.warning("%s: after its last sample: %r", self.shards[shard].url, exn)
        else:
            self._open = (shard, index, samples)
        return num_read

    def _close_shard(self) -> None:
        if self._open is not None:
            self._open[2].close()
            self._open = None

    def close(self) -> None:
        """The stream is done: its open shard and its plan go."""
        self._close_shard()
        if self._hinted:
            self.reader.prefetch([], stream=self)
            self._hinted = []


class ImageTextStream(IterableDataset):
    """One rank's batches as pieces, one per step and loader slot: {images uint8 (n,3,H,W), texts (n,L),
    keys, num_skipped, step, positions}, where n is the slot's share of the rank's batch.

    Per sample: decode to a uint8 tensor and crop it (`augment.crop`); per piece: stack the crops
    (`augment.collate`, still uint8: the rank normalises them on its device) and tokenize. `start` (stream -> position) and `step` resume exactly where a
    checkpoint's `LoaderState` left off, on any number of ranks and workers. `views`, if given, maps each
    decoded image to extra augmented uint8 views (V, 3, H, W), batched as `views` (n, V, 3, H, W); it draws
    after the crop, so `images` are the same with or without it.

    A sample that cannot be decoded is counted in `num_skipped` and its place taken by the next sample
    of its stream that can be (a duplicate): the slot's other positions, and every other slot's, are
    the same as if it had decoded.
    """

    def __init__(
        self,
        order: DataOrder,
        shards: list[list[Shard]],
        augment: TrainAugment,
        tokenizer: Callable,
        rank: int,
        world_size: int,
        start: Mapping[tuple[int, int], StreamPosition] | None = None,
        step: int = 0,
        views: Callable | None = None,
        reader: ShardReader | None = None,
    ):
        super().__init__()
        self.reader = reader  # each loader worker gets its own copy (pickled), its threads start there
        assert len(shards) == len(order.sources)
        self.order, self.shards = order, shards
        self.augment, self.tokenizer = augment, CachedTokenizer(tokenizer)
        self.rank, self.world_size = rank, world_size
        self.start, self.step, self.views = dict(start or {}), step, views

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        lo, hi = slot_range(self.order.layout.global_batch, self.world_size, num_workers, self.rank, worker)
        reader = copy.copy(self.reader) if self.reader else ShardReader()
        unreadable: list[dict[int, int]] = [{} for _ in self.shards]  # per source, shared by its streams
        streams = self.order.streams(
            lo, hi, self.start, lambda i: TarBlocks(self.shards[i], reader, unreadable[i])
        )
        by_name = {self.order.layout.streams[k]: stream for k, stream in streams.items()}
        for stream in streams.values():  # every stream's first shards fetched ahead at once, side by side
            start = stream.position
            stream.read_block.hint(stream.order.upcoming_shards(stream.index, start.epoch, start.block, 4))
        try:
            for piece in slot_pieces(self.order.layout, lo, hi, streams, self.step):
                yield self._piece(piece, by_name)
        finally:
            for stream in streams.values():
                stream.read_block.close()

    def _decode(
        self, sample: dict, seed: int, log_errors: bool
    ) -> tuple[torch.Tensor | CropSource, str] | None:
        """(the image, ready for `augment.crop` with a generator seeded by `seed`; the caption)."""
        try:  # only what depends on the data: a bad sample is counted and stood in for, never fatal
            # The views need the whole image; the crop alone draws its box first and decodes only as
            # finely as that box needs.
            if self.views:
                image = decode_uint8(sample)
            else:
                image = decode_for_crop(sample, self.augment, random.Random(seed))
            return image, sample["txt"].decode("utf-8")
        except Exception as exn:
            if log_errors:
                log.warning(
                    "unreadable sample %s in %s: %r", sample.get("__key__"), sample.get("__url__"), exn
                )
            return None

    def _stand_in(self, item: Item, streams: Mapping, seed: int) -> tuple[dict, tuple[torch.Tensor, str]]:
        """The next sample of `item`'s stream that decodes, and its decoded image and caption."""
        source, stream = item.identity[:2]
        following = streams[(source, stream)].samples_after(item.identity)
        for sample in itertools.islice(following, MAX_STAND_IN_SEARCH):
            decoded = self._decode(sample, seed, log_errors=False)
            if decoded is not None:
                return sample, decoded
        raise ValueError(
            f"{MAX_STAND_IN_SEARCH} samples in a row could not be decoded (from {item.sample.get('__url__')} "
            "on): are these image-text shards?"
        )

    def _piece(self, piece: Piece, streams: Mapping) -> dict:
        images, image_views, captions, keys, num_skipped = [], [], [], [], 0
        for item in piece.items:
            num_skipped += item.num_lost
            # The crop is drawn from a generator seeded by the sample's place in the order alone, so a
            # resumed run, or one on other ranks and workers, crops exactly as the uninterrupted one would.
            sample_seed = seed_of(self.order.sources[0].seed, SAMPLE_AUGMENT, *item.identity)
            sample, decoded = item.sample, self._decode(item.sample, sample_seed, log_errors=True)
            if decoded is None:
                num_skipped += 1
                sample, decoded = self._stand_in(item, streams, sample_seed)
            image, caption = decoded
            # Outside the decode's try: an error here is a bug in our code or config (every sample would
            # hit it), and counting it as a skipped sample would hide it.
            images.append(self.augment.crop(image, random.Random(sample_seed)))
            if self.views:
                # From the same decoded image: never decoded twice; drawn, like the crop, from a generator
                # seeded by the sample's place (its own stream of draws, not the crop's).
                views_seed = seed_of(self.order.sources[0].seed, SAMPLE_VIEWS, *item.identity)
                image_views.append(self.views(image, random.Random(views_seed)))
            captions.append(caption)
            keys.append(sample["__key__"])
        return {
            "images": self.augment.collate(images),
            **({"views": torch.stack(image_views)} if image_views else {}),
            "texts": self.tokenizer(captions),
            "num_skipped": num_skipped,
            "keys": keys,
            "step": piece.step,
            "positions": [(i, j, p.epoch, p.block, p.num_taken) for (i, j), p in piece.positions.items()],
        }


def build_stream(
    sources: list[Source],
    global_batch: int,
    augment: TrainAugment,
    tokenizer: Callable,
    rank: int,
    world_size: int,
    *,
    num_streams: int,
    seed: int,
    shuffle_buffer: int,
    resampled: bool = False,
    saved: dict | list | None = None,
    step: int = 0,
    views: Callable | None = None,
    reader: ShardReader | None = None,
) -> tuple[ImageTextStream, Resume]:
    """One rank's stream of the order over `sources` (`data.*` settings), from step 0 or from a
    checkpoint's data state `saved` at `step`; also where it starts (`Resume`, with lines to log)."""
    specs = [OrderSpec(s.name, [shard.num_samples for shard in s.shards], s.weight) for s in sources]
    start = resume_order(saved, specs, global_batch, num_streams, seed, step)
    order = DataOrder.build(specs, global_batch, start.source_streams, start.seed, shuffle_buffer, resampled)
    stream = ImageTextStream(
        order,
        [s.shards for s in sources],
        augment,
        tokenizer,
        rank,
        world_size,
        start.positions,
        step,
        views,
        reader,
    )
    return stream, start


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
    """The rank's batches: with `num_workers` 0 the stream runs in a thread of this process; otherwise
    each of `num_workers` processes fills its part of every batch, and the parts are joined here."""
    if num_workers == 0:
        # Where worker processes would oversubscribe the cores (one rank per core), a thread still
        # overlaps loading with the step: decoding, cropping and the step's kernels release the GIL.
        return Prefetcher(stream, depth=2)
    pieces = DataLoader(
        stream,
        batch_size=None,  # the stream batches itself
        num_workers=num_workers,
        persistent_workers=True,
        prefetch_factor=4,
        worker_init_fn=_default_signals,
    )
    return RankBatches(pieces, num_workers)


class RankBatches:
    """Joins the pieces of one step from each worker into the rank's batch. A DataLoader takes from its
    workers round-robin, worker 0 first, and every worker gives one piece a step, so each run of
    `num_workers` consecutive pieces is one step's, in position order."""

    def __init__(self, pieces: Iterable[dict], num_workers: int):
        self.pieces, self.num_workers = pieces, num_workers

    def __iter__(self) -> Iterator[dict]:
        pieces = iter(self.pieces)
        while True:
            group = list(itertools.islice(pieces, self.num_workers))
            if len(group) < self.num_workers:
                return
            assert len({p["step"] for p in group}) == 1, "each worker gives one piece a step"
            batch = {
                "images": torch.cat([p["images"] for p in group]),
                "texts": torch.cat([p["texts"] for p in group]),
                "num_skipped": sum(p["num_skipped"] for p in group),
                "keys": [key for p in group for key in p["keys"]],
                "step": group[0]["step"],
                "positions": [position for p in group for position in p["positions"]],
            }
            if "views" in group[0]:
                batch["views"] = torch.cat([p["views"] for p in group])
            yield batch


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
