"""The loader: every rank yields the same number of full batches; bad samples are skipped and counted."""

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

from clip_pipe.data import (
    CachedTokenizer,
    ImageTextStream,
    LoaderPosition,
    Prefetcher,
    SampleErrors,
    assign_shards,
    batch_loader,
    decode_uint8,
    list_shards,
    slot_samples,
)
from clip_pipe.data.augment import TrainAugment
from tests.conftest import write_train_shards

PREPROCESS = TrainAugment(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TOKENIZER = SimpleTokenizer(context_length=16)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("num_slots", [1, 2, 3, 4, 6])
def test_each_epoch_covers_every_shard_part_exactly_once(num_shards, num_slots):
    for epoch in range(3):
        pieces = [
            assign_shards(num_shards, slot, num_slots, seed=7, epoch=epoch) for slot in range(num_slots)
        ]
        assert all(pieces), "every slot gets work, even with fewer shards than slots"
        flat = [p for slot_pieces in pieces for p in slot_pieces]
        num_parts = flat[0][2]
        assert num_parts == (1 if num_shards >= num_slots else -(-num_slots // num_shards))
        assert sorted(flat) == sorted(
            (s, part, num_parts) for s in range(num_shards) for part in range(num_parts)
        )


def test_shard_order_changes_with_epoch_and_seed():
    orders = {tuple(assign_shards(20, 0, 1, seed=s, epoch=e)) for s in (0, 1) for e in (0, 1)}
    assert len(orders) == 4


def test_first_epoch_reads_each_sample_once_across_slots(color_shards):
    shards = list_shards([str(color_shards)])
    num_slots = 4  # more slots than the 3 shards: shards are split into parts
    keys = []
    for slot in range(num_slots):
        pieces = assign_shards(len(shards), slot, num_slots, seed=0, epoch=0)
        count = sum(len(range(part, shards[s].num_samples, parts)) for s, part, parts in pieces)
        stream = slot_samples(shards, slot, num_slots, seed=0, errors=SampleErrors())
        keys += [sample["__key__"] for _, sample in itertools.islice(stream, count)]
    assert len(keys) == 100 and len(set(keys)) == 100


@pytest.mark.parametrize("num_workers", [0, 2])
def test_uneven_shards_give_every_rank_the_same_full_batches(color_shards, num_workers):
    shards = list_shards([str(color_shards)])  # 50 + 37 + 13 samples
    num_batches = 40  # over 6 epochs of 100 samples at a global batch of 16
    for rank in range(2):
        loader = batch_loader(ImageTextStream(shards, 8, PREPROCESS, TOKENIZER, rank, 2, 0, 20), num_workers)
        batches = list(itertools.islice(iter(loader), num_batches))
        assert len(batches) == num_batches
        for batch in batches:
            assert batch["images"].shape == (8, 3, 16, 16)
            assert batch["texts"].shape == (8, 16) and batch["texts"].dtype == torch.long
            assert batch["num_skipped"] == 0


def test_bad_samples_are_skipped_and_counted(tmp_path):
    folder = write_train_shards(tmp_path / "train", [20])
    with wds.TarWriter(str(folder / "shard-000001.tar")) as writer:
        writer.write({"__key__": "bad000001", "jpg": b"not a jpeg", "txt": "a broken image"})
        writer.write({"__key__": "bad000002", "txt": "no image at all"})
        writer.write(
            {"__key__": "bad000003", "jpg": (folder / "shard-000000.tar").read_bytes()[:100], "txt": "x"}
        )
    sizes = json.loads((folder / "sizes.json").read_text())
    (folder / "sizes.json").write_text(json.dumps({**sizes, "shard-000001.tar": 3}))
    # A truncated tar: it ends mid-member.
    whole = (folder / "shard-000000.tar").read_bytes()
    (folder / "shard-000002.tar").write_bytes(whole[: len(whole) // 2 + 100])
    (folder / "sizes.json").write_text(json.dumps({**sizes, "shard-000001.tar": 3, "shard-000002.tar": 20}))

    loader = batch_loader(
        ImageTextStream(list_shards([str(folder)]), 4, PREPROCESS, TOKENIZER, 0, 1, 0, 0), 0
    )
    batches = list(itertools.islice(iter(loader), 30))  # 120 samples: over 3 passes
    assert all(b["images"].shape[0] == 4 for b in batches)
    assert not any(key.startswith("bad") for b in batches for key in b["keys"])
    # 120 samples, of the 31 readable ones a pass (20 + the 11 whole before the cut): 4 passes begun, and
    # each counted its 3 bad samples and the 9 that the cut tar lost (sizes.json says it holds 20).
    assert sum(b["num_skipped"] for b in batches) == 4 * (3 + 9)


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
    stream = ImageTextStream(list_shards([str(folder)]), 4, PREPROCESS, TOKENIZER, 0, 1, 0, 0)
    batches = list(itertools.islice(iter(stream), 2))  # 8 good samples from 10 read
    assert sum(b["num_skipped"] for b in batches) == 2
    assert not any("bomb" in key for b in batches for key in b["keys"])


@pytest.mark.timeout(60)  # the bug this guards against made the loader spin forever
def test_a_bug_in_the_augmentation_fails_the_loader_instead_of_skipping_every_sample(tmp_path):
    class BrokenAugment(TrainAugment):
        def crop(self, image, rng):
            raise TypeError("a bug, not bad data")

    folder = write_train_shards(tmp_path / "train", [8])
    augment = BrokenAugment(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    stream = ImageTextStream(list_shards([str(folder)]), 4, augment, TOKENIZER, 0, 1, 0, 0)
    with pytest.raises(TypeError, match="a bug, not bad data"):
        next(iter(batch_loader(stream, 0)))


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


class NoisyAugment(TrainAugment):
    """Random augmentation that shows (the test squares are solid colours, which crops would not change)."""

    def crop(self, image: torch.Tensor, rng) -> torch.Tensor:
        return super().crop(image, rng) // 2 + rng.randrange(100)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_continues_exactly_where_it_stopped(color_shards, num_workers):
    """Replay from a saved position gives the tail of the uninterrupted stream: same samples, same crops."""
    shards = list_shards([str(color_shards)])  # uneven: 50 + 37 + 13 samples
    augment = NoisyAugment(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    def batches(start=None, num_batches=18):
        stream = ImageTextStream(shards, 6, augment, TOKENIZER, 1, 2, seed=3, shuffle_buffer=12, start=start)
        return list(itertools.islice(iter(batch_loader(stream, num_workers)), num_batches))

    full = batches()  # rank 1 of 2 reads 50 samples an epoch: 18 batches of 6 run into a third epoch
    epochs = [b["position"][0] for b in full]
    assert epochs[0] == 0 and epochs[-1] >= 2
    crossing = next(i for i in range(1, len(full)) if epochs[i] != epochs[i - 1])
    # An odd cut (the next batch is due from the second worker), and a cut at an epoch boundary.
    for cut in (5, crossing):
        position = LoaderPosition.start(num_workers)
        for batch in full[:cut]:
            position.advance(batch)
        position = LoaderPosition.from_dict(json.loads(json.dumps(position.to_dict())))  # as checkpointed
        resumed = batches(position, len(full) - cut)
        assert [b["keys"] for b in resumed] == [b["keys"] for b in full[cut:]], f"cut at batch {cut}"
        for ours, theirs in zip(resumed, full[cut:], strict=True):
            torch.testing.assert_close(ours["images"], theirs["images"], rtol=0, atol=0)
    assert not torch.equal(full[0]["images"][0], full[0]["images"][1])  # the augmentation is random
    # Within an epoch no sample repeats: the stream neither repeats nor skips.
    first_epoch = [k for b in full if b["position"][0] == 0 for k in b["keys"]]
    assert len(first_epoch) == len(set(first_epoch))


def test_augment_crops_like_torchvision_and_normalises_once_per_batch():
    """The uint8 crop draws boxes from torchvision's distribution and resizes them as open_clip's PIL
    transform does; `collate` is ToTensor + Normalize."""
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
    batch = augment.collate([crop, crop])
    normalised = TF.normalize(
        TF.to_tensor(crop.permute(1, 2, 0).numpy()), (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    )
    torch.testing.assert_close(batch, torch.stack([normalised, normalised]), rtol=1e-5, atol=1e-5)


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
