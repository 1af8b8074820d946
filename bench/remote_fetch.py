"""Remote shards against local disk: how fast one loader slot reads shards through an HTTP server that
behaves like a cloud object store (30 ms before each answer, 20 MB/s per connection), for each
`data.num_fetches`, the verdict on its default.

The server (werkzeug, tests/remote_helpers.py) runs in its own process. One loader slot reads an epoch
of the shards as the elastic loader does, without decoding: `--streams` streams of the order, each
through its own `TarBlocks`, all on one `ShardReader` (one fetch budget), taking turns block by block.
The figure is MB/s of shard bytes. Runs alternate between the variants after a warm-up; the table gives
the median of each and its ratio to local disk (median and range of the per-round ratios).

    python -m bench.remote_fetch [--rounds 3 --shards 6 --shard-mb 16 --streams 2 --latency-ms 30 --mb-per-s 20]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine_description
from clip_pipe.data import ShardReader, list_shards
from tests.remote_helpers import epoch_blocks


def write_shards(folder: Path, num_shards: int, shard_mb: float) -> None:
    import json

    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    sample_bytes = 200_000
    num_samples = int(shard_mb * 1e6 / sample_bytes)
    sizes = {}
    for shard in range(num_shards):
        name = f"{shard:05d}.tar"
        with wds.TarWriter(str(folder / name), mtime=0) as writer:
            for i in range(num_samples):
                writer.write({"__key__": f"{shard:05d}{i:04d}", "jpg": os.urandom(sample_bytes), "txt": "x"})
        sizes[name] = num_samples
    (folder / "sizes.json").write_text(json.dumps(sizes))


def serve(root: str, latency_s: float, bytes_per_s: float, ports) -> None:
    from tests.remote_helpers import Faults, LoopbackServer, static_app

    server = LoopbackServer(
        static_app(Path(root)), Faults(latency_s=latency_s, bytes_per_s=bytes_per_s)
    ).start()
    ports.put(server.port)
    server.thread.join()


def read_all(shards, num_fetches, num_streams: int) -> tuple[int, float]:
    reader = ShardReader(num_fetches=num_fetches) if num_fetches != "local" else ShardReader()
    start = time.perf_counter()
    num_bytes = num_samples = 0
    for samples, num_lost in epoch_blocks(shards, reader, num_streams, block_size=64):
        assert num_lost == 0
        num_bytes += sum(len(s["jpg"]) + len(s["txt"]) for s in samples)
        num_samples += len(samples)
    seconds = time.perf_counter() - start
    assert num_samples == sum(s.num_samples for s in shards)
    reader.close()
    return num_bytes, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--shard-mb", type=float, default=16)
    parser.add_argument("--latency-ms", type=float, default=30)
    parser.add_argument("--mb-per-s", type=float, default=20)
    parser.add_argument("--streams", type=int, default=2, help="streams the slot reads at once")
    parser.add_argument("--fetches", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="data.num_fetches")
    args = parser.parse_args()
    variants = ["local", *args.fetches]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "www"
        write_shards(root / "laion", args.shards, args.shard_mb)
        ports = multiprocessing.get_context("spawn").Queue()
        server = multiprocessing.get_context("spawn").Process(
            target=serve, args=(str(root), args.latency_ms / 1000, args.mb_per_s * 1e6, ports), daemon=True
        )
        server.start()
        port = ports.get(timeout=60)
        local = list_shards([str(root / "laion")])
        remote = list_shards([f"http://127.0.0.1:{port}/laion/{{00000..{args.shards - 1:05d}}}.tar"])
        try:
            rates: dict = {v: [] for v in variants}
            read_all(local, "local", args.streams), read_all(remote, 8, args.streams)  # warm-up
            for _ in range(args.rounds):
                for variant in variants:
                    num_bytes, seconds = read_all(
                        local if variant == "local" else remote, variant, args.streams
                    )
                    rates[variant].append(num_bytes / seconds / 1e6)
                    print(f"  {variant!s:>6}: {rates[variant][-1]:8.1f} MB/s", flush=True)
        finally:
            server.kill()

    print(f"\n{machine_description()}, {time.strftime('%Y-%m-%d')}")
    print(
        f"{args.shards} shards of {args.shard_mb:g} MB; server: {args.latency_ms:g} ms before each answer, "
        f"{args.mb_per_s:g} MB/s per connection; one slot reading {args.streams} streams; {args.rounds} rounds\n"
    )
    print("| reader | MB/s (median) | vs local disk: median (min–max) |")
    print("|---|---|---|")
    for variant in variants:
        ratios = [r / base for r, base in zip(rates[variant], rates["local"], strict=True)]
        name = "local disk" if variant == "local" else f"HTTP, data.num_fetches={variant}"
        print(
            f"| {name} | {statistics.median(rates[variant]):.1f} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |"
        )


if __name__ == "__main__":
    main()
