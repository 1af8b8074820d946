"""Small eval sets written by tests: make_shards.py-style paired shards and CLIP_benchmark's layouts."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import webdataset as wds
from PIL import Image

from tests.conftest import COLORS, color_jpeg

NAMES = list(COLORS)


def noise_jpeg(rng: random.Random, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), rng.randbytes(3 * size * size)).save(buffer, "JPEG")
    return buffer.getvalue()


WORDS = ["cat", "dog", "car", "tree", "sky", "boat", "house", "bird", "fish", "lamp", "road", "hill"]


def write_pairs_set(folder: Path, num_images: int = 12, captions_per_image: int = 2, seed: int = 3,
                    labels: bool = True, num_shards: int = 2, bad_keys: tuple[int, ...] = (),
                    noise: bool = False, num_colors: int = len(NAMES)) -> Path:  # fmt: skip
    """Paired shards as data_prep/make_shards.py writes them (jpg, txt, json with sha256, cls), with
    `captions_per_image` samples per image: several captions for one image, grouped by its sha256.
    Image i shows colour i % num_colors (the first `num_colors` of NAMES) and is labelled with it.
    Samples numbered in `bad_keys` get an undecodable image (counted as skipped, never fatal).
    `noise`: random-noise images and random captions, whose embeddings have no near-ties even under an
    untrained model (so rankings do not flip on rounding)."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples, index = [], 0
    for i in range(num_images):
        label = i % num_colors
        jpeg = noise_jpeg(rng) if noise else color_jpeg(NAMES[label], rng, size=16 + i)
        for c in range(captions_per_image):
            caption = [f"a photo of a {NAMES[label]} square", f"a {NAMES[label]} thing, number {i}"][c % 2]
            if noise:
                caption = " ".join(rng.choice(WORDS) for _ in range(4))
            meta = {"caption": caption, "sha256": hashlib.sha256(jpeg).hexdigest(), "extra": {}}
            sample = {"__key__": f"{index:09d}", "jpg": b"not a jpeg" if index in bad_keys else jpeg,
                      "txt": caption, "json": json.dumps(meta)}  # fmt: skip
            if labels:
                sample["cls"] = str(label)
            samples.append(sample)
            index += 1
    per_shard = -(-len(samples) // num_shards)
    sizes = {}
    for s in range(num_shards):
        name = f"shard-{s:06d}.tar"
        chunk = samples[s * per_shard : (s + 1) * per_shard]
        with wds.TarWriter(str(folder / name), mtime=0) as writer:
            for sample in chunk:
                writer.write(sample)
        sizes[name] = len(chunk)
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return folder


def webp(color: str, rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(color_jpeg(color, rng))).save(buffer, "webp", lossless=True)
    return buffer.getvalue()


def write_clip_benchmark_retrieval(
    folder: Path, num_images: int = 9, seed: int = 4, noise: bool = False
) -> Path:
    """CLIP_benchmark's WebDataset retrieval layout, as its clip_benchmark_export_wds writes it:
    dataset_type.txt = retrieval, test/nshards.txt, test/N.tar of s%07d keys with webp + txt (one caption
    per line; here 1 to 3 of them, so ranks hold unequal numbers of captions). `noise`: as in
    write_pairs_set, no two captions or images alike."""
    (folder / "test").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with wds.TarWriter(str(folder / "test" / "0.tar"), mtime=0) as writer:
        for i in range(num_images):
            color = NAMES[i % len(NAMES)]
            captions = [f"a photo of a {color} square", f"a {color} thing", f"{color}"][: 1 + i % 3]
            image = webp(color, rng)
            if noise:
                captions = [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in captions]
                image = noise_jpeg(rng)
            writer.write(
                {"__key__": f"s{i:07d}", "webp" if not noise else "jpg": image, "txt": "\n".join(captions)}
            )
    (folder / "test" / "nshards.txt").write_text("1\n")
    (folder / "dataset_type.txt").write_text("retrieval\n")
    return folder


def write_clip_benchmark_classification(folder: Path, num_images: int = 16, seed: int = 5) -> Path:
    """CLIP_benchmark's WebDataset classification layout with webp images and `cls` labels."""
    (folder / "test").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with wds.TarWriter(str(folder / "test" / "0.tar"), mtime=0) as writer:
        for i in range(num_images):
            writer.write({"__key__": f"s{i:07d}", "webp": webp(NAMES[i % 4], rng), "cls": str(i % 4)})
    (folder / "test" / "nshards.txt").write_text("1\n")
    (folder / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c} square\n")
    return folder
