"""The global data order: which samples fill global batch t, and which of them each loader slot reads.

Everything here is a pure function of the shard sizes, the config, the seed, the step and the streams'
positions, never of ranks or loader workers; no I/O. `tests/test_order.py` checks it without tars or
processes. The shape (docs/design.md, "The elastic order"):

- **Streams.** Each source (a weighted set of shards) is read by a fixed number of streams, set by
  `data.num_streams` and kept in the checkpoint. Each epoch the source's shards are shuffled (seed,
  epoch) and laid end to end; stream j reads the j-th of `num_streams` equal, contiguous ranges of that
  sequence, so the streams together read every sample of the epoch exactly once (a shard cut between
  streams is numbered from whichever end makes reaching the later parts cheaper). Within its range a
  stream shuffles blocks of `block_size` consecutive samples (seed, stream, epoch, block). With
  `resampled`, a stream's epoch is instead a run of shards drawn with replacement (seed, stream, epoch).
- **The global batch.** Source i gives `source_batches[i]` samples a step (the global batch split by
  weight, largest remainder). Its streams share them out as evenly as integers allow and take turns
  with the remainder, so every stream of a source gives out exactly the same number of samples over
  any `num_streams` consecutive steps. The streams of all sources are interleaved in a fixed order, and
  at step t each gives its next samples to the next positions of the batch: positions [0, B).
- **Slots.** Rank r owns positions [r B/W, (r+1) B/W), its worker k a contiguous part of those. A slot
  reads exactly the streams that can reach its positions (those on a boundary are read by both slots)
  and decodes only its own positions. Concatenating the slots' pieces in rank and worker order gives the
  global batch, whatever W and K are.
- **Positions.** A stream's place is (epoch, block, samples given out of that block): where the next
  sample comes from, not a count derived from the step, because a truncated or missing shard gives out
  fewer samples than sizes.json promised and the stream then simply moves on. Resuming re-reads one
  block at most (plus the part of a shard before it), never the epoch.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple, Protocol

# Seed domains: each kind of random draw gets its own stream of seeds.
_SHARD_ORDER, _BLOCK_ORDER, _RESAMPLE, SAMPLE_AUGMENT, SAMPLE_VIEWS = 1, 2, 3, 4, 5
# How many consecutive epochs of nothing readable a stream tolerates before it stops the run.
MAX_EMPTY_EPOCHS = 10
# Blocks when shuffling is off (`data.shuffle_buffer: 0`): large enough that per-block work is noise.
UNSHUFFLED_BLOCK = 64


def seed_of(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % 2**63
    return value


def split_by_weight(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights` by largest remainder (Hamilton's method): each share is
    rounded down, then the units left go to the largest remainders, the earlier share first on a tie.
    The shares sum to `total` and each is within 1 of its exact value."""
    assert total >= 0 and weights and all(w > 0 for w in weights)
    weight_sum = sum(weights)
    exact = [total * w / weight_sum for w in weights]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


# `data.num_streams: 0` means this many, and at most one stream per SHARDS_PER_STREAM shards of a
# source: a stream's range mostly starts inside a shard, whose first part it must read without using it
# (tars have no index), and with four shards or more a stream that is at most 1/16 of an epoch read twice.
AUTO_NUM_STREAMS, SHARDS_PER_STREAM = 64, 4


def default_num_streams(
    num_streams: int, weights: Sequence[float], num_samples: Sequence[int], num_shards: Sequence[int]
) -> list[int]:
    """Streams per source for a fresh run: `num_streams` split by weight (0: `AUTO_NUM_STREAMS`, and
    at most a quarter of each source's shards), at least one each, and no more than a source has
    samples (a stream with an empty range would never give anything out)."""
    shares = split_by_weight(num_streams or AUTO_NUM_STREAMS, weights)
    if not num_streams:
        shares = [
            min(share, shards // SHARDS_PER_STREAM) for share, shards in zip(shares, num_shards, strict=True)
        ]
    return [max(1, min(share, samples)) for share, samples in zip(shares, num_samples, strict=True)]


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands: `num_taken` samples given out of block `block` of its epoch `epoch`."""

    epoch: int = 0
    block: int = 0
    num_taken: int = 0


# (shard index, first sample, end sample): a run of one shard's samples, numbered as sizes.json promises.
Segment = tuple[int, int, int]


class SourceOrder:
    """One source's epochs: the shard order, each stream's range, its blocks and their shuffles."""

    def __init__(
        self,
        shard_sizes: Sequence[int],
        num_streams: int,
        block_size: int,
        seed: int,
        source: int,
        resampled: bool = False,
        shuffle: bool = True,
    ):
        assert all(n > 0 for n in shard_sizes), "sources leave out empty shards"
        assert 1 <= num_streams <= sum(shard_sizes) and block_size >= 1
        self.shard_sizes, self.num_streams, self.block_size = list(shard_sizes), num_streams, block_size
        self.seed, self.source, self.resampled, self.shuffle = seed, source, resampled, shuffle
        self.num_samples = sum(shard_sizes)
        self._epochs: dict[int, tuple[list[int], list[int], set[int]]] = {}
        self._ranges: dict[tuple[int, int], tuple[list[Segment], list[int]]] = {}

    def _epoch_sequence(self, epoch: int) -> tuple[list[int], list[int], set[int]]:
        """Epoch mode: the epoch's shard order, the running sample count before each shard, and the
        shards read back to front (see `stream_range`)."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 3:  # streams are within an epoch of each other, and look one ahead
                del self._epochs[min(self._epochs)]
            order = list(range(len(self.shard_sizes)))
            if self.shuffle:
                random.Random(seed_of(self.seed, _SHARD_ORDER, self.source, epoch)).shuffle(order)
            starts = [0]
            for shard in order:
                starts.append(starts[-1] + self.shard_sizes[shard])
            # The cuts between streams that fall inside a shard, as offsets into it. Each part but the
            # first is read after the parts before it are read and dropped, so a shard costs the sum of
            # its cuts' offsets read twice; numbered from its end instead, the sum of (size - offset).
            cuts: dict[int, list[int]] = {}
            for j in range(1, self.num_streams):
                cut = j * self.num_samples // self.num_streams
                k = bisect.bisect_right(starts, cut) - 1
                if starts[k] < cut:
                    cuts.setdefault(k, []).append(cut - starts[k])
            size = self.shard_sizes
            mirrored = {
                order[k]
                for k, offsets in cuts.items()
                if sum(size[order[k]] - o for o in offsets) < sum(offsets)
            }
            self._epochs[epoch] = (order, starts, mirrored)
        return self._epochs[epoch]

    def stream_range(self, stream: int, epoch: int) -> tuple[list[Segment], list[int]]:
        """The samples stream `stream` reads in epoch `epoch`, as segments in order, and the running
        sample count before each segment (within the range)."""
        key = (stream, epoch)
        if key not in self._ranges:
            if len(self._ranges) >= 4 * self.num_streams:
                self._ranges.clear()
            if self.resampled:
                segments = self._drawn_shards(stream, epoch)
            else:
                order, starts, mirrored = self._epoch_sequence(epoch)
                lo = stream * self.num_samples // self.num_streams
                hi = (stream + 1) * self.num_samples // self.num_streams
                segments = []
                for k in range(bisect.bisect_right(starts, lo) - 1, len(order)):
                    if starts[k] >= hi:
                        break
                    shard, size = order[k], self.shard_sizes[order[k]]
                    first, end = max(lo, starts[k]) - starts[k], min(hi, starts[k + 1]) - starts[k]
                    segments.append(
                        (shard, size - end, size - first) if shard in mirrored else (shard, first, end)
                    )
            counts = [0]
            for _, first, end in segments:
                counts.append(counts[-1] + end - first)
            self._ranges[key] = (segments, counts)
        return self._ranges[key]

    def _drawn_shards(self, stream: int, epoch: int) -> list[Segment]:
        # With replacement, each shard as likely as its share of the samples (so each sample is as likely
        # as any other), about as many shards per stream epoch as the streams would share in epoch mode.
        num_draws = max(1, round(len(self.shard_sizes) / self.num_streams))
        rng = random.Random(seed_of(self.seed, _RESAMPLE, self.source, stream, epoch))
        shards = rng.choices(range(len(self.shard_sizes)), weights=self.shard_sizes, k=num_draws)
        return [(shard, 0, self.shard_sizes[shard]) for shard in shards]

    def num_blocks(self, stream: int, epoch: int) -> int:
        return -(-self.stream_range(stream, epoch)[1][-1] // self.block_size)

    def block_segments(self, stream: int, epoch: int, block: int) -> list[Segment]:
        """The samples of one block (at most `block_size`), as segments in order."""
        segments, counts = self.stream_range(stream, epoch)
        lo = block * self.block_size
        hi = min(lo + self.block_size, counts[-1])
        out = []
        for k in range(bisect.bisect_right(counts, lo) - 1, len(segments)):
            if counts[k] >= hi:
                break
            shard, first, _ = segments[k]
            out.append(
                (shard, first + max(lo, counts[k]) - counts[k], first + min(hi, counts[k + 1]) - counts[k])
            )
        return out

    def upcoming_shards(self, stream: int, epoch: int, block: int, num_shards: int) -> list[int]:
        """The next `num_shards` shards this stream reads from block `block` on: this epoch's, then the
        next epoch's first (so that they arrive before this epoch's last shard ends)."""
        segments, counts = self.stream_range(stream, epoch)
        k = bisect.bisect_right(counts, block * self.block_size) - 1
        shards = [shard for shard, _, _ in segments[k : k + num_shards]]
        if len(shards) < num_shards:
            following = self.stream_range(stream, epoch + 1)[0][: num_shards - len(shards)]
            shards += [shard for shard, _, _ in following]
        return shards

    def permutation(self, stream: int, epoch: int, block: int, num_samples: int) -> list[int]:
        """The order in which a block's `num_samples` samples (those read) are given out."""
        order = list(range(num_samples))
        if self.shuffle:
            random.Random(seed_of(self.seed, _BLOCK_ORDER, self.source, stream, epoch, block)).shuffle(order)
        return order


class Item(NamedTuple):
    """One sample a stream gives out. `identity` (source, stream, epoch, block, index) is its place in
    the order; `num_lost` counts samples lost (promised but unreadable) just before it."""

    identity: tuple[int, int, int, int, int]
    num_lost: int
    sample: Any


class BlockReader(Protocol):
    """Reads the samples of a block's segments: (the samples read, how many promised ones were not)."""

    def __call__(self, segments: list[Segment], upcoming: list[int]) -> tuple[list, int]: ...

    def fork(self) -> BlockReader: ...


class PromisedSamples:
    """A BlockReader that reads nothing: sample k of shard s is (s, k). The order without the data."""

    def __call__(self, segments: list[Segment], upcoming: list[int]) -> tuple[list, int]:
        return [(shard, k) for shard, first, end in segments for k in range(first, end)], 0

    def fork(self) -> PromisedSamples:
        return self


class Stream:
    """One stream's samples, from `start` on: block after block, epoch after epoch, forever."""

    def __init__(self, order: SourceOrder, index: int, start: StreamPosition, read_block: BlockReader):
        self.order, self.index, self.position, self.read_block = order, index, start, read_block
        self._block: list | None = None  # the current block's samples, in the order given out
        self._num_lost = 0  # lost before the next sample given out
        self._num_empty_epochs, self._num_read_this_epoch = 0, 0

    def _load(self, epoch: int, block: int) -> None:
        order = self.order
        upcoming = order.upcoming_shards(self.index, epoch, block, 4)
        samples, num_lost = self.read_block(order.block_segments(self.index, epoch, block), upcoming)
        permutation = order.permutation(self.index, epoch, block, len(samples))
        self._block = [samples[k] for k in permutation]
        self._num_read_this_epoch += len(samples)
        # A block's losses go with its first sample. A position with samples already given out of the
        # block (a resumed stream) has had them counted.
        if self.position.num_taken == 0:
            self._num_lost += num_lost

    def _next_block(self) -> None:
        epoch, block = self.position.epoch, self.position.block + 1
        if block >= self.order.num_blocks(self.index, epoch):
            self._num_empty_epochs = 0 if self._num_read_this_epoch else self._num_empty_epochs + 1
            if self._num_empty_epochs >= MAX_EMPTY_EPOCHS:
                raise ValueError(
                    f"stream {self.index} of source {self.order.source} read nothing in {MAX_EMPTY_EPOCHS} "
                    "epochs: are its shards readable?"
                )
            epoch, block, self._num_read_this_epoch = epoch + 1, 0, 0
        self.position = StreamPosition(epoch, block, 0)
        self._load(epoch, block)

    def take(self, num: int) -> list[Item]:
        """The next `num` samples."""
        if self._block is None:
            self._load(self.position.epoch, self.position.block)
        items = []
        while len(items) < num:
            epoch, block, k = self.position.epoch, self.position.block, self.position.num_taken
            if k >= len(self._block):
                self._next_block()
                continue
            items.append(
                Item((self.order.source, self.index, epoch, block, k), self._num_lost, self._block[k])
            )
            self._num_lost = 0
            self.position = StreamPosition(epoch, block, k + 1)
        return items

    def samples_after(self, identity: tuple[int, int, int, int, int]) -> Iterator[Any]:
        """The samples after the one at `identity`, in order, from a separate reader (this stream's
        place is unchanged): where a sample that cannot be decoded finds its stand-in."""
        _, _, epoch, block, k = identity
        fork = Stream(self.order, self.index, StreamPosition(epoch, block, k + 1), self.read_block.fork())
        if (epoch, block) == (self.position.epoch, self.position.block):
            fork._block = self._block  # already read
        while True:
            yield fork.take(1)[0].sample


class Layout:
    """Which stream fills which positions of the global batch, step by step.

    `streams` lists (source, stream) in position order: the streams of all sources interleaved by
    their place within their source, so that any run of positions holds each source about in
    proportion. At step t stream j of source i gives `q + 1` samples if it is one of the `r` streams
    whose turn it is, else `q`, where `source_batches[i] = q * S + r`. The turns rotate with t modulo S,
    so each stream's count over S consecutive steps is exactly `source_batches[i]`: every stream moves
    at the same speed whatever the batch (so a changed global batch keeps the streams' ranges), and the
    `r` extra samples are spread evenly over the streams at every step (so a stream's first position
    moves by at most one per source as the turns rotate).
    """

    def __init__(self, source_batches: Sequence[int], source_streams: Sequence[int]):
        assert len(source_batches) == len(source_streams) and all(s >= 1 for s in source_streams)
        self.source_batches, self.source_streams = list(source_batches), list(source_streams)
        self.global_batch = sum(source_batches)
        self.streams = sorted(
            ((i, j) for i, num in enumerate(source_streams) for j in range(num)),
            key=lambda s: (Fraction(2 * s[1] + 1, 2 * source_streams[s[0]]), s[0]),
        )
        self.index = {stream: k for k, stream in enumerate(self.streams)}

    def counts(self, step: int) -> list[int]:
        """Samples each stream (in `streams` order) gives to the batch of `step`; they sum to the batch."""
        per_source = []
        for b, s in zip(self.source_batches, self.source_streams, strict=True):
            q, r = divmod(b, s)
            m = step % s
            per_source.append([q + ((j + 1) * r + m) // s - (j * r + m) // s for j in range(s)])
        return [per_source[i][j] for i, j in self.streams]

    def _start_bounds(self, preceding: Sequence[int]) -> tuple[int, int]:
        """The least and greatest first position of whatever follows `preceding[i]` streams of each source."""
        lo = hi = 0
        for n, b, s in zip(preceding, self.source_batches, self.source_streams, strict=True):
            q, r = divmod(b, s)
            lo += q * n + n * r // s
            hi += q * n + (n * r + s - 1) // s
        return lo, hi

    def streams_for(self, lo: int, hi: int) -> list[int]:
        """Indices (into `streams`) of every stream that can give a sample to a position in [lo, hi) at
        some step; exact for one source, a stream or so more per source with several."""
        preceding = [0] * len(self.source_streams)
        out = []
        for k, (i, _) in enumerate(self.streams):
            first, _ = self._start_bounds(preceding)
            preceding[i] += 1
            _, end = self._start_bounds(preceding)
            if first < hi and end > lo and hi > lo:
                out.append(k)
        return out


def slot_range(
    global_batch: int, world_size: int, num_workers: int, rank: int, worker: int
) -> tuple[int, int]:
    """Positions [lo, hi) of the global batch that loader slot (rank, worker) fills: the rank's
    contiguous share, cut into `max(1, num_workers)` contiguous parts."""
    num_parts = max(1, num_workers)
    assert global_batch % world_size == 0 and 0 <= rank < world_size and 0 <= worker < num_parts
    per_rank = global_batch // world_size
    start = rank * per_rank
    return start + worker * per_rank // num_parts, start + (worker + 1) * per_rank // num_parts


@dataclass
class Piece:
    """What one slot gives to the batch of `step`: the samples at its positions, in order, and the
    place reached by each stream it read (source, stream) -> position."""

    step: int
    items: list[Item]
    positions: dict[tuple[int, int], StreamPosition]


def slot_pieces(
    layout: Layout, lo: int, hi: int, streams: Mapping[int, Stream], step: int
) -> Iterator[Piece]:
    """The pieces of slot [lo, hi) from `step` on. `streams` maps each index of `layout.streams_for(lo,
    hi)` to that stream, at its place before `step`."""
    while True:
        items, positions, offset = [], {}, 0
        for k, count in enumerate(layout.counts(step)):
            if k in streams:
                if count:
                    taken = streams[k].take(count)
                    items += taken[max(0, lo - offset) : max(0, hi - offset)]
                    positions[layout.streams[k]] = streams[k].position
            else:
                assert count == 0 or offset + count <= lo or offset >= hi, (
                    "a slot reads every stream it needs"
                )
            offset += count
        yield Piece(step, items, positions)
        step += 1


class OrderSpec(NamedTuple):
    """What the order of one source depends on, besides the seed."""

    name: str
    shard_sizes: list[int]
    weight: float


@dataclass
class DataOrder:
    """The whole order: every source's `SourceOrder` and the batch layout."""

    sources: list[SourceOrder]
    layout: Layout

    @classmethod
    def build(
        cls,
        specs: Sequence[OrderSpec],
        global_batch: int,
        source_streams: Sequence[int],
        seed: int,
        shuffle_buffer: int,
        resampled: bool = False,
    ) -> DataOrder:
        """`shuffle_buffer` samples are held for shuffling over all streams together: each stream
        shuffles blocks of `shuffle_buffer / streams` samples (0: no shuffle within streams)."""
        num_streams = sum(source_streams)
        block_size = max(1, shuffle_buffer // num_streams) if shuffle_buffer else UNSHUFFLED_BLOCK
        sources = [
            SourceOrder(spec.shard_sizes, n, block_size, seed, i, resampled, shuffle=shuffle_buffer > 0)
            for i, (spec, n) in enumerate(zip(specs, source_streams, strict=True))
        ]
        batches = split_by_weight(global_batch, [spec.weight for spec in specs])
        return cls(sources, Layout(batches, source_streams))

    def streams(
        self,
        lo: int,
        hi: int,
        start: Mapping[tuple[int, int], StreamPosition],
        reader: Callable[[int], BlockReader],
    ) -> dict[int, Stream]:
        """The streams slot [lo, hi) reads, each at its place in `start` (the epoch's start if absent);
        `reader(source)` makes a stream's BlockReader."""
        out = {}
        for k in self.layout.streams_for(lo, hi):
            i, j = self.layout.streams[k]
            out[k] = Stream(self.sources[i], j, start.get((i, j), StreamPosition()), reader(i))
        return out


# --- What a checkpoint holds -----------------------------------------------------------------------

STATE_VERSION = 2


@dataclass
class SourceState:
    name: str
    num_samples: int
    num_shards: int
    positions: list[StreamPosition]


@dataclass
class LoaderState:
    """The data order's place, as a checkpoint holds it (format version 2): the seed the order was
    drawn with, the global batch it was cut into, and every source's streams' positions."""

    seed: int
    global_batch: int
    sources: list[SourceState] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "sources": [
                {
                    "name": s.name,
                    "num_samples": s.num_samples,
                    "num_shards": s.num_shards,
                    "streams": [[p.epoch, p.block, p.num_taken] for p in s.positions],
                }
                for s in self.sources
            ],
        }

    @classmethod
    def from_dict(cls, state: dict) -> LoaderState:
        sources = [
            SourceState(
                s["name"],
                int(s["num_samples"]),
                int(s["num_shards"]),
                [StreamPosition(int(e), int(b), int(n)) for e, b, n in s["streams"]],
            )
            for s in state["sources"]
        ]
        return cls(int(state["seed"]), int(state["global_batch"]), sources)


class Resume(NamedTuple):
    """Where a run's data order starts: the seed, each source's stream count and stream positions, and
    the lines to log about what changed since the checkpoint."""

    seed: int
    source_streams: list[int]
    positions: dict[tuple[int, int], StreamPosition]
    messages: list[str]


def resume_order(
    saved: dict | list | None,
    specs: Sequence[OrderSpec],
    global_batch: int,
    num_streams: int,
    seed: int,
    step: int,
) -> Resume:
    """Where to start the data order: fresh (`saved` None and step 0), or from a checkpoint's data state.

    A checkpoint from before the elastic order (per-rank positions, no version) or one without a data
    state gives a fresh order seeded by `seed + step`, rather than a replay of the first steps' samples.
    A source whose shards changed starts afresh; a changed global batch keeps every stream's place.
    """
    fresh = default_num_streams(
        num_streams,
        [s.weight for s in specs],
        [sum(s.shard_sizes) for s in specs],
        [len(s.shard_sizes) for s in specs],
    )
    if saved is None and step == 0:
        return Resume(seed, fresh, {}, [])
    if not isinstance(saved, dict):
        why = "holds no data position" if saved is None else "was written before the elastic data order"
        return Resume(
            seed + step, fresh, {},
            [f"the checkpoint {why}: the model and optimizer resume exactly, but the data order restarts "
             f"(drawn with data.seed + {step}), so the resumed run does not see exactly the samples it would have"],
        )  # fmt: skip
    if int(saved.get("version", 0)) > STATE_VERSION:
        raise ValueError(
            f"the checkpoint's data state has format version {saved['version']}, newer than this clip-pipe "
            f"reads ({STATE_VERSION}): resume with the clip-pipe that wrote it"
        )
    state = LoaderState.from_dict(saved)
    by_name = {s.name: s for s in state.sources}
    messages, streams, positions = [], [], {}
    for i, spec in enumerate(specs):
        old = by_name.pop(spec.name, None)
        if old is None:
            messages.append(f"source {spec.name} is not in the checkpoint: its order starts at epoch 0")
            streams.append(fresh[i])
        elif (old.num_samples, old.num_shards) != (sum(spec.shard_sizes), len(spec.shard_sizes)):
            messages.append(
                f"source {spec.name} changed since the checkpoint ({sum(spec.shard_sizes)} samples in "
                f"{len(spec.shard_sizes)} shards, was {old.num_samples} in {old.num_shards}): "
                "its order starts at epoch 0"
            )
            streams.append(fresh[i])
        else:
            streams.append(len(old.positions))
            positions.update({(i, j): p for j, p in enumerate(old.positions)})
    for name in by_name:
        messages.append(f"source {name} of the checkpoint is no longer in data.sources: not read any more")
    if any(n != f for n, f in zip(streams, fresh, strict=True)):
        messages.append(
            f"streams per source {streams} as the checkpoint has them (data.num_streams={num_streams} "
            f"would give {fresh} for a fresh run): a stream's place only means something with its stream count"
        )
    if state.global_batch != global_batch:
        messages.append(
            f"the global batch is {global_batch} samples, the checkpoint's {state.global_batch}: every stream "
            f"carries on from its place, so each epoch still reads every sample once, but the batches from "
            f"step {step} on are neither run's"
        )
    return Resume(state.seed, streams, positions, messages)


class StreamPositions:
    """Each stream's place as of the latest batch the trainer took that read it.

    Loader workers read ahead, so this advances from the batches the trainer consumed, in the trainer's
    process. A stream that gave nothing to this rank keeps its last place here; the checkpoint takes,
    for each stream, the place from whichever rank saw it latest (`merge`).
    """

    def __init__(self, start: Mapping[tuple[int, int], StreamPosition], step: int):
        self.latest: dict[tuple[int, int], tuple[int, StreamPosition]] = {
            k: (step, p) for k, p in start.items()
        }

    def advance(self, batch: dict) -> None:
        for i, j, epoch, block, num_taken in batch["positions"]:
            self.latest[(i, j)] = (batch["step"], StreamPosition(epoch, block, num_taken))

    def to_list(self) -> list:
        return [[i, j, step, p.epoch, p.block, p.num_taken] for (i, j), (step, p) in self.latest.items()]

    @staticmethod
    def merge(
        per_rank: Sequence[list],
        specs: Sequence[OrderSpec],
        source_streams: Sequence[int],
        seed: int,
        global_batch: int,
    ) -> LoaderState:
        """Every rank's `to_list()` -> the checkpoint's `LoaderState`."""
        best: dict[tuple[int, int], tuple[int, StreamPosition]] = {}
        for entries in per_rank:
            for i, j, step, epoch, block, num_taken in entries:
                if (i, j) not in best or step > best[(i, j)][0]:
                    best[(i, j)] = (step, StreamPosition(epoch, block, num_taken))
        sources = []
        for i, (spec, num) in enumerate(zip(specs, source_streams, strict=True)):
            positions = [best[(i, j)][1] if (i, j) in best else StreamPosition() for j in range(num)]
            sources.append(SourceState(spec.name, sum(spec.shard_sizes), len(spec.shard_sizes), positions))
        return LoaderState(seed, global_batch, sources)
