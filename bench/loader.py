"""The training input path: clip-pipe's loader against open_clip_train's own WebDataset pipeline.

Both read the same shards into batches of decoded, augmented images and tokenized captions for the
same model (its training transform and tokenizer), in this one process with one thread: samples/s per
loader worker. open_clip_train's side is its own `get_wds_dataset` (resampled shards, tar samples,
shuffle, PIL decode, `image_transform_v2(is_train=True)` per sample, one caption tokenized at a time,
batch). Runs alternate (ours, theirs, ...) after a warm-up of each; the table gives medians and the
median of the pairwise ratios with their range.

It first prints a per-stage profile (µs per sample, one stage at a time over the same samples):
tar read, decode, augment, tokenize, collate, for each side's way of doing it.

    python -m bench.loader --shards data/fashion_mnist/train [--rounds 3 --batches 40]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import statistics
import time
from argparse import Namespace
from pathlib import Path

import torch
import webdataset as wds
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from bench.common import machine_description, normalised_on_cpu
from clip_pipe.config import ModelConfig, SourceConfig
from clip_pipe.data import (
    CachedTokenizer,
    TarBlocks,
    build_stream,
    decode_uint8,
    list_shards,
    list_sources,
)
from clip_pipe.data.augment import TrainAugment
from clip_pipe.data.open import ShardReader
from clip_pipe.model import build_model

REPO = Path(__file__).resolve().parents[1]
MODEL = "clip-pipe-tiny-28"


def open_clip_loader(shards: list[str], batch: int, preprocess, tokenizer, seed: int):
    import open_clip_train.data as oc_data

    # webdataset 1.x yields an end-of-shard marker {} that open_clip_train's grouping chokes on
    # (KeyError 'fname'); dropping the markers first changes nothing else (as bench/train_throughput.py).
    group_by_keys = oc_data.group_by_keys_nothrow
    oc_data.group_by_keys_nothrow = lambda data, *a, **k: group_by_keys((s for s in data if s), *a, **k)
    args = Namespace(
        train_data="::".join(shards), val_data=None, dataset_resampled=True, train_num_samples=10**9,
        train_data_upsampling_factors=None, seed=seed, batch_size=batch, workers=0, world_size=1,
    )  # fmt: skip
    return oc_data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer).dataloader


def samples_per_s(batches, num_batches: int, batch: int) -> float:
    for _ in range(3):  # warm-up: the shuffle buffer's first fill
        next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return num_batches * batch / (time.perf_counter() - start)


def stage_profile(shard_url: str, num_samples: int, encoder, open_clip_preprocess) -> dict[str, float]:
    """µs per sample of each stage, on the first `num_samples` samples of one shard."""

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return result, (time.perf_counter() - start) / num_samples * 1e6

    out = {}
    shard = list_shards([str(Path(shard_url).parent)])[0]
    samples, out["tar read (webdataset tar iterator)"] = timed(
        lambda: list(itertools.islice(wds.tariterators.tarfile_samples([{"url": shard_url}]), num_samples))
    )
    _, out["tar read (clip-pipe)"] = timed(
        lambda: TarBlocks([shard], ShardReader())([(0, 0, min(num_samples, shard.num_samples))], [0])[0]
    )
    pil, out["decode: PIL, to RGB"] = timed(
        lambda: [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in samples]
    )
    tensors, out["decode: torchvision.io to uint8 (clip-pipe)"] = timed(
        lambda: [decode_uint8(s) for s in samples]
    )
    _, out["augment: open_clip train transform (PIL)"] = timed(
        lambda: [open_clip_preprocess(im) for im in pil]
    )
    augment: TrainAugment = encoder.preprocess_train
    crops, out["augment: uint8 crop (clip-pipe)"] = timed(
        lambda: [augment.crop(t, random.Random(i)) for i, t in enumerate(tensors)]
    )
    captions = [s["txt"].decode() for s in samples]
    _, out["tokenize: one caption at a time (open_clip_train)"] = timed(
        lambda: [encoder.tokenizer(c)[0] for c in captions]
    )
    batch = 128
    cached = CachedTokenizer(encoder.tokenizer)
    _, out["tokenize: cached, per batch (clip-pipe)"] = timed(
        lambda: [cached(captions[i : i + batch]) for i in range(0, num_samples, batch)]
    )
    floats = [open_clip_preprocess(im) for im in pil]
    _, out["collate: stack floats"] = timed(
        lambda: [torch.stack(floats[i : i + batch]) for i in range(0, num_samples, batch)]
    )
    batches, out["collate: stack uint8 (clip-pipe)"] = timed(
        lambda: [augment.collate(crops[i : i + batch]) for i in range(0, num_samples, batch)]
    )
    _, out["normalise on the rank, reused float batch (clip-pipe)"] = timed(
        lambda: list(normalised_on_cpu(({"images": b} for b in batches), augment))
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=Path, default=REPO / "data/fashion_mnist/train")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-samples", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    encoder = build_model(ModelConfig(name=MODEL))
    pp = PreprocessCfg(**encoder.model.visual.preprocess_cfg)
    open_clip_preprocess = image_transform_v2(pp, is_train=True)
    shards = list_shards([str(args.shards)])
    urls = [s.url for s in shards]

    profile = stage_profile(urls[0], args.profile_samples, encoder, open_clip_preprocess)
    for stage, us in profile.items():
        print(f"{stage:52s} {us:7.1f} us/sample")

    results: dict[str, list[float]] = {"clip-pipe": [], "open_clip_train": []}
    for round_index in range(args.rounds):
        seed = round_index
        ours, _ = build_stream(
            list_sources([SourceConfig([str(args.shards)])]), args.batch, encoder.preprocess_train,
            encoder.tokenizer, 0, 1, num_streams=0, seed=seed, shuffle_buffer=2000,
        )  # fmt: skip
        ours = normalised_on_cpu(
            ours, encoder.preprocess_train
        )  # uint8 batches, normalised as a CPU rank does
        theirs = open_clip_loader(urls, args.batch, open_clip_preprocess, encoder.tokenizer, seed)
        for name, loader in (("clip-pipe", ours), ("open_clip_train", theirs)):
            rate = samples_per_s(iter(loader), args.batches, args.batch)
            results[name].append(rate)
            print(f"round {round_index} {name}: {rate:.0f} samples/s")

    ratios = [a / b for a, b in zip(results["clip-pipe"], results["open_clip_train"], strict=True)]
    table = {
        "machine": machine_description(),
        "setting": f"{MODEL} transforms and tokenizer, batch {args.batch}, 1 process, 1 thread, {args.shards}",
        "stage_us_per_sample": {k: round(v, 1) for k, v in profile.items()},
        "samples_per_s_per_worker": {
            "clip-pipe": statistics.median(results["clip-pipe"]),
            "open_clip_train": statistics.median(results["open_clip_train"]),
            "ratio_median": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
        },
    }
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
