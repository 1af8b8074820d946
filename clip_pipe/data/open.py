"""Shard URL -> samples: the one place a training shard is opened, wherever it lives.

    /local/path.tar, file://...   read from disk
    s3://, gs://, any fsspec URL  fsspec (s3fs for S3: AWS environment variables, config files, AWS_ENDPOINT_URL)
    http://, https://             httpx, with Range requests
    pipe:COMMAND                  the command's standard output (webdataset's and open_clip's `pipe:aws s3 cp ... -`)

Remote shards are fetched ahead in byte ranges (fetch.py), every request retried as retry.py says,
through the stores of stores.py. A slot's streams each name the shards they read next
(`ShardReader.prefetch(urls, stream)`), and the slot's one fetcher shares its budget among them. A
permanent failure (404, 403, a shard that changed while read) or retries run out raise
`ShardUnavailable`, an `OSError`: the stream counts that shard's samples as lost, as it does for a
corrupt tar, and goes on.

`ShardReader` is per loader slot: create it (or unpickle it) in the process that reads; its threads
start on first use.
"""

from __future__ import annotations

import io
import os
import select
import subprocess
import weakref
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO

from clip_pipe.data.fetch import CHUNK_BYTES, ChunkStream, Fetcher
from clip_pipe.data.retry import MAX_SHARDS_UNREACHABLE, Retry, ShardUnavailable, StoreUnreachable
from clip_pipe.data.stores import is_pipe, is_remote, local_path
from clip_pipe.data.tar import TarError, read_tar, tar_samples

if TYPE_CHECKING:
    from clip_pipe.config import DataConfig
    from clip_pipe.data.cache import ShardCache
    from clip_pipe.data.sources import Shard


class _TimedPipe(io.RawIOBase):
    """A pipe's read end that raises TimeoutError when no byte comes for `timeout_s`."""

    def __init__(self, pipe: BinaryIO, timeout_s: float, command: str):
        super().__init__()
        self.pipe, self.timeout_s, self.command = pipe, timeout_s, command

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.pipe], [], [], self.timeout_s)
        if not ready:
            raise TimeoutError(f"pipe:{self.command}: no output for {self.timeout_s:g} s")
        data = os.read(self.pipe.fileno(), len(buffer))
        buffer[: len(data)] = data
        return len(data)


def pipe_samples(url: str, timeout_s: float) -> Iterator[dict]:
    """The samples of a tar a shell command writes to its standard output. Its exit status is checked
    (a command that fails part-way loses the rest, counted by the stream); retrying is the command's
    own business (`curl --retry`), as in webdataset."""
    command = url.removeprefix("pipe:")
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=0)
    try:
        yield from read_tar(_TimedPipe(proc.stdout, timeout_s, command), url, None)
        stream = _TimedPipe(proc.stdout, timeout_s, command)
        while stream.read(2**16):  # the archive's padding; a writer blocked on a full pipe never exits
            pass
        status = proc.wait(timeout=timeout_s)
        if status != 0:
            raise ShardUnavailable(f"{url}: exit status {status}", transient=False)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


class ShardReader:
    """Reads shards by URL, for one loader slot (a worker of a rank); create it in the process that reads.

    `cache`, if given, keeps copies of remote shards on local disk (see `cache.py`). `num_fetches`
    range requests of `chunk_bytes` each are in flight at once, shared by the slot's streams; each is
    retried as `retry` says, and a request's socket may be silent for `timeout_s` before it counts as
    failed. `stream` (any hashable; one per stream of the order) names whose plan a `prefetch` is and
    which stream opens a shard; leave it out where one stream reads.
    """

    def __init__(
        self,
        cache: ShardCache | None = None,
        num_fetches: int = 8,
        chunk_bytes: int = CHUNK_BYTES,
        timeout_s: float = 30.0,
        retry: Retry | None = None,
    ):
        assert num_fetches >= 1 and chunk_bytes >= 1
        self.cache, self.num_fetches, self.chunk_bytes = cache, num_fetches, chunk_bytes
        self.timeout_s, self.retry = timeout_s, retry or Retry()
        self._fetcher: Fetcher | None = None
        self._pid = os.getpid()
        self._num_unreachable = 0  # shards in a row lost to transient failures, over all streams

    def __getstate__(self) -> dict:  # a DataLoader worker gets its own, without threads
        return {**self.__dict__, "_fetcher": None}

    @property
    def fetcher(self) -> Fetcher:
        if self._fetcher is None or self._pid != os.getpid():  # threads do not survive fork
            skip = self.cache.has if self.cache else lambda url: False
            self._fetcher = Fetcher(self.num_fetches, self.chunk_bytes, self.retry, self.timeout_s, skip)
            weakref.finalize(self, self._fetcher.close)  # an abandoned reader's threads end too
            self._pid = os.getpid()
        return self._fetcher

    def close(self) -> None:
        if self._fetcher is not None and self._pid == os.getpid():
            self._fetcher.close()
        self._fetcher = None

    def prefetch(self, urls: Iterable[str], stream: Hashable = None) -> None:
        """A hint: `stream` opens these shards next, in this order (replacing its previous hint; an
        empty one ends it). Their remote bytes start arriving while the shards before them are read."""
        remote = [u for u in urls if is_remote(u) and not (self.cache and self.cache.has(u))]
        if remote or self._fetcher is not None:
            self.fetcher.plan(stream, remote)

    def samples(self, url: str, stream: Hashable = None) -> Iterator[dict]:
        """The samples of the shard at `url`; raises `OSError` or `TarError` where it stops being readable."""
        if is_pipe(url):
            yield from pipe_samples(url, self.timeout_s)
        elif not is_remote(url):
            yield from tar_samples(local_path(url))
        else:
            yield from self._remote_samples(url, stream)

    def _remote_samples(self, url: str, stream: Hashable) -> Iterator[dict]:
        cached = self.cache.get(url) if self.cache else None
        if cached is not None:
            if self._fetcher is not None:
                self._fetcher.forget(stream, url)
            try:
                yield from tar_samples(str(cached))
            except TarError:
                self.cache.remove(url)  # a damaged copy: the next epoch fetches the shard again
                raise
            return
        try:
            yield from self._fetched_samples(url, stream)
        except ShardUnavailable as exn:
            self._num_unreachable = self._num_unreachable + 1 if exn.transient else 0
            if self._num_unreachable >= MAX_SHARDS_UNREACHABLE:
                raise StoreUnreachable(
                    f"{self._num_unreachable} shards in a row could not be fetched, each after "
                    f"{self.retry.num_retries} retries; the last: {exn}"
                ) from exn
            raise
        self._num_unreachable = 0

    def _fetched_samples(self, url: str, stream: Hashable) -> Iterator[dict]:
        fetch, size, ranged = self.fetcher.open_shard(stream, url)
        writer = self.cache.writer(url, size) if self.cache else None
        try:
            chunks = ChunkStream(self.fetcher, fetch, size, ranged, writer)
            yield from read_tar(chunks, url, size)
            if writer is not None:
                chunks.drain()
                writer.commit()
        finally:
            if writer is not None:
                writer.abort()  # a no-op after commit
            self.fetcher.release(fetch)


def shard_reader(data: DataConfig, shards: Sequence[Shard]) -> ShardReader:
    """The reader `data` configures: its cache keeps `shards` (the run's data) rather than other data."""
    from clip_pipe.data.cache import ShardCache

    cache = None
    if data.cache_dir:
        cache = ShardCache(
            data.cache_dir, data.cache_limit_bytes, [s.url for s in shards if is_remote(s.url)]
        )
    return ShardReader(cache, data.num_fetches, timeout_s=data.timeout_s)
