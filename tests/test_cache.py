"""The local shard cache: no thrashing under a limit smaller than the data, keys that cannot collide,
atomic writes, other data evicted first, and processes sharing it through the file system alone."""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_pipe.data import Retry, ShardCache, ShardReader, TarError, list_shards
from clip_pipe.data.cache import cache_key
from tests.remote_helpers import read_epoch, write_img2dataset_shards

SIZES = [12, 10, 14, 11, 13, 9]


def noise(index, rng):
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (24, 24), bytes(rng.randrange(256) for _ in range(24 * 24 * 3))).save(
        buffer, "JPEG"
    )
    return "jpg", buffer.getvalue(), f"noise {index}"


@pytest.fixture
def served(tmp_path, http):
    folder = write_img2dataset_shards(http.root / "laion", SIZES, image=noise)
    shards = list_shards([http.url("laion/{00000..00005}.tar")])
    http.faults.reset()
    return http, folder, shards


def cached_reader(cache: ShardCache) -> ShardReader:
    return ShardReader(cache, num_fetches=3, chunk_bytes=8192, timeout_s=2.0, retry=Retry(3, base_s=0.05))


def fetched_shards(http) -> set[str]:
    return {Path(r.path).name for r in http.faults.gets(".tar")}


def test_a_cyclic_scan_larger_than_the_limit_does_not_thrash(served, tmp_path):
    """Each epoch reads every shard once, in a new order. LRU would evict each shard just before its
    next use and never hit; here the first shards cached stay, and every epoch hits them."""
    http, folder, shards = served
    sizes = {p.name: p.stat().st_size for p in folder.glob("*.tar")}
    limit = int(2.5 * max(sizes.values()))  # room for two shards, not three
    cache = ShardCache(tmp_path / "cache", limit, [s.url for s in shards])
    reader = cached_reader(cache)
    cached_after = []
    for epoch in range(3):
        http.faults.reset()
        keys, num_lost = read_epoch(shards, reader, epoch=epoch)
        assert keys == sorted(f"{s:05d}{i:04d}" for s, n in enumerate(SIZES) for i in range(n))
        assert num_lost == 0
        cached = {p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "shards").iterdir()}
        assert sum(sizes[name] for name in cached) <= limit and 2 <= len(cached) < len(SIZES)
        assert not list((tmp_path / "cache" / "tmp").iterdir())
        cached_after.append(cached)
        if epoch == 0:
            assert fetched_shards(http) == set(sizes)
        else:  # the same shards, served from disk; the others stream past uncached
            assert fetched_shards(http) == set(sizes) - cached
    assert cached_after[0] == cached_after[1] == cached_after[2]


def test_keys_cannot_collide(tmp_path, http):
    """a/00000.tar and b/00000.tar are two entries (webdataset's cache keys by basename: #471)."""
    write_img2dataset_shards(http.root / "a", [5], seed=1)
    write_img2dataset_shards(http.root / "b", [7], seed=2)
    urls = [http.url("a/00000.tar"), http.url("b/00000.tar")]
    assert cache_key(urls[0]) != cache_key(urls[1])
    cache = ShardCache(tmp_path / "cache", None, urls)
    reader = cached_reader(cache)
    first = [[s["txt"] for s in reader.samples(url)] for url in urls]
    http.server.stop()  # from here on, only the cache can answer
    again = [[s["txt"] for s in reader.samples(url)] for url in urls]
    assert again == first and [len(x) for x in again] == [5, 7]


def test_writes_are_atomic_and_damage_is_dropped(served, tmp_path):
    http, folder, shards = served
    cache = ShardCache(tmp_path / "cache", None, [s.url for s in shards])
    reader = cached_reader(cache)
    # A read abandoned part-way (the run ends, the worker is stopped) leaves nothing behind.
    samples = reader.samples(shards[0].url)
    next(samples), next(samples)
    assert list((tmp_path / "cache" / "tmp").iterdir())  # being written...
    samples.close()
    assert not list((tmp_path / "cache" / "tmp").iterdir()) and not cache.has(shards[0].url)
    # Read to its end, it is cached, and byte for byte the shard.
    assert len(list(reader.samples(shards[0].url))) == SIZES[0]
    assert cache.path(shards[0].url).read_bytes() == (folder / "00000.tar").read_bytes()
    # A damaged copy costs that read (counted by the stream) and is dropped; the next read fetches it.
    path = cache.path(shards[0].url)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(TarError):
        list(reader.samples(shards[0].url))
    assert not cache.has(shards[0].url)
    http.faults.reset()
    assert len(list(reader.samples(shards[0].url))) == SIZES[0] and fetched_shards(http) == {"00000.tar"}


def test_a_dead_writers_part_file_is_reclaimed(served, tmp_path):
    _, folder, shards = served
    size = (folder / "00000.tar").stat().st_size
    cache = ShardCache(tmp_path / "cache", int(1.5 * size), [s.url for s in shards])
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = os.uname().nodename
    stale = tmp_path / "cache" / "tmp" / f"{size}~{host}~{int(dead.stdout)}~0~{cache_key(shards[1].url)}.part"
    live = tmp_path / "cache" / "tmp" / f"{size}~{host}~{os.getpid()}~0~{cache_key(shards[2].url)}.part"
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"x" * 100)
    # The live writer's reservation leaves no room...
    assert cache.writer(shards[0].url, size) is None and stale.exists() is False
    live.unlink()
    # ...and once it is gone, there is.
    writer = cache.writer(shards[0].url, size)
    assert writer is not None
    writer.abort()


def test_other_data_is_evicted_least_recently_used_first(served, tmp_path):
    _, folder, shards = served
    size = max(p.stat().st_size for p in folder.glob("*.tar"))
    cache = ShardCache(tmp_path / "cache", 4 * size, [s.url for s in shards])
    old = []
    for age in range(4):  # an earlier run's data: the oldest used longest ago
        path = cache.path(f"s3://elsewhere/{age:05d}.tar")
        path.write_bytes(b"\0" * size)
        os.utime(path, (time.time() - 1000 * (4 - age),) * 2)
        old.append(path)
    reader = cached_reader(cache)
    for shard in shards[:2]:
        assert len(list(reader.samples(shard.url))) == shard.num_samples
    assert [p.exists() for p in old] == [False, False, True, True]
    assert cache.has(shards[0].url) and cache.has(shards[1].url)


def _read_through_cache(cache_dir: str, limit: int, urls: list[str], mine: list[str]) -> int:
    cache = ShardCache(cache_dir, limit, urls)
    reader = ShardReader(cache, num_fetches=2, chunk_bytes=8192, timeout_s=5.0)
    return sum(1 for url in mine for _ in reader.samples(url))


@pytest.mark.slow  # spawned processes import torch
def test_processes_share_one_cache_within_its_limit(served, tmp_path):
    """Ranks and loader workers of a node share the folder with no shared memory: what they admit
    together stays within the limit, and every copy is whole."""
    _, folder, shards = served
    urls = [s.url for s in shards]
    limit = int(3.5 * max(p.stat().st_size for p in folder.glob("*.tar")))
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        args = [(str(tmp_path / "cache"), limit, urls, urls[i::2]) for i in range(2)]
        assert sum(pool.starmap(_read_through_cache, args)) == sum(SIZES)
    entries = list((tmp_path / "cache" / "shards").iterdir())
    assert 1 <= len(entries) < len(SIZES) and sum(p.stat().st_size for p in entries) <= limit
    for entry in entries:
        name = entry.name.split("-", 1)[1]
        assert entry.read_bytes() == (folder / name).read_bytes()
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    shutil.rmtree(tmp_path / "cache")


def test_cache_options_are_checked_in_the_config(tmp_path):
    from clip_pipe.config import DataConfig
    from clip_pipe.data import shard_reader

    assert DataConfig(cache_dir="c", cache_limit="1.5GiB").cache_limit_bytes == int(1.5 * 2**30)
    assert DataConfig(cache_dir="c", cache_limit="500GB").cache_limit_bytes == 500 * 10**9
    assert DataConfig(cache_dir="c", cache_limit="123456").cache_limit_bytes == 123456
    with pytest.raises(ValueError, match="not a size"):
        DataConfig(cache_dir="c", cache_limit="lots")
    with pytest.raises(ValueError, match=r"data\.cache_limit needs data\.cache_dir"):
        DataConfig(cache_limit="1GB")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot create it"):
        shard_reader(DataConfig(cache_dir=str(tmp_path / "file" / "cache")), [])
    reader = shard_reader(DataConfig(cache_dir=str(tmp_path / "c"), cache_limit="2MB", num_fetches=3), [])
    assert reader.cache.limit_bytes == 2 * 10**6 and reader.num_fetches == 3
