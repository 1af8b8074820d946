"""The loader on real tar shards: the global batch is the same on any ranks and workers, also resumed
on another layout and with a weighted mix; every rank yields the same number of full batches;
undecodable samples are stood in for and counted the same way on every layout."""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from clip_pipe.config import SourceConfig
from clip_pipe.data import (
    CachedTokenizer,
    Prefetcher,
    StreamPositions,
    batch_loader,
    build_stream,
    decode_uint8,
    list_shards,
    list_sources,
    tar_samples,
)
from clip_pipe.data.augment import TrainAugment
from clip_pipe.data.order import OrderSpec, PromisedSamples, slot_pieces, slot_range
from tests.conftest import write_train_shards

PREPROCESS = TrainAugment(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TOKENIZER = SimpleTokenizer(context_length=16)


class NoisyAugment(TrainAugment):
    """Random augmentation that shows (the test squares are solid colours, which crops would not change)."""

    def crop(self, image: torch.Tensor, rng) -> torch.Tensor:
        return super().crop(image, rng) // 2 + rng.randrange(100)


NOISY = NoisyAugment(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def rank_loader(
    sources, global_batch, rank, world_size, num_workers, *, augment=NOISY, saved=None, step=0, **kw
):
    """One rank's batches over `sources` [(folder, weight)], as train.py builds them, and where they
    start (`Resume`)."""
    settings = {"num_streams": 6, "seed": 0, "shuffle_buffer": 24, **kw}
    configs = [SourceConfig([str(folder)], weight) for folder, weight in sources]
    stream, start = build_stream(
        list_sources(configs), global_batch, augment, TOKENIZER, rank, world_size, saved=saved, step=step,
        **settings,
    )  # fmt: skip
    return batch_loader(stream, num_workers), start


def global_batches(sources, global_batch, world_size, num_workers, num_steps, step=0, **kw):
    """Every rank's batches of `num_steps` steps joined into global batches, and the data state a
    checkpoint after them would hold: every rank's stream positions, kept and merged as train.py does."""
    per_rank, trackers = [], []
    for rank in range(world_size):
        loader, start = rank_loader(sources, global_batch, rank, world_size, num_workers, step=step, **kw)
        tracker = StreamPositions(start.positions, step - 1)
        batches = list(itertools.islice(iter(loader), num_steps))
        for batch in batches:
            tracker.advance(batch)
        per_rank.append(batches)
        trackers.append(tracker.to_list())
    joined = [
        {
            "keys": [k for b in step for k in b["keys"]],
            "images": torch.cat([b["images"] for b in step]),
            "num_skipped": sum(b["num_skipped"] for b in step),
            "sizes": [len(b["keys"]) for b in step],
        }
        for step in zip(*per_rank, strict=True)
    ]
    return joined, trackers


def saved_state(trackers, sources, global_batch, num_streams=6, seed=0):
    """What a checkpoint holds, from every rank's positions (`train._gather_positions`)."""
    specs = [
        OrderSpec(s.name, [shard.num_samples for shard in s.shards], s.weight)
        for s in list_sources([SourceConfig([str(f)], w) for f, w in sources])
    ]
    from clip_pipe.data.order import default_num_streams

    sizes = [s.shard_sizes for s in specs]
    streams = default_num_streams(
        num_streams, [s.weight for s in specs], [sum(z) for z in sizes], [len(z) for z in sizes]
    )
    return json.loads(
        json.dumps(StreamPositions.merge(trackers, specs, streams, seed, global_batch).to_dict())
    )


def assert_same_batches(ours, theirs):
    assert [b["keys"] for b in ours] == [b["keys"] for b in theirs]
    assert [b["num_skipped"] for b in ours] == [b["num_skipped"] for b in theirs]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a["images"], b["images"], rtol=0, atol=0)


@pytest.fixture
def mix(tmp_path, color_shards):
    """Two sources: the uneven colour shards (weight 0.7) and a smaller set with other keys (0.3)."""
    other = write_train_shards(tmp_path / "other", [20, 9], seed=5, first_key=10_000)
    return [(color_shards, 0.7), (other, 0.3)]


def test_real_streams_read_the_samples_the_order_promises(color_shards):
    """The tar reader gives, for every position, the sample the pure order names (shard, index)."""
    keys = {
        i: [s["__key__"] for s in tar_samples(shard.url)]
        for i, shard in enumerate(list_shards([str(color_shards)]))
    }
    stream, _ = build_stream(
        list_sources([SourceConfig([str(color_shards)])]), 10, PREPROCESS, TOKENIZER, 0, 1,
        num_streams=4, seed=3, shuffle_buffer=20,
    )  # fmt: skip
    order = stream.order
    lo, hi = slot_range(10, 1, 0, 0, 0)
    pure = slot_pieces(order.layout, lo, hi, order.streams(lo, hi, {}, lambda i: PromisedSamples()), 0)
    real = batch_loader(stream, 0)
    seen = []
    for piece, batch in itertools.islice(
        zip(pure, real, strict=False), 25
    ):  # 250 samples: two and a half epochs
        assert batch["keys"] == [keys[shard][k] for shard, k in (item.sample for item in piece.items)]
        seen += batch["keys"]
    assert len(set(seen[:90])) == 90 and len(set(seen)) == 100  # the first epoch reads each sample once


@pytest.mark.parametrize("layout", [(2, 1), (3, 0), (1, 2)])
def test_global_batches_are_the_same_on_any_ranks_and_workers(mix, layout):
    """A mix of two sources; global batch 12 as 1 rank in-process, 2 x 1 worker, 3 x 0, 1 x 2 workers:
    the same samples in the same places, with the same random crops."""
    reference, _ = global_batches(mix, 12, 1, 0, 20)
    ours, _ = global_batches(mix, 12, *layout, 20)
    assert_same_batches(ours, reference)
    for batch in ours:
        assert batch["sizes"] == [12 // layout[0]] * layout[0]
        # 0.7 and 0.3 of 12: 8.4 and 3.6, rounded by largest remainder to 8 and 4 in every batch.
        assert sum(int(k) >= 10_000 for k in batch["keys"]) == 4
    assert not torch.equal(ours[0]["images"][0], ours[0]["images"][1])  # the augmentation is random


def test_a_resumed_loader_on_other_ranks_and_workers_continues_exactly(mix):
    """2 ranks x 1 worker, stopped after 7 steps; resumed on 3 ranks x 0 (the rank's thread) for 6
    steps; stopped and resumed on 1 rank x 2 workers: the batches of a loader never stopped."""
    reference, _ = global_batches(mix, 12, 1, 0, 21)
    first, trackers = global_batches(mix, 12, 2, 1, 7)
    saved = saved_state(trackers, mix, 12)
    second, trackers = global_batches(mix, 12, 3, 0, 6, saved=saved, step=7)
    saved = saved_state(trackers, mix, 12)
    third, _ = global_batches(mix, 12, 1, 2, 8, saved=saved, step=13)
    assert_same_batches(first + second + third, reference)


def test_resampled_batches_are_the_same_on_any_layout_and_draw_with_replacement(mix):
    reference, _ = global_batches(mix, 12, 1, 0, 12, resampled=True)
    ours, _ = global_batches(mix, 12, 3, 0, 12, resampled=True)
    assert_same_batches(ours, reference)
    keys = [k for b in reference for k in b["keys"] if int(k) < 10_000]  # the first source's
    # 96 draws from 100 samples in 3 shards, whole shards drawn with replacement: repeats long before an
    # epoch's worth, where the epoch order has none.
    assert len(set(keys)) < len(keys)
    epochs, _ = global_batches(mix, 12, 1, 0, 12)
    first = [k for b in epochs for k in b["keys"] if int(k) < 10_000]
    assert len(set(first)) == len(first)


def test_streams_announce_their_next_shards_to_the_reader(color_shards, monkeypatch):
    """`ShardReader.prefetch` hears, from each stream (its own plan), the shards it opens next, in order,
    before it opens them (so a remote reader can fetch them ahead): this epoch's, then the next's."""
    import clip_pipe.data.open

    events = []

    def prefetch(self, urls, stream=None):
        events.append(("hint", stream, list(urls)))

    monkeypatch.setattr(clip_pipe.data.open.ShardReader, "prefetch", prefetch)
    real_samples = clip_pipe.data.open.ShardReader.samples

    def samples(self, url, stream=None):
        events.append(("open", stream, url))
        yield from real_samples(self, url, stream)

    monkeypatch.setattr(clip_pipe.data.open.ShardReader, "samples", samples)
    loader, _ = rank_loader([(color_shards, 1.0)], 4, 0, 1, 0, num_streams=2, shuffle_buffer=0)
    list(itertools.islice(iter(loader), 40))  # 160 samples: into the second epoch
    opened = [i for i, (kind, _, _) in enumerate(events) if kind == "open"]
    assert len(opened) >= 6
    for i in opened:  # every shard was announced by its own stream before that stream opened it
        _, stream, url = events[i]
        hints = [urls for kind, s, urls in events[:i] if kind == "hint" and s is stream]
        assert hints and url in hints[-1], events[: i + 1]
    # A stream's first hint is its epoch's shards in its reading order, then the next epoch's first.
    shards = [s.url for s in list_shards([str(color_shards)])]
    stream, _ = build_stream(
        list_sources([SourceConfig([str(color_shards)])]), 4, PREPROCESS, TOKENIZER, 0, 1, num_streams=2,
        seed=0, shuffle_buffer=0,
    )  # fmt: skip
    source = stream.order.sources[0]
    expected = [
        [shards[shard] for epoch in (0, 1) for shard, _, _ in source.stream_range(j, epoch)[0]][:4]
        for j in range(2)
    ]
    streams = list(dict.fromkeys(s for kind, s, _ in events if kind == "hint"))
    assert len(streams) == 2
    first_hints = [next(urls for kind, s, urls in events if kind == "hint" and s is k) for k in streams]
    assert sorted(first_hints) == sorted(expected)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_uneven_shards_give_every_rank_the_same_full_batches(color_shards, num_workers):
    num_batches = 40  # over 6 epochs of 100 samples at a global batch of 16
    for rank in range(2):
        loader, _ = rank_loader([(color_shards, 1.0)], 16, rank, 2, num_workers)
        batches = list(itertools.islice(iter(loader), num_batches))
        assert len(batches) == num_batches
        for batch in batches:
            assert batch["images"].shape == (8, 3, 16, 16) and batch["images"].dtype == torch.uint8
            assert batch["texts"].shape == (8, 16) and batch["texts"].dtype == torch.long
            assert batch["num_skipped"] == 0


def write_bad_samples(folder: Path) -> Path:
    """A shard of 20 good samples and one of 3 undecodable ones (not a JPEG, no image, a cut JPEG)."""
    write_train_shards(folder, [20])
    with wds.TarWriter(str(folder / "shard-000001.tar")) as writer:
        writer.write({"__key__": "bad000001", "jpg": b"not a jpeg", "txt": "a broken image"})
        writer.write({"__key__": "bad000002", "txt": "no image at all"})
        writer.write(
            {"__key__": "bad000003", "jpg": (folder / "shard-000000.tar").read_bytes()[:100], "txt": "x"}
        )
    (folder / "sizes.json").write_text(json.dumps({"shard-000000.tar": 20, "shard-000001.tar": 3}))
    return folder


def test_undecodable_samples_are_stood_in_for_and_counted_the_same_on_any_layout(tmp_path):
    """Each undecodable sample is counted once, and its place taken by the next sample of its stream
    that decodes: what the pure order says, on any layout."""
    folder = write_bad_samples(tmp_path / "train")
    sources = [(folder, 1.0)]
    reference, _ = global_batches(sources, 4, 1, 0, 30, num_streams=2, shuffle_buffer=4)
    ours, _ = global_batches(sources, 4, 2, 1, 30, num_streams=2, shuffle_buffer=4)
    assert_same_batches(ours, reference)
    # The pure order: which sample each position names, and the stand-in for a bad one.
    shards = list_shards([str(folder)])
    keys = {i: [s["__key__"] for s in tar_samples(shard.url)] for i, shard in enumerate(shards)}
    stream, _ = build_stream(
        list_sources([SourceConfig([str(folder)])]), 4, PREPROCESS, TOKENIZER, 0, 1, num_streams=2, seed=0,
        shuffle_buffer=4,
    )  # fmt: skip
    order = stream.order
    streams = order.streams(0, 4, {}, lambda i: PromisedSamples())
    by_name = {order.layout.streams[k]: s for k, s in streams.items()}
    expected_keys, expected_skipped = [], []
    for piece in itertools.islice(slot_pieces(order.layout, 0, 4, streams, 0), 30):
        step_keys, num_bad = [], 0
        for item in piece.items:
            key = keys[item.sample[0]][item.sample[1]]
            if key.startswith("bad"):
                num_bad += 1
                following = by_name[item.identity[:2]].samples_after(item.identity)
                key = next(k for k in (keys[s][i] for s, i in following) if not k.startswith("bad"))
            step_keys.append(key)
        expected_keys.append(step_keys)
        expected_skipped.append(num_bad)
    assert [b["keys"] for b in reference] == expected_keys
    assert [b["num_skipped"] for b in reference] == expected_skipped
    assert sum(expected_skipped) >= 3 * 4  # 120 samples, 5 epochs of 23: each bad sample 5 times


def test_an_image_over_the_pixel_limit_is_skipped_before_decoding(tmp_path):
    # 7000 x 6000 one-bit pixels: a 5 KB PNG that would decode to 126 MB of RGB.
    bomb = io.BytesIO()
    Image.new("1", (7000, 6000)).save(bomb, format="PNG")
    with pytest.raises(ValueError, match="42000000 pixels, over the limit of 40000000"):
        decode_uint8({"__key__": "bomb", "png": bomb.getvalue()})

    folder = write_train_shards(tmp_path / "train", [4])
    with wds.TarWriter(str(folder / "shard-000001.tar")) as writer:
        writer.write({"__key__": "bomb", "png": bomb.getvalue(), "txt": "a decompression bomb"})
    sizes = json.loads((folder / "sizes.json").read_text())
    (folder / "sizes.json").write_text(json.dumps({**sizes, "shard-000001.tar": 1}))
    loader, _ = rank_loader([(folder, 1.0)], 5, 0, 1, 0)
    batches = list(itertools.islice(iter(loader), 4))  # 4 epochs of 5
    assert sum(b["num_skipped"] for b in batches) == 4  # the bomb, once an epoch
    assert all(len(b["keys"]) == 5 for b in batches)
    assert not any("bomb" in key for b in batches for key in b["keys"])


@pytest.mark.timeout(60)  # the bug this guards against made the loader spin forever
def test_a_bug_in_the_augmentation_fails_the_loader_instead_of_skipping_every_sample(tmp_path):
    class BrokenAugment(TrainAugment):
        def crop(self, image, rng):
            raise TypeError("a bug, not bad data")

    folder = write_train_shards(tmp_path / "train", [8])
    augment = BrokenAugment(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.raises(TypeError, match="a bug, not bad data"):
        next(iter(rank_loader([(folder, 1.0)], 4, 0, 1, 0, augment=augment)[0]))


@pytest.mark.timeout(120)
def test_shards_of_nothing_decodable_stop_the_run_with_a_clear_error(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    with wds.TarWriter(str(folder / "shard-000000.tar")) as writer:
        for i in range(5):
            writer.write({"__key__": f"x{i}", "jpg": b"not a jpeg", "txt": "a broken image"})
    (folder / "sizes.json").write_text(json.dumps({"shard-000000.tar": 5}))
    with pytest.raises(ValueError, match="10000 samples in a row could not be decoded"):
        next(iter(rank_loader([(folder, 1.0)], 2, 0, 1, 0, num_streams=1)[0]))


def test_missing_sizes_json_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"no sizes\.json"):
        list_shards([str(tmp_path)])
    write_train_shards(tmp_path / "t", [3])
    (tmp_path / "t" / "shard-000000.tar").unlink()
    with pytest.raises(ValueError, match="does not exist"):
        list_shards([str(tmp_path / "t")])


def test_empty_shards_are_left_out(tmp_path):
    """Data prep writes a 0-sample shard for a row range it rejected in full; no loader slot may get it."""
    folder = write_train_shards(tmp_path / "t", [3, 0, 2])
    shards = list_shards([str(folder)])
    assert [Path(s.url).name for s in shards] == ["shard-000000.tar", "shard-000002.tar"]
    write_train_shards(tmp_path / "empty", [0])
    with pytest.raises(ValueError, match="no samples"):
        list_shards([str(tmp_path / "empty")])


def test_augment_crops_like_torchvision_and_normalises_once_per_batch():
    """The uint8 crop draws boxes from torchvision's distribution and resizes them as open_clip's PIL
    transform does; `collate` then `normalize` is ToTensor + Normalize."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop
    from torchvision.transforms import functional as TF

    augment = TrainAugment(20, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))
    image = torch.randint(0, 256, (3, 31, 23), dtype=torch.uint8)
    boxes = [augment.crop_box(31, 23, random.Random(seed)) for seed in range(2000)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 31 - h and 0 <= left <= 23 - w
    torch.manual_seed(0)
    reference = RandomResizedCrop(20, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC)
    ref_boxes = [reference.get_params(image, reference.scale, reference.ratio) for _ in range(2000)]
    assert {(h, w) for _, _, h, w in boxes} == {(h, w) for _, _, h, w in ref_boxes}  # same crop sizes
    mean_area = sum(h * w for _, _, h, w in boxes) / len(boxes) / (31 * 23)
    ref_mean_area = sum(h * w for _, _, h, w in ref_boxes) / len(ref_boxes) / (31 * 23)
    assert abs(mean_area - ref_mean_area) < 0.005

    # Against open_clip's path (torchvision on a PIL image): both are antialiased bicubic with PIL's
    # kernel, rounding differently; on white noise, the worst case, pixels differ by 1/3 level on average.
    crop = augment.crop(image, random.Random(7))
    top, left, h, w = augment.crop_box(31, 23, random.Random(7))
    pil = TF.to_pil_image(image)
    expected = TF.pil_to_tensor(TF.resized_crop(pil, top, left, h, w, [20, 20], InterpolationMode.BICUBIC))
    assert crop.dtype == torch.uint8 and crop.shape == (3, 20, 20)
    assert (crop.float() - expected.float()).abs().mean() < 1.0
    batch = augment.normalize(augment.collate([crop, crop]))
    normalised = TF.normalize(
        TF.to_tensor(crop.permute(1, 2, 0).numpy()), (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    )
    torch.testing.assert_close(batch, torch.stack([normalised, normalised]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_rank_normalises_uint8_batches_bitwise_as_the_loader_did(color_shards, num_workers):
    """The loader hands on uint8 batches and train.py normalises them on the rank: the float batch the
    model sees is bit for bit what the loader's collate made before (stack, float(), mul_, add_), in a
    fresh tensor or in the reused one a CPU rank writes into."""
    from clip_pipe.train import _model_input

    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    augment = NoisyAugment(16, mean=mean, std=std)
    loader, _ = rank_loader([(color_shards, 1.0)], 8, 0, 1, num_workers, augment=augment)
    batches = list(itertools.islice(iter(loader), 3))
    # The same samples' crops, drawn again through the stream's own seeding, without the loader.
    stream, _ = build_stream(
        list_sources([SourceConfig([str(color_shards)])]), 8, augment, TOKENIZER, 0, 1,
        num_streams=6, seed=0, shuffle_buffer=24,
    )  # fmt: skip
    pieces = list(itertools.islice(iter(stream), 3))
    std_t, mean_t = torch.tensor(std).view(1, -1, 1, 1), torch.tensor(mean).view(1, -1, 1, 1)
    float_batches: dict[str, torch.Tensor] = {}
    for batch, piece in zip(batches, pieces, strict=True):
        assert batch["images"].dtype == torch.uint8 and batch["keys"] == piece["keys"]
        crops = list(piece["images"])
        before = torch.stack(crops).float().mul_(1 / (255 * std_t)).add_(-mean_t / std_t)  # the old collate
        model_input = _model_input(batch["images"], augment, torch.device("cpu"), float_batches, "images")
        assert model_input.dtype == torch.float32
        assert torch.equal(model_input, before)
        assert torch.equal(augment.normalize(batch["images"]), before)
    assert model_input.data_ptr() == float_batches["images"].data_ptr(), "a CPU rank reuses its buffer"
    assert _model_input(None, augment, torch.device("cpu"), float_batches, "views") is None


def test_cached_tokenizer_gives_the_tokenizers_ids():
    calls = []

    def tokenizer(captions):
        calls.append(list(captions))
        return TOKENIZER(captions)

    cached = CachedTokenizer(tokenizer, max_size=2)
    captions = ["a red square", "a blue square", "a red square"]
    torch.testing.assert_close(cached(captions), TOKENIZER(captions), rtol=0, atol=0)
    assert calls == [["a red square", "a blue square"]]  # each distinct caption once
    more = ["a green square", "a blue square"]
    torch.testing.assert_close(cached(more), TOKENIZER(more), rtol=0, atol=0)  # full: not cached
    torch.testing.assert_close(cached(more), TOKENIZER(more), rtol=0, atol=0)
    assert calls[1:] == [["a green square"], ["a green square"]] and len(cached.cache) == 2


def test_prefetcher_yields_in_order_then_raises_the_streams_error():
    def items():
        yield from range(5)
        raise ValueError("unreadable shard")

    prefetched = Prefetcher(items(), depth=2)
    assert [next(prefetched) for _ in range(5)] == list(range(5))
    with pytest.raises(ValueError, match="unreadable shard"):
        next(prefetched)
    assert list(Prefetcher(iter(range(3)), depth=1)) == [0, 1, 2]


@pytest.mark.parametrize(
    "mode, fmt",
    [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("L", "WEBP")],
)
def test_decode_uint8_gives_pils_rgb_pixels(mode, fmt):
    import io

    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)).convert(
        mode
    )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    expected = torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1)
    decoded = decode_uint8({"__key__": "x", fmt.lower().replace("jpeg", "jpg"): buffer.getvalue()})
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 9, 13)
    # JPEG decoders may round chroma upsampling differently by a level or two.
    assert (decoded.int() - expected.int()).abs().max() <= (3 if fmt == "JPEG" else 0)


def test_decode_uint8_scales_16_bit_pngs_to_8_bits():
    import io

    import numpy as np
    from PIL import Image

    pixels = (np.arange(35, dtype=np.uint16).reshape(5, 7) * 1800).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    decoded = decode_uint8({"png": buffer.getvalue()})
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 5, 7)
    assert torch.equal(decoded[1], torch.from_numpy((pixels >> 8).astype(np.uint8)))
