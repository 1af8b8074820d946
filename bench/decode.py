"""Decoding real image sizes: decoded + augmented samples/s per core, ours against open_clip's pipeline.

Shards of 256- and 512-pixel JPEGs (quality 95, img2dataset's layout: K.jpg, K.txt, K.json in
00000000.tar, with 00000000_stats.json) are built from a folder of images with .txt captions, by
default the Tux Paint stamps (Debian tuxpaint-stamps-default, GPL-2: written to a temporary folder,
never kept), as two sets:
- stamps: every PNG stamp, fitted into the square and padded with white (img2dataset's "border" mode);
- photos: the photo cut-outs alone (PNGs with thousands of distinct colours, most pixels a colour of
  their own), scaled to fill the square (img2dataset's "center_crop" mode).

Per shard, with one thread, these run over all its samples in turn, round after round (interleaved):
- open_clip: webdataset's tar reader, PIL decode to RGB, `open_clip.image_transform(S, is_train=True)`
  per sample (RandomResizedCrop bicubic, ToTensor, Normalize), batched;
- ours: clip-pipe's tar reader, `decode_for_crop` (the crop box drawn from the header, a reduced-scale
  JPEG decode where the box allows) + `TrainAugment.crop`, `collate` per batch (uint8), normalised
  into a reused float batch as a CPU rank does (`bench.common.normalised_on_cpu`);
- ours, full decode: the same with `decode_uint8` (the full-resolution decode we had before);
- PIL decode alone: `Image.open(...).load()` of each sample's JPEG bytes, already in memory.
The table gives the median samples/s of each and the medians of the per-round ratios, with their range.

It also prints a profile (us per sample, one stage at a time) and how far the reduced-scale crops are
from the full-resolution ones (PSNR over the crops that were reduced; the rest are bit-identical).

    python -m bench.decode [--root /usr/share/tuxpaint/stamps] [--rounds 7]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m bench.decode
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import random
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import simplejpeg
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from bench.common import machine_description, normalised_on_cpu
from clip_pipe.data.augment import TrainAugment
from clip_pipe.data.decode import Box, CropSource, decode_for_crop, decode_uint8, jpeg_reduction
from clip_pipe.data.tar import tar_samples
from clip_pipe.prep.images import is_svg, to_rgb

DEFAULT_ROOT = Path("/usr/share/tuxpaint/stamps")
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def is_photo(image: Image.Image) -> bool:
    """A photo cut-out rather than a drawing: over 4096 distinct opaque colours, and at least 30% of the
    opaque pixels a colour of their own (drawings repeat a few flat colours)."""
    rgba = np.asarray(image.convert("RGBA"))
    pixels = np.ascontiguousarray(rgba[rgba[..., 3] > 200][:, :3])
    if len(pixels) == 0:
        return False
    num_colours = len(np.unique(pixels.view(np.dtype((np.void, 3)))))
    return num_colours > 4096 and num_colours >= 0.3 * len(pixels)


def square(image: Image.Image, side: int, fill: bool) -> Image.Image:
    """img2dataset's resize modes: "center_crop" (`fill`: scale to cover, crop the middle) or "border"
    (scale to fit, pad with white)."""
    scale = (max if fill else min)(side / image.width, side / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def source_images(root: Path, photos: bool, num_images: int) -> list[tuple[Image.Image, str]]:
    """(RGB image, caption) for up to `num_images` of the folder's PNGs with a .txt beside them, in a
    fixed shuffled order."""
    found = []
    for path in sorted(root.rglob("*.png")):
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file() or is_svg(path.read_bytes()[:64]):
            continue
        caption = next((line.strip() for line in caption_file.read_text(errors="replace").splitlines()), "")
        found.append((path, caption))
    random.Random(0).shuffle(found)
    out = []
    for path, caption in found:
        with Image.open(path) as image:
            image.load()
            if photos and not is_photo(image):
                continue
            out.append((to_rgb(image), caption))
        if len(out) == num_images:
            break
    if not out:
        raise ValueError(f"no {'photo ' if photos else ''}PNGs with .txt captions under {root}")
    return out


def write_img2dataset_shard(
    folder: Path, images: list[tuple[Image.Image, str]], side: int, fill: bool
) -> Path:
    """00000000.tar (K.jpg, K.txt, K.json) and 00000000_stats.json, as img2dataset writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    tar_path = folder / "00000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for index, (image, caption) in enumerate(images):
            key = f"{index:09d}"
            jpeg = io.BytesIO()
            square(image, side, fill).save(jpeg, format="JPEG", quality=95)
            meta = {"key": key, "caption": caption, "status": "success", "width": side, "height": side}
            for ext, data in (
                ("jpg", jpeg.getvalue()),
                ("txt", caption.encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    stats = {"count": len(images), "successes": len(images), "failed_to_download": 0, "failed_to_resize": 0}
    (folder / "00000000_stats.json").write_text(json.dumps(stats))
    return tar_path


def run_open_clip(tar: Path, transform, batch: int) -> int:
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(tar)]),
        wds.tarfile_to_samples(),
        wds.decode("pilrgb"),
        wds.to_tuple("jpg"),
        wds.map_tuple(transform),
        wds.batched(batch, partial=True),
    )
    return sum(len(images) for (images,) in pipeline)


def run_ours(tar: Path, augment: TrainAugment, batch: int, reduced: bool) -> int:
    def batches():
        crops = []
        for index, sample in enumerate(tar_samples(str(tar))):
            rng = random.Random(index)
            decoded = decode_for_crop(sample, augment, rng) if reduced else decode_uint8(sample)
            crops.append(augment.crop(decoded, rng))
            if len(crops) == batch:
                yield {"images": augment.collate(crops)}
                crops = []
        if crops:
            yield {"images": augment.collate(crops)}

    # The float batch the model takes, as a CPU rank makes it from the loader's uint8 one.
    return sum(len(b["images"]) for b in normalised_on_cpu(batches(), augment))


def run_pil_decode(jpegs: list[bytes]) -> int:
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    return len(jpegs)


def timed(fn: Callable[[], int]) -> float:
    """Samples per second of this thread's CPU time: per core, and unmoved by other processes' load on a
    shared machine (wall-clock time on one would count the time this process waits for a core)."""
    start = time.thread_time()
    num_samples = fn()
    return num_samples / (time.thread_time() - start)


def profile(
    tar_path: str, samples: list[dict], augment: TrainAugment, transform, batch: int
) -> dict[str, float]:
    """us per sample of each stage, one at a time over the same samples."""
    jpegs = [s["jpg"] for s in samples]
    out = {}

    def stage(name: str, fn: Callable[[], object]) -> object:
        fn()  # warm
        start = time.thread_time()
        result = fn()
        out[name] = (time.thread_time() - start) / len(samples) * 1e6
        return result

    pil = stage("decode: PIL, full", lambda: [Image.open(io.BytesIO(d)).convert("RGB") for d in jpegs])
    stage("decode: PIL draft, 1/2 scale", lambda: [_pil_draft(d) for d in jpegs])
    full = stage("decode: torchvision.io, full (ours before)", lambda: [decode_uint8(s) for s in samples])
    stage("decode: simplejpeg, full", lambda: [simplejpeg.decode_jpeg(d) for d in jpegs])
    stage("decode: simplejpeg, 1/2 scale", lambda: [_simplejpeg_half(d) for d in jpegs])
    sources = stage(
        "decode: decode_for_crop (ours)",
        lambda: [decode_for_crop(s, augment, random.Random(i)) for i, s in enumerate(samples)],
    )
    stage(
        "crop + resize from full (ours before)",
        lambda: [augment.crop(t, random.Random(i)) for i, t in enumerate(full)],
    )
    stage("crop + resize from decode_for_crop (ours)", lambda: [augment.crop(s, None) for s in sources])
    crops = [augment.crop(s, None) for s in sources]
    batches = stage(
        "collate (ours): stack uint8",
        lambda: [augment.collate(crops[i : i + batch]) for i in range(0, len(crops), batch)],
    )
    stage(
        "normalise on a CPU rank (ours): into a reused float batch",
        lambda: list(normalised_on_cpu(({"images": b} for b in batches), augment)),
    )
    stage(
        "  before: to float and normalise into a fresh batch",
        lambda: [augment.normalize(b) for b in batches],
    )
    # A fresh float batch is new memory each time (B x 600 KB at 224 px, beyond malloc's reuse), and the
    # kernel's first touch of each of its pages was most of collate's cost: this is that part alone.
    stage(
        "  of which: first touch of a fresh float batch",
        lambda: [
            torch.empty(len(crops[i : i + batch]), 3, *augment.size).fill_(0)
            for i in range(0, len(crops), batch)
        ],
    )
    stage("tar read (ours)", lambda: list(tar_samples(tar_path)))
    stage("open_clip train transform on the PIL image", lambda: [transform(im) for im in pil])
    return out


def _simplejpeg_half(data: bytes) -> np.ndarray:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return simplejpeg.decode_jpeg(data, min_height=-(-height // 2), min_width=-(-width // 2), min_factor=2)


def _pil_draft(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (image.width // 2, image.height // 2))
    image.load()
    return image


def fidelity(samples: list[dict], augment: TrainAugment) -> dict[str, float]:
    """The reduced-scale crops against the full-resolution ones: of the same box as realised on the
    reduced grid (what the reduced decode itself changes), and of the box as drawn (today's crop; its
    edges may lie up to r/2 stored pixels off the grid). For scale: our full path against PIL's resize of
    the same box (open_clip's way of resizing)."""
    num_reduced, same_box, drawn_box, pil_psnrs = 0, [], [], []
    for index, sample in enumerate(samples):
        rng = random.Random(index)
        source = decode_for_crop(sample, augment, rng)
        full_image = decode_uint8(sample)
        full = augment.crop(full_image, random.Random(index))
        top, left, h, w = source.box
        pil = TF.pil_to_tensor(
            TF.resized_crop(
                TF.to_pil_image(full_image), top, left, h, w, list(augment.size), InterpolationMode.BICUBIC
            )
        )
        pil_psnrs.append(_psnr(full, pil))
        if source.reduction > 1:
            num_reduced += 1
            r = source.reduction
            grid_box = Box(*(e * r for e in source.reduced_box()))  # in stored pixels
            crop = augment.crop(source, rng)
            same_box.append(_psnr(augment.crop(CropSource(full_image, grid_box, 1), None), crop))
            drawn_box.append(_psnr(full, crop))
    return {
        "reduced": num_reduced / len(samples),
        "same_box": statistics.mean(same_box) if same_box else math.inf,
        "same_box_min": min(same_box) if same_box else math.inf,
        "drawn_box": statistics.mean(drawn_box) if drawn_box else math.inf,
        "drawn_box_min": min(drawn_box) if drawn_box else math.inf,
        "pil": statistics.mean(pil_psnrs),
    }


def cpu_flags() -> str:
    """The instruction-set flags that decide which kernels run (as `lscpu` lists them)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set()
    if cpuinfo.is_file():
        line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="PNGs with .txt captions beside them")
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 512], help="stored JPEG sides")
    parser.add_argument("--output", type=int, default=224, help="the training crop's side")
    parser.add_argument("--num-images", type=int, default=256, help="per shard")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="a few images, one round: checks it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sides, args.output, args.num_images, args.batch, args.rounds = [128], 48, 6, 4, 1
    if not args.root.is_dir():
        parser.error(f"{args.root} not found; `apt-get install tuxpaint-stamps-default`, or pass --root")
    torch.set_num_threads(1)

    augment = TrainAugment(args.output, MEAN, STD)
    transform = open_clip.image_transform(args.output, is_train=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="clip-pipe-bench-decode-") as tmp:
        for set_name, photos in (("stamps", False), ("photos", True)):
            images = source_images(args.root, photos, args.num_images)
            for side in args.sides:
                tar = write_img2dataset_shard(Path(tmp) / f"{set_name}-{side}", images, side, fill=photos)
                samples = list(tar_samples(str(tar)))
                jpegs = [s["jpg"] for s in samples]
                label = f"{set_name}, {side} px ({len(samples)} JPEGs, {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB avg)"
                runs = {
                    "open_clip": partial(run_open_clip, tar, transform, args.batch),
                    "ours": partial(run_ours, tar, augment, args.batch, reduced=True),
                    "ours, full decode": partial(run_ours, tar, augment, args.batch, reduced=False),
                    "PIL decode alone": partial(run_pil_decode, jpegs),
                }
                for fn in runs.values():  # warm-up
                    fn()
                rates = {name: [] for name in runs}
                for _ in range(args.rounds):
                    for name, fn in runs.items():
                        rates[name].append(timed(fn))
                prof = profile(str(tar), samples, augment, transform, args.batch)
                fid = fidelity(samples, augment)
                print(f"\n{label}: profile, us per sample")
                for stage_name, us in prof.items():
                    print(f"  {stage_name:48s} {us:8.0f}")
                print(
                    f"  crops decoded at a reduced scale: {fid['reduced']:.0%}; PSNR of those against the full-resolution "
                    f"crop of the same grid box: mean {fid['same_box']:.1f} dB (min {fid['same_box_min']:.1f}); of the "
                    f"box as drawn (today's crop): mean {fid['drawn_box']:.1f} dB (min {fid['drawn_box_min']:.1f}); "
                    f"for scale, PIL's resize of the same box against ours: {fid['pil']:.1f} dB",
                    flush=True,
                )
                rows.append((label, rates, fid))

    def ratio(rates, a, b) -> str:
        r = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"

    print(
        f"\n## Decoded + augmented samples/s, one thread, {args.output}-px output, {args.rounds} interleaved rounds"
        f"\n{machine_description()} ({cpu_flags()}); ATen CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"{datetime.date.today()}; torch {torch.__version__}, simplejpeg {simplejpeg.__version__}\n"
    )
    print(
        "| shard | open_clip | ours | ours, full decode | PIL decode alone | ours / open_clip | ours / PIL decode "
        "| ours / ours full decode | reduced crops | PSNR same box / drawn box |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, rates, fid in rows:
        medians = " | ".join(f"{statistics.median(rates[name]):,.0f}" for name in rates)
        print(
            f"| {label} | {medians} | {ratio(rates, 'ours', 'open_clip')} | {ratio(rates, 'ours', 'PIL decode alone')} | "
            f"{ratio(rates, 'ours', 'ours, full decode')} | {fid['reduced']:.0%} | {fid['same_box']:.1f} / {fid['drawn_box']:.1f} dB |"
        )
    print(f"\nreduction policy ({jpeg_reduction.__name__}): {' '.join(jpeg_reduction.__doc__.split())}")


if __name__ == "__main__":
    main()
