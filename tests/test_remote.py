"""Remote shards through the loader, against real servers on loopback (moto's S3, a static HTTP server):
the same samples as from disk, fetched ahead within a bound, and every fault on purpose ends with an
exact sample count and no hang."""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import pytest

from clip_pipe.data import Retry, ShardReader, StoreUnreachable, TarError, list_shards
from clip_pipe.data.order import SourceOrder
from clip_pipe.data.stores import FsspecStore, HttpStore
from clip_pipe.data.tar import read_tar
from tests.remote_helpers import epoch_blocks, write_img2dataset_shards
from tests.remote_helpers import read_epoch as read_shards

SIZES = [30, 20, 25]
CHUNK = 16 * 1024  # a shard is 60-90 KiB: several chunks each


def image_24px(index, rng):
    """A JPEG of noise, so that shards span several chunks."""
    from PIL import Image

    pixels = bytes(rng.randrange(256) for _ in range(24 * 24 * 3))
    buffer = io.BytesIO()
    Image.frombytes("RGB", (24, 24), pixels).save(buffer, "JPEG", quality=95)
    return "jpg", buffer.getvalue(), f"noise {index}"


@pytest.fixture
def data(tmp_path) -> Path:
    return write_img2dataset_shards(tmp_path / "laion", SIZES, image=image_24px)


class Remote:
    """The shards on one server: their URLs, the server's faults and log, and how to change them."""

    def __init__(self, kind: str, data: Path, s3=None, http=None):
        self.kind, self.data = kind, data
        if kind == "s3":
            self.server, self.faults, self.prefix = s3.server, s3.faults, s3.upload(data, "laion")
            self._put = lambda name, raw: s3.client.put_object(
                Bucket=s3.bucket, Key=f"laion/{name}", Body=raw
            )
        else:
            shutil.copytree(data, http.root / "laion")
            self.server, self.faults, self.prefix = http.server, http.faults, http.url("laion/")
            self._put = lambda name, raw: (http.root / "laion" / name).write_bytes(raw)
        self.shards = list_shards([self.prefix + "{00000..00002}.tar"])
        self.faults.reset()

    def put(self, name: str, raw: bytes) -> None:
        self._put(name, raw)


def make_remote(request, kind: str, data: Path) -> Remote:
    if kind == "s3":
        return Remote("s3", data, s3=request.getfixturevalue("s3"))
    return Remote("http", data, http=request.getfixturevalue("http"))


@pytest.fixture(params=["s3", "http"])
def server_kind(request) -> str:
    return request.param


@pytest.fixture
def remote(request, server_kind, data):
    return make_remote(request, server_kind, data)


def all_keys() -> list[str]:
    return sorted(f"{s:05d}{i:04d}" for s, n in enumerate(SIZES) for i in range(n))


def reader(**kwargs) -> ShardReader:
    settings = {
        "num_fetches": 4,
        "chunk_bytes": CHUNK,
        "timeout_s": 1.0,
        "retry": Retry(6, base_s=0.05, max_s=0.5),
    }
    return ShardReader(**(settings | kwargs))


def read_epoch(remote: Remote, shard_reader: ShardReader, **kwargs) -> tuple[list[str], int]:
    """(the epoch's keys, sorted; the samples lost), read by one loader slot's streams (one by default)."""
    return read_shards(remote.shards, shard_reader, **kwargs)


def strip(samples) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in samples]


def test_remote_shards_read_as_from_disk(remote, data):
    shard_reader = reader()
    shard_reader.prefetch([s.url for s in remote.shards])
    for index, shard in enumerate(remote.shards):
        assert strip(shard_reader.samples(shard.url)) == strip(
            ShardReader().samples(str(data / f"{index:05d}.tar"))
        )
    ranges = [r.range for r in remote.faults.gets(".tar")]
    assert all(r and r.startswith("bytes=") for r in ranges) and len(ranges) > len(SIZES), ranges


def test_fetches_run_ahead_across_shards_within_the_bound(remote, monkeypatch):
    """With 0.1 s a request, the reader keeps `num_fetches` requests going, and never more: while
    nothing is taken, at most `num_fetches` chunks are fetched; while a shard is read (and decoded, here
    a sleep), the next one's first chunk arrives before it is opened."""
    remote.faults.latency_s = 0.1
    counter = InFlight()
    for store in (HttpStore, FsspecStore):  # counted where the requests are made: the server sees them late
        monkeypatch.setattr(store, "size", counter.wrap(store.size))
        monkeypatch.setattr(store, "read", counter.wrap(store.read))
    shard_reader = reader(num_fetches=3)
    shard_reader.prefetch([s.url for s in remote.shards])
    time.sleep(1.5)  # nothing read yet
    fetched = remote.faults.gets(".tar")
    assert len(fetched) == 3 and counter.max <= 3, fetched
    keys, opened = [], {}
    for shard in remote.shards:
        opened[Path(shard.url).name] = time.monotonic()
        for sample in shard_reader.samples(shard.url):
            keys.append(sample["__key__"])
            time.sleep(0.02)  # decoding: 5 samples a 16 KiB chunk, a chunk 0.1 s
    assert sorted(keys) == all_keys()
    assert counter.max == 3
    gets = remote.faults.gets(".tar")
    for name in list(opened)[1:]:
        first = min(r.end or float("inf") for r in gets if r.path.endswith(name))
        assert first < opened[name], f"{name}: no chunk of it arrived before it was opened"
    ranges = [(Path(r.path).name, r.range) for r in gets]
    assert len(ranges) == len(set(ranges)), "a chunk was fetched twice"


def test_a_slots_streams_each_fetch_their_next_shard_ahead(tmp_path, request, server_kind, monkeypatch):
    """Three streams in one loader slot, one fetcher and one budget (two requests a stream), against a
    server that takes 0.1 s a request: every stream's next shard arrives before that stream opens it
    (their plans do not cancel each other's), no chunk is fetched twice, and the budget holds."""
    sizes = [20] * 6  # three streams of two whole shards each: no shard is cut between two streams
    folder = write_img2dataset_shards(tmp_path / "laion", sizes, image=image_24px)
    remote = make_remote(request, server_kind, folder)
    remote.shards = list_shards([remote.prefix + "{00000..00005}.tar"])
    remote.faults.latency_s = 0.1
    counter = InFlight()
    for store in (HttpStore, FsspecStore):
        monkeypatch.setattr(store, "size", counter.wrap(store.size))
        monkeypatch.setattr(store, "read", counter.wrap(store.read))
    opened: dict[str, float] = {}
    real_samples = ShardReader.samples

    def samples(self, url, stream=None):
        opened[Path(url).name] = time.monotonic()
        yield from real_samples(self, url, stream)

    monkeypatch.setattr(ShardReader, "samples", samples)
    shard_reader = reader(num_fetches=6)
    keys, num_lost = [], 0
    for block, lost in epoch_blocks(remote.shards, shard_reader, num_streams=3, block_size=5):
        keys += [sample["__key__"] for sample in block]
        num_lost += lost
        time.sleep(0.02 * len(block))  # decoding
    assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s in range(6) for i in range(20)) and num_lost == 0

    order = SourceOrder(sizes, 3, 5, 0, 0)
    gets = remote.faults.gets(".tar")
    for stream in range(3):
        first, second = [f"{shard:05d}.tar" for shard, _, _ in order.stream_range(stream, 0)[0]]
        arrived = min(r.end or float("inf") for r in gets if r.path.endswith(second))
        assert arrived < opened[second], f"stream {stream}: {second} was not fetched ahead of its opening"
        assert opened[first] < opened[second]
    ranges = [(Path(r.path).name, r.range) for r in gets]
    assert len(ranges) == len(set(ranges)), "a chunk was fetched twice"
    assert counter.max <= 6 + 1  # the budget, and one chunk a blocked reader asks for out of turn


def test_the_loader_reads_remote_shards_as_it_reads_them_from_disk(remote, data):
    """The real loader (two streams, epochs one after another) over the server gives the batches it
    gives from local disk, sample for sample and pixel for pixel."""
    import itertools

    import torch
    from open_clip.tokenizer import SimpleTokenizer

    from clip_pipe.config import SourceConfig
    from clip_pipe.data import batch_loader, build_stream, list_sources
    from clip_pipe.data.augment import TrainAugment

    augment = TrainAugment(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    def batches(train: str, shard_reader=None):
        sources = list_sources([SourceConfig([train])])
        stream, _ = build_stream(
            sources, 6, augment, SimpleTokenizer(context_length=8), 0, 1, num_streams=2, seed=0,
            shuffle_buffer=10, reader=shard_reader,
        )  # fmt: skip
        return list(itertools.islice(iter(batch_loader(stream, 0)), 30))  # 180 samples: over two epochs

    local = batches(f"{data}/{{00000..00002}}.tar")
    served = batches(remote.prefix + "{00000..00002}.tar", reader())
    assert [b["keys"] for b in served] == [b["keys"] for b in local]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(served, local, strict=True))
    assert sum(b["num_skipped"] for b in served) == 0


class InFlight:
    def __init__(self):
        self.now = self.max = 0
        self.lock = threading.Lock()

    def wrap(self, method):
        def counted(*args, **kwargs):
            with self.lock:
                self.now += 1
                self.max = max(self.max, self.now)
            try:
                return method(*args, **kwargs)
            finally:
                with self.lock:
                    self.now -= 1

        return counted


def test_404_for_one_shard_and_500_twice_for_another(remote):
    remote.faults.set("laion/00001.tar", status=404, get_only=False)
    remote.faults.set("laion/00002.tar", status=500, times=2, get_only=False)
    keys, num_lost = read_epoch(remote, reader())
    assert keys == [k for k in all_keys() if not k.startswith("00001")]
    assert num_lost == SIZES[1]  # lost, and counted as a corrupt tar's samples are
    statuses = [r.status for r in remote.faults.log if r.path.endswith("00002.tar")]
    assert statuses[:2] == [500, 500] and set(statuses[2:]) <= {200, 206}, statuses


def test_a_shard_truncated_on_the_server(remote, data):
    raw = (data / "00001.tar").read_bytes()
    cut = raw[: len(raw) // 2 + 100]  # mid-sample
    remote.put("00001.tar", cut)
    survivors = []
    with pytest.raises(TarError):
        survivors.extend(s["__key__"] for s in read_tar(io.BytesIO(cut), "cut", len(cut)))
    assert 0 < len(survivors) < SIZES[1]
    keys, num_lost = read_epoch(remote, reader())
    assert keys == sorted([k for k in all_keys() if not k.startswith("00001")] + survivors)
    assert num_lost == SIZES[1] - len(survivors)


def test_a_body_cut_off_is_read_again_as_a_range(remote):
    remote.faults.set("laion/00000.tar", cut_after=5000, times=1)
    keys, num_lost = read_epoch(remote, reader())
    assert keys == all_keys() and num_lost == 0
    ranges = [r.range for r in remote.faults.gets("00000.tar")]
    repeated = [r for r in set(ranges) if ranges.count(r) == 2]
    assert len(repeated) == 1 and len(ranges) == len(set(ranges)) + 1, ranges  # one chunk, not the shard


def test_a_server_that_stalls_mid_body(remote):
    """Once: the read times out and the chunk is fetched again. Always: the shard is lost, and counted,
    after the retries; either way the epoch ends."""
    remote.faults.set("laion/00000.tar", stall_after=5000, times=1)
    keys, num_lost = read_epoch(remote, reader())
    assert keys == all_keys() and num_lost == 0

    remote.faults.set("laion/00002.tar", stall_after=5000)
    start = time.monotonic()
    keys, num_lost = read_epoch(remote, reader(retry=Retry(2, base_s=0.05)))
    assert keys == [k for k in all_keys() if not k.startswith("00002")] and num_lost == SIZES[2]
    assert time.monotonic() - start < 30


def test_server_killed_mid_epoch_and_restarted(remote):
    remote.faults.latency_s = 0.05
    shard_reader = reader(num_fetches=2, retry=Retry(12, base_s=0.1, max_s=0.5))
    keys, num_lost = [], 0
    restarted = threading.Event()

    def restart():
        time.sleep(1.5)
        remote.server.start()
        restarted.set()

    for samples, lost in epoch_blocks(remote.shards, shard_reader, block_size=5):
        keys += [sample["__key__"] for sample in samples]
        num_lost += lost
        if len(keys) == 10:
            remote.server.stop()  # cuts the connections under way too
            threading.Thread(target=restart, daemon=True).start()
    assert restarted.is_set(), "the epoch ended before the server came back: nothing was read after the kill"
    assert sorted(keys) == all_keys() and len(keys) == len(set(keys)) and num_lost == 0


def test_a_reader_in_a_loader_worker_process(remote):
    """DataLoader workers get the reader pickled, without threads; each starts its own."""
    import pickle

    shard_reader = reader()
    shard_reader.prefetch([remote.shards[0].url])  # threads started here...
    clone = pickle.loads(pickle.dumps(shard_reader))  # ...but not carried over
    assert clone._fetcher is None
    keys, num_lost = read_epoch(remote, clone)
    assert keys == all_keys() and num_lost == 0


def test_a_store_that_stays_down_stops_the_loader(remote):
    """Each shard's retries run out, one after another: after three in a row the loader stops the run
    (resumable) rather than losing every shard of the epoch, a retry schedule each."""
    remote.server.stop()
    start = time.monotonic()
    with pytest.raises(StoreUnreachable, match="3 shards in a row could not be fetched"):
        read_epoch(remote, reader(retry=Retry(2, base_s=0.05)))
    assert time.monotonic() - start < 30


def test_what_failed_while_fetched_ahead_is_fetched_again_when_read(remote):
    """Heads and chunks fetched ahead during an outage (here, short retries) that is over by the time
    their shard is read are fetched again, not lost."""
    shard_reader = reader(retry=Retry(1, base_s=0.01))
    urls = [s.url for s in remote.shards]
    remote.server.stop()
    shard_reader.prefetch(urls)  # every head fails
    time.sleep(1.0)
    remote.server.start()
    first = sorted(s["__key__"] for s in shard_reader.samples(urls[0]))
    assert first == [k for k in all_keys() if k.startswith("00000")]

    remote.faults.reset()
    remote.faults.set(".tar", status=503)  # GETs fail, HEADs pass: the chunks fetched ahead fail
    shard_reader = reader(retry=Retry(1, base_s=0.01))
    shard_reader.prefetch(urls)
    deadline = time.monotonic() + 10
    while len(remote.faults.gets(".tar")) < 2 * 4 and time.monotonic() < deadline:  # 4 chunks, 2 tries each
        time.sleep(0.05)
    time.sleep(0.3)
    assert {r.status for r in remote.faults.gets(".tar")} == {503}
    remote.faults.rules.clear()
    keys = sorted(s["__key__"] for url in urls for s in shard_reader.samples(url))
    assert keys == all_keys()
