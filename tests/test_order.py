"""The elastic order (clip_pipe/data/order.py), without tars or processes: the slots' pieces of any
number of ranks and workers make up the same global batches; a resumed order on another layout carries
on exactly; epochs read every sample once; mixes give each source its share; resampling draws the same
shards on any world size. The samples are the order's own identities (`PromisedSamples`: shard, index)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clip_pipe.data.order import (
    DataOrder,
    Layout,
    LoaderState,
    OrderSpec,
    PromisedSamples,
    Stream,
    StreamPosition,
    StreamPositions,
    default_num_streams,
    resume_order,
    slot_pieces,
    slot_range,
    split_by_weight,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(order: DataOrder, world_size: int, num_workers: int, num_steps: int, start=None, step: int = 0):
    """What every slot gives for `num_steps` steps: the global batches (source, shard, index, epoch) in
    position order, and each rank's `StreamPositions` as the trainer keeps them from the batches it took."""
    batches = [[] for _ in range(num_steps)]
    trackers = []
    for rank in range(world_size):
        tracker = StreamPositions(start or {}, step - 1)
        for worker in range(max(1, num_workers)):
            lo, hi = slot_range(order.layout.global_batch, world_size, num_workers, rank, worker)
            streams = order.streams(lo, hi, start or {}, lambda i: PromisedSamples())
            for t, piece in zip(
                range(num_steps), slot_pieces(order.layout, lo, hi, streams, step), strict=False
            ):
                assert piece.step == step + t
                batches[t] += [(item.identity[0], *item.sample, item.identity[2]) for item in piece.items]
                positions = [(i, j, p.epoch, p.block, p.num_taken) for (i, j), p in piece.positions.items()]
                tracker.advance({"step": piece.step, "positions": positions})
        trackers.append(tracker)
    return batches, trackers


def build(specs, global_batch, num_streams, shuffle_buffer, resampled=False, seed=0):
    streams = default_num_streams(
        num_streams,
        [s.weight for s in specs],
        [sum(s.shard_sizes) for s in specs],
        [len(s.shard_sizes) for s in specs],
    )
    return DataOrder.build(specs, global_batch, streams, seed, shuffle_buffer, resampled)


@st.composite
def setups(draw, max_sources=3):
    num_sources = draw(st.integers(1, max_sources))
    specs = [
        OrderSpec(
            f"source{i}",
            draw(st.lists(st.integers(1, 30), min_size=1, max_size=6)),
            draw(st.sampled_from([0.1, 0.3, 0.5, 1.0, 2.0])),
        )
        for i in range(num_sources)
    ]
    per_rank = draw(st.integers(1, 8))
    world_size = draw(st.integers(1, 4))
    global_batch = per_rank * world_size
    return {
        "specs": specs,
        "global_batch": global_batch,
        "num_streams": draw(st.integers(1, 12)),
        "shuffle_buffer": draw(st.sampled_from([0, 5, 40])),
        "resampled": draw(st.booleans()),
        "seed": draw(st.integers(0, 3)),
    }


def layouts(global_batch: int) -> list[tuple[int, int]]:
    """(ranks, workers) pairs that divide the batch: workers 0 (the rank's thread) up to the rank's batch."""
    out = []
    for world_size in range(1, global_batch + 1):
        if global_batch % world_size == 0:
            for num_workers in sorted({0, 1, 2, 3, global_batch // world_size}):
                if num_workers <= global_batch // world_size:
                    out.append((world_size, num_workers))
    return out


@SETTINGS
@given(setups(), st.data())
def test_the_global_batch_is_the_same_on_any_ranks_and_workers(setup, data):
    order = build(**setup)
    reference, _ = run(order, 1, 0, 12)
    assert all(len(batch) == setup["global_batch"] for batch in reference)
    world_size, num_workers = data.draw(st.sampled_from(layouts(setup["global_batch"])))
    batches, _ = run(order, world_size, num_workers, 12)
    assert batches == reference


@SETTINGS
@given(setups(), st.data())
def test_a_resumed_order_on_another_layout_carries_on_exactly(setup, data):
    order = build(**setup)
    num_steps = 14
    cut = data.draw(st.integers(0, num_steps))
    first = data.draw(st.sampled_from(layouts(setup["global_batch"])))
    second = data.draw(st.sampled_from(layouts(setup["global_batch"])))
    reference, _ = run(order, 1, 0, num_steps)
    before, trackers = run(order, *first, cut)
    assert before == reference[:cut]
    # As a checkpoint holds it: every rank's positions merged, through the dict that is saved.
    streams = order.layout.source_streams
    saved = StreamPositions.merge(
        [t.to_list() for t in trackers], setup["specs"], streams, setup["seed"], setup["global_batch"]
    )
    saved = saved.to_dict()
    start = resume_order(saved, setup["specs"], setup["global_batch"], 999, 77, cut)
    assert start.messages == [] or "streams per source" in start.messages[0]
    resumed = DataOrder.build(
        setup["specs"],
        setup["global_batch"],
        start.source_streams,
        start.seed,
        setup["shuffle_buffer"],
        setup["resampled"],
    )
    after, _ = run(resumed, *second, num_steps - cut, start.positions, cut)
    assert after == reference[cut:]


@SETTINGS
@given(setups())
def test_each_epoch_reads_every_sample_exactly_once(setup):
    setup["resampled"] = False
    order = build(**setup)
    num_steps = 40
    batches, _ = run(order, 1, 0, num_steps)
    for i, (spec, source) in enumerate(zip(setup["specs"], order.sources, strict=True)):
        # Streams move at the same speed, within a block and a rotation of turns of each other: the
        # first steps that cannot reach any stream's second epoch hold no sample twice.
        source_batch = order.layout.source_batches[i]
        slack = source.num_streams * (source.block_size + 2)
        seen = [s[:3] for batch in batches for s in batch if s[0] == i]
        safe = max(0, (source.num_samples - slack) // max(1, source_batch)) * source_batch
        assert len(set(seen[:safe])) == len(seen[:safe])
        # Every stream's epoch 0, read to its end, is its range; together they are the source, once each.
        epoch0 = []
        for j in range(source.num_streams):
            stream = Stream(source, j, StreamPosition(), PromisedSamples())
            items = iter(lambda stream=stream: stream.take(1)[0], None)
            epoch0 += [item.sample for item in itertools.takewhile(lambda item: item.identity[2] == 0, items)]
        expected = [(shard, k) for shard, size in enumerate(spec.shard_sizes) for k in range(size)]
        assert sorted(epoch0) == expected


@SETTINGS
@given(setups(), st.data())
def test_every_batch_holds_each_source_by_its_weight_and_every_rank_a_mix(setup, data):
    order = build(**setup)
    specs, global_batch = setup["specs"], setup["global_batch"]
    weights = [s.weight for s in specs]
    shares = order.layout.source_batches
    assert sum(shares) == global_batch
    for share, weight in zip(shares, weights, strict=True):
        assert abs(share - global_batch * weight / sum(weights)) < 1
    batches, _ = run(order, 1, 0, 10)
    for batch in batches:
        assert Counter(s[0] for s in batch) == {i: n for i, n in enumerate(shares) if n}
    # Streams fill whole runs of positions, so a rank's part holds each source within one stream's
    # count per step (plus the rounding of the turns) of its share of the rank's batch.
    world_size, _ = data.draw(st.sampled_from(layouts(global_batch)))
    per_rank = global_batch // world_size
    granularity = [-(-b // s) + 1 for b, s in zip(shares, order.layout.source_streams, strict=True)]
    for batch in batches:
        for rank in range(world_size):
            part = Counter(s[0] for s in batch[rank * per_rank : (rank + 1) * per_rank])
            for i, share in enumerate(shares):
                assert abs(part[i] - share * per_rank / global_batch) <= granularity[i], (rank, part, shares)


def test_a_mix_draws_exactly_its_counts_at_the_training_scale():
    specs = [
        OrderSpec("laion", [10_000] * 40, 0.7),
        OrderSpec("cc12m", [10_000] * 12, 0.2),
        OrderSpec("coco", [5000] * 3, 0.1),
    ]
    order = build(specs, 4096, 64, 8192)
    assert order.layout.source_batches == [2867, 819, 410]  # 2867.2, 819.2, 409.6: the largest remainder
    assert order.layout.source_streams == [45, 13, 6]
    for step in (0, 1, 7, 1000):
        counts = order.layout.counts(step)
        for i, share in enumerate(order.layout.source_batches):
            assert (
                sum(c for c, (source, _) in zip(counts, order.layout.streams, strict=True) if source == i)
                == share
            )
    # 8 ranks: each rank's 512 positions hold every source, each within one stream's count per step
    # (64 to 69 samples here) of its share: 358.4, 102.4 and 51.2.
    batch, _ = run(order, 8, 0, 1)
    for rank in range(8):
        part = Counter(s[0] for s in batch[0][rank * 512 : (rank + 1) * 512])
        assert abs(part[0] - 358.4) <= 65 and abs(part[1] - 102.4) <= 64 and abs(part[2] - 51.2) <= 70, part
        assert min(part.values()) > 0 and len(part) == 3, part


@given(
    st.integers(1, 200),
    st.integers(1, 40),
    st.integers(0, 1000),
    st.integers(1, 3).flatmap(lambda n: st.lists(st.integers(1, 9), min_size=n, max_size=n)),
)
@settings(max_examples=200, deadline=None)
def test_turns_give_every_stream_of_a_source_the_same_count(batch, num_streams, step, _unused):
    layout = Layout([batch], [num_streams])
    window = [layout.counts(t) for t in range(step, step + num_streams)]
    assert all(sum(counts) == batch for counts in window)
    assert [sum(col) for col in zip(*window, strict=True)] == [batch] * num_streams
    # The remainder is spread: a stream's first position is within one of its share of the batch.
    for counts in window:
        starts = list(itertools.accumulate([0, *counts]))
        assert all(abs(starts[j] - j * batch / num_streams) < 1 for j in range(num_streams))


@SETTINGS
@given(setups())
def test_resampled_streams_draw_shards_with_replacement_by_size(setup):
    setup["resampled"] = True
    order = build(**setup)
    for source in order.sources:
        draws = Counter(
            segment[0] for j in range(source.num_streams) for epoch in range(30)
            for segment in source.stream_range(j, epoch)[0]
        )  # fmt: skip
        assert set(draws) <= set(range(len(source.shard_sizes)))
    # Large enough to see the weighting: a 9x larger shard is drawn about 9x as often.
    source = build([OrderSpec("s", [90, 10], 1.0)], 4, 1, 0, resampled=True).sources[0]
    draws = Counter(source.stream_range(0, epoch)[0][0][0] for epoch in range(2000))
    assert 0.85 < draws[0] / 2000 < 0.95


def test_a_changed_global_batch_keeps_each_epoch_whole():
    specs = [OrderSpec("a", [23, 40, 17, 31], 1.0)]
    order = build(specs, 12, 8, 16)
    before, trackers = run(order, 2, 1, 4)
    saved = StreamPositions.merge(
        [t.to_list() for t in trackers], specs, order.layout.source_streams, 0, 12
    ).to_dict()
    start = resume_order(saved, specs, 18, 8, 0, 4)
    assert len(start.messages) == 1 and "global batch is 18 samples, the checkpoint's 12" in start.messages[0]
    resumed = DataOrder.build(specs, 18, start.source_streams, start.seed, 16)
    after, _ = run(resumed, 3, 0, 6, start.positions, 4)
    # Each stream carried on from its place: epoch 0 (all 111 samples; 156 were read) is read exactly
    # once, before and after the change.
    epoch0 = [s[:3] for batch in before + after for s in batch if s[3] == 0]
    assert sorted(epoch0) == [(0, s, k) for s, n in enumerate(specs[0].shard_sizes) for k in range(n)]


def test_resume_order_from_old_and_changed_checkpoints():
    specs = [OrderSpec("a", [10, 10], 1.0)]
    fresh = resume_order(None, specs, 8, 4, seed=5, step=0)
    assert fresh == (5, [4], {}, [])
    # A checkpoint of the per-rank loader (before the elastic order): a fresh order, said in one line.
    old = [{"num_batches": 7, "workers": [[0, 56]]}, {"num_batches": 7, "workers": [[0, 56]]}]
    start = resume_order(old, specs, 8, 4, seed=5, step=7)
    assert start.seed == 12 and start.positions == {} and len(start.messages) == 1
    assert "written before the elastic data order" in start.messages[0] and "restarts" in start.messages[0]
    assert "no data position" in resume_order(None, specs, 8, 4, seed=5, step=7).messages[0]
    # A source whose shards changed starts afresh; the other keeps its place; a dropped one is named.
    saved = LoaderState(seed=3, global_batch=8).to_dict()
    saved["sources"] = [
        {
            "name": "a",
            "num_samples": 20,
            "num_shards": 2,
            "streams": [[1, 0, 2], [1, 1, 0], [0, 3, 1], [1, 0, 0]],
        },
        {"name": "b", "num_samples": 30, "num_shards": 3, "streams": [[0, 0, 1]]},
        {"name": "gone", "num_samples": 5, "num_shards": 1, "streams": [[0, 0, 1]]},
    ]
    specs = [OrderSpec("a", [10, 10], 1.0), OrderSpec("b", [10, 10, 11], 1.0)]
    start = resume_order(saved, specs, 8, 4, seed=5, step=7)
    assert start.seed == 3 and start.source_streams == [4, 2]
    assert start.positions[(0, 2)] == StreamPosition(0, 3, 1) and (1, 0) not in start.positions
    assert len(start.messages) == 3
    assert "source b changed since the checkpoint (31 samples in 3 shards, was 30 in 3)" in start.messages[0]
    assert "source gone of the checkpoint is no longer" in start.messages[1]
    assert "streams per source [4, 2]" in start.messages[2]
    with pytest.raises(ValueError, match="format version 3, newer"):
        resume_order({**saved, "version": 3}, specs, 8, 4, seed=5, step=7)


def test_split_by_weight_is_largest_remainder():
    assert split_by_weight(12, [0.7, 0.3]) == [8, 4]  # 8.4, 3.6
    assert split_by_weight(10, [1, 1, 1]) == [4, 3, 3]  # a tie goes to the earlier share
    assert split_by_weight(7, [5, 1, 1]) == [5, 1, 1]
    assert default_num_streams(64, [0.98, 0.02], [10**6, 3], [100, 1]) == [63, 1]
    assert default_num_streams(64, [1.0], [10], [3]) == [10]  # no more streams than samples
    # Automatic: 64, split by weight, at most a quarter of the shards.
    assert default_num_streams(0, [0.7, 0.3], [10**6] * 2, [41_000, 30]) == [45, 7]
    assert default_num_streams(0, [1.0], [55_000], [11]) == [2]
