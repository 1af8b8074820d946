"""Remote training throughput: the whole loader (tar read, JPEG decode, crop to 224 px, tokenize, batch)
reading the same shards from local disk and from object stores that behave like a cloud's, against
open_clip_train's WebDataset pipeline through the same store, at the same number of loader workers.

The shards are img2dataset's layout (`00000.tar` holding K.jpg, K.txt, K.json, with `00000_stats.json`
beside it, no sizes.json), of real images: the Tux Paint stamps (Debian tuxpaint-stamps-default, GPL-2:
written to a temporary folder, never kept) fitted into squares of 256 to 512 px (a side drawn per
image) and saved as JPEG quality 95, as bench/decode.py builds them. `--smoke` uses generated images.

The stores, each a werkzeug server in a process of its own (so that its work does not share our GIL),
from tests/remote_helpers.py:
- HTTP: a static file server answering Range requests;
- S3: moto's server (the S3 API that s3fs's own tests use), the shards uploaded to a bucket.
Both sit behind `Faults(latency_s, bytes_per_s)`, the middleware in the server's process that waits
`--latency-ms` (30) before every answer and sends each response body at no more than `--mb-per-s` (20)
MB/s, as a cloud object store serves one connection. It throttles every client alike, curl included:
it is the "proxy", inside the server rather than a separate TCP hop.

Variants, each with `--workers` loader processes and batches of `--batch`:
- ours: `build_stream` + `batch_loader` as clip_pipe/train.py uses them (ShardReader with
  `--num-fetches` ranged requests in flight per worker), from local disk, HTTP and S3;
- open_clip: open_clip_train's own `get_wds_dataset` (resampled shards, webdataset tar reader,
  shuffle, PIL decode, `image_transform_v2(is_train=True)` per sample, one caption tokenized at a
  time, batched per worker), from local disk and through HTTP with `pipe:curl -s -L URL`;
- MosaicML Streaming, if it imports (`pip install --target DIR --no-deps mosaicml-streaming xxhash zstd
  python-snappy brotli cramjam catalogue`, then `MOSAIC_STREAMING=DIR`; its own dependencies ask for
  transformers<5 and an older numpy, so it does not go into our venv): the shards converted to MDS
  (timed apart), uploaded to the same S3 server and read through the throttle by a `StreamingDataset`
  into a fresh local cache each run, decoded and transformed as open_clip does.

Each run builds its loader afresh (workers, listing, first fetches), takes `--warmup` batches, then
times `--batches` more: steady-state samples/s, the figure the goals are judged on. Beside it, the
whole run's samples/s (from building the loader to the last timed batch: listing, worker start, the
first fetches and, for Mosaic, its first whole-shard downloads) and the time to the first batch; and
for ours the samples stood in for (any would mean the remote reads lost data, and spoil the figure).
The store's servers share this machine's cores with the loaders (a cloud store's CPU is not yours), so
the table also gives the CPU they used, in cores, over each run.
Rounds alternate between the variants after a warm-up run of each; the table gives the median of each
and the medians of the per-round ratios with their range.

    python -m bench.remote_loader [--rounds 3 --shards 12 --per-shard 200 --workers 2 --batch 64]
    python -m bench.remote_loader --smoke
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from bench.common import machine_description, normalised_on_cpu
from bench.decode import DEFAULT_ROOT, source_images, square
from clip_pipe.config import SourceConfig
from clip_pipe.data import ShardReader, batch_loader, build_stream, list_sources
from clip_pipe.data.augment import TrainAugment
from tests.remote_helpers import S3_ENV, upload, write_img2dataset_shards

MODEL = "ViT-B-32"  # its 224 px transform and tokenizer
BUCKET = "bench"


# ------------------------------------------------------------------------------------------ the data


def write_shards(
    folder: Path, root: Path | None, num_shards: int, per_shard: int, sides: tuple[int, int]
) -> None:
    """img2dataset-layout shards of JPEGs of `root`'s stamps (None: generated images), sides in `sides`."""
    num_samples = num_shards * per_shard
    if root is not None:
        images = source_images(root, photos=False, num_images=num_samples)
    else:  # smooth random colour fields: JPEG sizes like photos', with no data files needed
        rng = np.random.default_rng(0)
        images = [
            (Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC),
             f"generated image {i}")
            for i in range(min(num_samples, 64))
        ]  # fmt: skip

    def image(index: int, rng: random.Random) -> tuple[str, bytes, str]:
        picture, caption = images[index % len(images)]
        buffer = io.BytesIO()
        square(picture, rng.randint(*sides), fill=False).save(buffer, format="JPEG", quality=95)
        return "jpg", buffer.getvalue(), caption

    write_img2dataset_shards(folder, [per_shard] * num_shards, image=image)


# --------------------------------------------------------------------------------------- the servers


def serve(kind: str, root: str, latency_s: float, bytes_per_s: float, ports) -> None:
    """A static HTTP server of `root`, or moto's S3 server, behind the throttle, until killed."""
    from tests.remote_helpers import Faults, LoopbackServer, _moto_handler, moto_app, static_app

    faults = Faults(latency_s=latency_s, bytes_per_s=bytes_per_s)
    if kind == "http":
        server = LoopbackServer(static_app(Path(root)), faults).start()
    else:
        server = LoopbackServer(moto_app(), faults, handler=_moto_handler()).start()
    ports.put(server.port)
    server.thread.join()


def start_server(kind: str, root: Path, latency_s: float, bytes_per_s: float):
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    process = context.Process(
        target=serve, args=(kind, str(root), latency_s, bytes_per_s, ports), daemon=True
    )
    process.start()
    return process, ports.get(timeout=120)


# --------------------------------------------------------------------------------------- the loaders


@dataclass
class Run:
    steady: float
    """samples/s over the timed batches, after the warm-up ones"""
    whole: float
    """samples/s from building the loader to the last timed batch (listing, workers, first fetches)"""
    first_s: float
    """seconds from building the loader to its first batch"""
    num_skipped: int = 0
    """ours: samples stood in for (unreadable, or lost with their shard); nonzero spoils the comparison"""
    wall_s: float = 0.0
    """seconds from building the loader to the last timed batch"""
    store_cores: float = 0.0
    """CPU the store's server processes used over the run, in cores (they share this machine's)"""


def timed_batches(batches, warmup: int, num_batches: int, start: float) -> Run:
    first = next(batches)
    first_s = time.perf_counter() - start
    ours = isinstance(first, dict)
    num_skipped = first["num_skipped"] if ours else 0
    for _ in range(warmup - 1):
        batch = next(batches)
        num_skipped += batch["num_skipped"] if ours else 0
    t0, num_samples = time.perf_counter(), 0
    for _ in range(num_batches):
        batch = next(batches)
        num_samples += len(batch["images"] if ours else batch[0])
        num_skipped += batch["num_skipped"] if ours else 0
    end = time.perf_counter()
    whole = (num_samples / num_batches) * (warmup + num_batches) / (end - start)
    return Run(num_samples / (end - t0), whole, first_s, num_skipped, end - start)


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (Linux's /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        if stat.is_file():
            fields = stat.read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def end_workers(loader: torch.utils.data.DataLoader) -> None:
    """End a loader's worker processes now (persistent ones live as long as the loader), so that the
    next variant has the cores to itself."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def run_ours(spec: str, args, augment: TrainAugment, tokenizer, seed: int, warmup: int, num_batches: int):
    start = time.perf_counter()
    sources = list_sources([SourceConfig([spec])])
    stream, _ = build_stream(
        sources, args.batch, augment, tokenizer, 0, 1, num_streams=0, seed=seed, shuffle_buffer=1000,
        reader=ShardReader(num_fetches=args.num_fetches),
    )  # fmt: skip
    loader = batch_loader(stream, args.workers)
    try:  # uint8 batches, normalised here as a CPU rank does; open_clip's come normalised by its workers
        return timed_batches(normalised_on_cpu(loader, augment), warmup, num_batches, start)
    finally:
        end_workers(loader.pieces)


_patched = False


def run_open_clip(spec: str, args, preprocess, tokenizer, seed: int, warmup: int, num_batches: int):
    import open_clip_train.data as oc_data

    global _patched
    if not _patched:
        # webdataset 1.x yields an end-of-shard marker {} that open_clip_train's grouping chokes on
        # (KeyError 'fname'); dropping the markers first changes nothing else (as bench/loader.py).
        group_by_keys = oc_data.group_by_keys_nothrow
        oc_data.group_by_keys_nothrow = lambda data, *a, **k: group_by_keys((s for s in data if s), *a, **k)
        _patched = True
    start = time.perf_counter()
    oc_args = Namespace(
        train_data=spec, val_data=None, dataset_resampled=True, train_num_samples=10**9,
        train_data_upsampling_factors=None, seed=seed, batch_size=args.batch, workers=args.workers, world_size=1,
    )  # fmt: skip
    loader = oc_data.get_wds_dataset(oc_args, preprocess, is_train=True, tokenizer=tokenizer).dataloader
    try:
        return timed_batches(iter(loader), warmup, num_batches, start)
    finally:
        end_workers(loader.pipeline[0])  # the WebLoader's DataLoader


def import_mosaic():
    """MosaicML Streaming, from `MOSAIC_STREAMING` (a --target folder) or the venv; None if absent."""
    folder = os.environ.get("MOSAIC_STREAMING")
    if folder and folder not in sys.path:
        sys.path.append(folder)  # after ours: its folder holds only it and its small dependencies
    try:
        import streaming
    except ImportError:
        return None
    return streaming


def convert_to_mds(streaming, shards: Path, out: Path) -> int:
    """Our tars -> MDS (jpg bytes, txt str) under `out`, Mosaic's default shard size; its sample count."""
    from clip_pipe.data import tar_samples

    num_samples = 0
    with streaming.MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}) as writer:
        for tar in sorted(shards.glob("*.tar")):
            for sample in tar_samples(str(tar)):
                writer.write({"jpg": sample["jpg"], "txt": sample["txt"].decode()})
                num_samples += 1
    return num_samples


def run_mosaic(streaming, remote: str, args, preprocess, tokenizer, seed, warmup, num_batches, cache: Path):
    class Decoded(streaming.StreamingDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            image = preprocess(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
            return image, tokenizer(sample["txt"])[0]

    start = time.perf_counter()
    streaming.base.util.clean_stale_shared_memory()
    dataset = Decoded(remote=remote, local=str(cache), shuffle=True, shuffle_seed=seed, batch_size=args.batch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers)
    try:
        return timed_batches(iter(loader), warmup, num_batches, start)
    finally:
        end_workers(loader)


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="PNGs with .txt captions beside them")
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--per-shard", type=int, default=200, help="samples per shard")
    parser.add_argument(
        "--sides", type=int, nargs=2, default=[256, 512], help="JPEG sides, smallest and largest"
    )
    parser.add_argument("--workers", type=int, default=2, help="loader processes, for every tool")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=6, help="batches before timing (shuffle buffers fill)")
    parser.add_argument("--batches", type=int, default=24, help="timed batches per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=30)
    parser.add_argument("--mb-per-s", type=float, default=20, help="per connection")
    parser.add_argument("--num-fetches", type=int, default=8, help="ours: data.num_fetches")
    parser.add_argument("--only", nargs="+", help="run the variants whose names contain one of these")
    parser.add_argument("--smoke", action="store_true", help="generated images, tiny sizes: checks it runs")
    args = parser.parse_args(argv)
    root = None if args.smoke else args.root
    if args.smoke:
        args.shards, args.per_shard, args.sides, args.batch = 2, 24, [64, 96], 8
        args.warmup, args.batches, args.rounds, args.workers = 1, 2, 1, min(args.workers, 2)
    elif not args.root.is_dir():
        parser.error(f"{args.root} not found; `apt-get install tuxpaint-stamps-default`, or pass --root")
    torch.set_num_threads(1)
    os.environ.update(S3_ENV)

    pp = PreprocessCfg(size=224)  # ViT-B-32's: OpenAI's mean and std, bicubic
    augment, preprocess = TrainAugment.from_preprocess_cfg(pp), image_transform_v2(pp, is_train=True)
    tokenizer = open_clip.get_tokenizer(MODEL)
    streaming = import_mosaic()

    with tempfile.TemporaryDirectory(prefix="clip-pipe-bench-remote-") as tmp:
        www = Path(tmp) / "www"
        shards = www / "shards"
        write_shards(shards, root, args.shards, args.per_shard, tuple(args.sides))
        tar_bytes = [p.stat().st_size for p in shards.glob("*.tar")]
        num_jpegs = args.shards * args.per_shard
        latency_s, bytes_per_s = args.latency_ms / 1000, args.mb_per_s * 1e6
        http, http_port = start_server("http", www, latency_s, bytes_per_s)
        s3, s3_port = start_server("s3", www, latency_s, bytes_per_s)
        servers = [http, s3]
        try:
            import boto3

            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{s3_port}"
            client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
            client.create_bucket(Bucket=BUCKET)
            upload(client, BUCKET, shards, "shards")

            last = f"{args.shards - 1:05d}"
            http_url = f"http://127.0.0.1:{http_port}/shards/{{00000..{last}}}.tar"
            variants = {
                "ours, local disk": lambda s, w, n: run_ours(str(shards), args, augment, tokenizer, s, w, n),
                "ours, HTTP": lambda s, w, n: run_ours(http_url, args, augment, tokenizer, s, w, n),
                "ours, S3": lambda s, w, n: run_ours(
                    f"s3://{BUCKET}/shards/{{00000..{last}}}.tar", args, augment, tokenizer, s, w, n
                ),
                "open_clip, local disk": lambda s, w, n: run_open_clip(
                    f"{shards}/{{00000..{last}}}.tar", args, preprocess, tokenizer, s, w, n
                ),
                "open_clip, HTTP (pipe:curl)": lambda s, w, n: run_open_clip(
                    f"pipe:curl -s -L {http_url}", args, preprocess, tokenizer, s, w, n
                ),
            }
            conversion = None
            if streaming is not None and (not args.only or any(o in "MosaicML" for o in args.only)):
                os.environ["S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]  # where Mosaic looks
                start = time.perf_counter()
                num_converted = convert_to_mds(streaming, shards, Path(tmp) / "mds")
                convert_s = time.perf_counter() - start
                start = time.perf_counter()
                upload(client, BUCKET, Path(tmp) / "mds", "mds")
                conversion = (num_converted, convert_s, time.perf_counter() - start)
                caches = (Path(tmp) / f"mosaic-cache-{i}" for i in range(10**6))
                variants["MosaicML Streaming, S3 (MDS)"] = lambda s, w, n: run_mosaic(
                    streaming, f"s3://{BUCKET}/mds", args, preprocess, tokenizer, s, w, n, next(caches)
                )

            if args.only:
                variants = {k: v for k, v in variants.items() if any(o in k for o in args.only)}
            runs: dict[str, list[Run]] = {name: [] for name in variants}
            for run in variants.values():  # warm-up: imports, page cache, the servers' first answers
                run(100, 1, 1)
            for round_index in range(args.rounds):
                for name, run in variants.items():
                    store_cpu = cpu_s([http.pid, s3.pid])
                    runs[name].append(result := run(round_index, args.warmup, args.batches))
                    result.store_cores = (cpu_s([http.pid, s3.pid]) - store_cpu) / result.wall_s
                    print(
                        f"round {round_index} {name}: {result.steady:.0f} samples/s steady, {result.whole:.0f} "
                        f"whole run, first batch {result.first_s:.2f} s, {result.num_skipped} skipped, store "
                        f"{result.store_cores:.2f} cores",
                        flush=True,
                    )
        finally:
            for server in servers:
                server.kill()
                server.join()

    print(
        f"\n{machine_description()}, {time.strftime('%Y-%m-%d %H:%M')}, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"
    )
    print(
        f"{args.shards} shards x {args.per_shard} JPEGs ({args.sides[0]}-{args.sides[1]} px, quality 95, "
        f"{sum(tar_bytes) / num_jpegs / 1000:.0f} kB a sample, {statistics.mean(tar_bytes) / 1e6:.1f} MB a shard); "
        f"stores: {args.latency_ms:g} ms before each answer, {args.mb_per_s:g} MB/s per connection; "
        f"{args.workers} loader workers each, batch {args.batch}, {MODEL}'s 224 px train transform; "
        f"ours with data.num_fetches={args.num_fetches}; {args.warmup} warm-up + {args.batches} timed batches "
        f"a run, {args.rounds} rounds"
    )
    if conversion is not None:
        num_converted, convert_s, upload_s = conversion
        print(
            f"MosaicML Streaming {streaming.__version__}: conversion of the {num_converted} samples to MDS "
            f"{convert_s:.1f} s, upload to S3 {upload_s:.1f} s (not in the rates)"
        )
    elif streaming is None:
        print(
            "MosaicML Streaming not found (set MOSAIC_STREAMING to its --target folder); its row is left out"
        )
    rates = {name: [r.steady for r in results] for name, results in runs.items()}
    base = "ours, local disk" if "ours, local disk" in rates else next(iter(rates))
    wholes = {name: [r.whole for r in results] for name, results in runs.items()}
    print(
        f"\n| loader | samples/s, steady (median) | vs {base}: median (min–max) | samples/s, whole run "
        "(median) | first batch, s (median) | store's CPU, cores (median) | samples skipped |"
    )
    print("|---|---|---|---|---|---|---|")

    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(rates[a], rates[b], strict=True)]

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    for name in rates:
        print(
            f"| {name} | {statistics.median(rates[name]):.0f} | {spread(ratios(name, base))} | "
            f"{statistics.median(wholes[name]):.0f} | {statistics.median(r.first_s for r in runs[name]):.2f} | "
            f"{statistics.median(r.store_cores for r in runs[name]):.2f} | "
            f"{sum(r.num_skipped for r in runs[name]) if name.startswith('ours') else '—'} |"
        )
    print("\n| goal | ratio: median (min–max) | verdict |")
    print("|---|---|---|")
    for label, a, b, goal in (
        ("ours HTTP / ours local ≥ 0.9", "ours, HTTP", "ours, local disk", 0.9),
        ("ours S3 / ours local ≥ 0.9", "ours, S3", "ours, local disk", 0.9),
        ("ours HTTP / open_clip HTTP ≥ 4", "ours, HTTP", "open_clip, HTTP (pipe:curl)", 4.0),
        ("(open_clip HTTP / open_clip local)", "open_clip, HTTP (pipe:curl)", "open_clip, local disk", None),
        ("(ours local / open_clip local)", "ours, local disk", "open_clip, local disk", None),
    ):
        if a not in rates or b not in rates:
            continue
        values = ratios(a, b)
        verdict = "—" if goal is None else ("met" if statistics.median(values) >= goal else "not met")
        print(f"| {label} | {spread(values)} | {verdict} |")


if __name__ == "__main__":
    main()
