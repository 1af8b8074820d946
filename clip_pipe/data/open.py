"""Shard URL -> samples: the one place a training shard is opened, wherever it lives.

    /local/path.tar, file://...   read from disk, as before
    s3://, gs://, any fsspec URL  fsspec (s3fs for S3: AWS environment variables, config files, AWS_ENDPOINT_URL)
    http://, https://             httpx, with Range requests
    pipe:COMMAND                  the command's standard output (webdataset's and open_clip's `pipe:aws s3 cp ... -`)

A remote shard is read as a queue of byte ranges (`chunk_bytes` each) fetched by a pool of
`num_fetches` threads per loader slot, ahead of the tar reader. The chunks of the shard being read come
first, then those of the shards `prefetch` named, in order, so the next shard is already arriving when
this one ends; at most `num_fetches` chunks are in flight or waiting, which bounds the memory.
Several connections per shard also beat a per-connection bandwidth cap, which one stream per shard
(webdataset, open_clip) cannot. Every request is retried on a transient failure (a reset or refused
connection, a timeout, a 5xx) with exponential backoff, and a request cut off mid-body costs at most
its chunk, which is read again as a range. A permanent failure (404, 403, a shard that changed while
read) or retries run out raise `ShardUnavailable`, an `OSError`: the stream counts that shard's
samples as lost, as it does for a corrupt tar, and goes on.

`ShardReader` is per loader slot: create it (or unpickle it) in the process that reads; its threads
start on first use.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import queue
import random
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from clip_pipe.data.tar import TarError, read_tar, tar_samples

if TYPE_CHECKING:
    from clip_pipe.config import DataConfig
    from clip_pipe.data.cache import ShardCache
    from clip_pipe.data.sources import Shard

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK_BYTES = 8 * 2**20
"""A range request's size: at 20 MB/s per connection and 30 ms a request, 8 MiB keeps 93% of the
connection busy; with `num_fetches` 8 a slot holds at most 64 MiB of shard data."""


class ShardUnavailable(OSError):
    """A shard (or a file beside it) could not be read: `transient` if retries ran out, else permanent."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


MAX_SHARDS_UNREACHABLE = 3


class StoreUnreachable(RuntimeError):
    """Several shards in a row could not be fetched, each after all its retries. The store is down, and
    the loader stops the run (resumable with `--resume latest`) rather than spend hours losing every
    shard, one retry schedule at a time. Not an `OSError`: the stream must not count it as a lost shard."""


# ----------------------------------------------------------------------------------------------- URLs


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://") and not is_pipe(url)


def local_path(url: str) -> str:
    return url.removeprefix("file://")


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


# ------------------------------------------------------------------------------------ failure kinds


def http_status(exn: BaseException) -> int | None:
    """The HTTP status behind an error from httpx, s3fs/botocore or aiohttp, if there is one."""
    seen = set()
    while exn is not None and id(exn) not in seen:
        seen.add(id(exn))
        response = getattr(exn, "response", None)
        status = getattr(response, "status_code", None)  # httpx
        if status is None and isinstance(response, dict):  # botocore's parsed response
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status is None:
            status = getattr(exn, "status", None)  # aiohttp
        if isinstance(status, int):
            return status
        exn = exn.__cause__ or exn.__context__
    return None


def is_transient(exn: BaseException) -> bool:
    """Worth retrying: the same request may well succeed later (the network or the server, not the data)."""
    if isinstance(exn, ShardUnavailable):
        return exn.transient
    if isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = http_status(exn)
    if status is not None:
        return status >= 500 or status in (408, 429)
    transient: tuple[type, ...] = (OSError, TimeoutError)
    # Only the clients already imported can have raised; none is imported just to classify.
    if "httpx" in sys.modules:
        transient += (sys.modules["httpx"].TransportError,)
    if "aiohttp" in sys.modules:
        transient += (sys.modules["aiohttp"].ClientError,)
    if "botocore.exceptions" in sys.modules:
        boto = sys.modules["botocore.exceptions"]
        transient += (boto.HTTPClientError, boto.ConnectionError, boto.IncompleteReadError)
    if "fsspec.exceptions" in sys.modules:
        transient += (sys.modules["fsspec.exceptions"].FSTimeoutError,)
    return isinstance(exn, transient)


def describe(exn: BaseException) -> str:
    """One line for a fetch error: its kind and message, with the HTTP status where there is one."""
    text = str(exn).strip().splitlines()[0] if str(exn).strip() else ""
    kind = type(exn).__name__
    status = http_status(exn)
    return f"{kind}{f' (HTTP {status})' if status and str(status) not in text else ''}{': ' + text if text else ''}"


class Retry:
    """How often and how long to retry a transient failure: `num_retries` times, waiting `base_s`,
    2 `base_s`, 4 `base_s` ... (at most `max_s`, with jitter so that many slots do not retry in step)."""

    def __init__(self, num_retries: int = 8, base_s: float = 0.5, max_s: float = 30.0):
        self.num_retries, self.base_s, self.max_s = num_retries, base_s, max_s

    def __call__(self, fn: Callable[[], T], what: str, stop: threading.Event | None = None) -> T:
        """`fn()`, retried while it fails transiently; `stop` cuts the waits short (the reader closed)."""
        for attempt in range(self.num_retries + 1):
            try:
                return fn()
            except Exception as exn:
                if not is_transient(exn):
                    raise ShardUnavailable(f"{what}: {describe(exn)}", transient=False) from exn
                if attempt == self.num_retries:
                    raise ShardUnavailable(
                        f"{what}: {describe(exn)} (gave up after {self.num_retries} retries)", transient=True
                    ) from exn
                delay = min(self.max_s, self.base_s * 2**attempt) * random.uniform(0.5, 1.0)
                log.info("%s: %s; retrying in %.1f s", what, describe(exn), delay)
                if stop is None:
                    time.sleep(delay)
                elif stop.wait(delay):
                    raise ShardUnavailable(f"{what}: the reader was closed", transient=True) from exn
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------- stores


class Store:
    """Byte ranges of remote files. Raises the client's own errors; `Retry` sorts them out."""

    def size(self, url: str) -> tuple[int, bool]:
        """(size in bytes, whether the store serves byte ranges of it)."""
        raise NotImplementedError

    def read(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file (fewer only if it is shorter)."""
        raise NotImplementedError

    def read_many(self, urls: Sequence[str]) -> dict[str, bytes | Exception]:
        """Whole small files, concurrently; a file that fails maps to its error."""
        raise NotImplementedError

    def list(self, url: str) -> dict[str, int]:
        """{name: size} of the files in the folder at `url`."""
        raise NotImplementedError


class FsspecStore(Store):
    """s3://, gs:// and any other fsspec protocol."""

    def __init__(self, proto: str, timeout_s: float):
        import fsspec

        # Our own instance, and no listings cache: a listing made at start-up must not hide a file later.
        kwargs: dict = {"skip_instance_cache": True, "use_listings_cache": False}
        if proto in ("s3", "s3a"):
            # Retries are ours (`Retry`), the same for every store; botocore's and s3fs's would multiply them.
            config = {"retries": {"total_max_attempts": 1}, "max_pool_connections": 64}
            config |= {"connect_timeout": min(10.0, timeout_s), "read_timeout": timeout_s}
            kwargs["config_kwargs"] = config
        try:
            self.fs = fsspec.filesystem(proto, **kwargs)
        except ImportError as exn:
            package = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}.get(proto)
            hint = f" (pip install {package})" if package else ""
            raise ValueError(f"{proto}:// URLs need fsspec's {proto} backend{hint}: {exn}") from None
        except ValueError as exn:  # fsspec: "Protocol not known"
            raise ValueError(f"{proto}:// is not a protocol fsspec knows: {exn}") from None
        if proto in ("s3", "s3a"):
            self.fs.retries = 1

    def size(self, url: str) -> tuple[int, bool]:
        info = self.fs.info(url)
        if info.get("type") != "file":
            raise IsADirectoryError(f"{url} is not a file")
        return int(info["size"]), True

    def read(self, url: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(url, start=start, end=end)

    def read_many(self, urls: Sequence[str]) -> dict[str, bytes | Exception]:
        if not urls:
            return {}
        results = self.fs.cat(list(urls), on_error="return")
        # fsspec names its results by path without the protocol
        by_path = {self.fs._strip_protocol(url): url for url in urls}
        return {by_path[self.fs._strip_protocol(path)]: value for path, value in results.items()}

    def list(self, url: str) -> dict[str, int]:
        entries = self.fs.ls(url, detail=True)
        return {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e["type"] == "file"
        }


class HttpStore(Store):
    """http:// and https://, through httpx. fsspec's HTTP backend is not used: its `info` reports every
    failure, a 500 or a refused connection included, as FileNotFoundError (a shard would be lost to a
    blip), and its `cat_file` takes a whole body where a server ignored the Range header."""

    def __init__(self, timeout_s: float):
        import httpx

        # httpx logs every request at INFO: thousands a minute in train.log, for nothing a failure would not say.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            follow_redirects=True,
            headers={"Accept-Encoding": "identity"},  # byte ranges of the stored bytes, not of a re-encoding
        )

    @staticmethod
    def _check(response, url: str) -> None:
        if response.status_code == 404:
            raise FileNotFoundError(f"{url}: HTTP 404")
        if response.status_code in (401, 403):
            raise PermissionError(f"{url}: HTTP {response.status_code}")
        response.raise_for_status()

    def size(self, url: str) -> tuple[int, bool]:
        response = self.client.head(url)
        if response.status_code not in (405, 501):  # HEAD not allowed: ask for the first byte instead
            self._check(response, url)
            if "content-length" in response.headers:
                ranged = response.headers.get("accept-ranges", "").lower() == "bytes"
                return int(response.headers["content-length"]), ranged
        response = self.client.get(url, headers={"Range": "bytes=0-0"})
        self._check(response, url)
        if response.status_code == 206 and "/" in response.headers.get("content-range", ""):
            return int(response.headers["content-range"].rsplit("/", 1)[1]), True
        return len(response.content), False

    def read(self, url: str, start: int, end: int) -> bytes:
        response = self.client.get(url, headers={"Range": f"bytes={start}-{end - 1}"})
        if response.status_code == 416:  # the range starts at or past the end: the file is shorter now
            return b""
        self._check(response, url)
        if response.status_code == 206:
            first = response.headers.get("content-range", "").removeprefix("bytes ").split("-", 1)[0]
            if first != str(start):
                raise ShardUnavailable(f"{url}: asked for bytes from {start}, got {first!r}", transient=True)
            return response.content
        if start == 0:  # a 200: the server ignored Range and sent it all
            return response.content[:end]
        raise ShardUnavailable(f"{url}: the server ignores Range requests", transient=False)

    def read_many(self, urls: Sequence[str]) -> dict[str, bytes | Exception]:
        def get(url: str) -> bytes | Exception:
            try:
                response = self.client.get(url)
                self._check(response, url)
                return response.content
            except Exception as exn:
                return exn

        with ThreadPoolExecutor(32) as pool:
            return dict(zip(urls, pool.map(get, urls), strict=True))

    def list(self, url: str) -> dict[str, int]:
        raise ValueError(
            f"{url}: an HTTP folder cannot be listed; name its shards with a brace pattern "
            f"({url.rstrip('/')}/{{00000..00099}}.tar) or put a sizes.json in it"
        )


_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "HTTPS_PROXY")
_stores: dict[tuple, Store] = {}
_stores_lock = threading.Lock()


def store_for(url: str, timeout_s: float = 30.0) -> Store:
    """The store that serves `url`, one per protocol, timeout and process (clients do not survive fork)."""
    proto = protocol(url)
    # The environment names the endpoint and credentials; a client made for other ones is not this one.
    env = tuple(os.environ.get(k) for k in _CLIENT_ENV)
    key = (os.getpid(), "http" if proto in ("http", "https") else proto, timeout_s, env)
    with _stores_lock:
        if key not in _stores:
            _stores[key] = HttpStore(timeout_s) if key[1] == "http" else FsspecStore(proto, timeout_s)
        return _stores[key]


# ------------------------------------------------------------------------------------ chunk fetching


class _Fetch:
    """One remote shard, fetched as chunks. All fields are guarded by the fetcher's lock."""

    def __init__(self, url: str):
        self.url = url
        self.head: Future | None = None  # -> (size, ranged)
        self.num_chunks: int | None = None  # known once the head is back
        self.chunks: dict[int, Future] = {}  # submitted and not yet taken
        self.calls: dict[int, tuple[Callable, str]] = {}  # how to fetch each of them again
        self.num_fetched_ahead = 0  # chunks submitted before the shard was opened
        self.next_submit = 0
        self.num_outstanding = 0  # head or chunks submitted and not yet taken
        self.dropped = False

    def wants_work(self) -> bool:
        if self.head is None:
            return True
        return self.num_chunks is not None and self.next_submit < self.num_chunks


class _DaemonPool:
    """A thread pool whose threads never hold up the process's exit. (ThreadPoolExecutor's are joined
    at exit, and one waiting out retries against a dead server would keep a finished run alive.)"""

    def __init__(self, num_threads: int):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped, self.num_threads = threading.Event(), num_threads
        for i in range(num_threads):
            threading.Thread(target=self._work, name=f"clip-pipe-fetch-{i}", daemon=True).start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self.queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while not self.stopped.is_set():
            item = self.queue.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exn:
                future.set_exception(exn)

    def shutdown(self) -> None:
        self.stopped.set()
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in range(self.num_threads):
            self.queue.put(None)


def _failed_transiently(future: Future) -> bool:
    if not future.done() or future.cancelled():
        return False
    exn = future.exception()
    return isinstance(exn, ShardUnavailable) and exn.transient


_DONE: Future = Future()  # the head of a planned shard that turned out to need no fetching


class Fetcher:
    """A pool of `num_fetches` threads that fetch chunks of the open shards first, then those of the
    shards planned next; at most `num_fetches` heads and chunks are in flight or waiting to be taken."""

    def __init__(
        self, num_fetches: int, chunk_bytes: int, retry: Retry, timeout_s: float, skip: Callable[[str], bool]
    ):
        self.num_fetches, self.chunk_bytes = num_fetches, chunk_bytes
        self.retry, self.timeout_s = retry, timeout_s
        self.skip = skip  # planned shards that need no fetching after all (cached since they were planned)
        self.pool = _DaemonPool(num_fetches)
        self.lock = threading.RLock()  # futures' callbacks may run at once, in the thread that adds them
        self.open: list[_Fetch] = []
        self.planned: list[_Fetch] = []
        self.num_outstanding = 0

    def close(self) -> None:
        with self.lock:
            for fetch in self.open + self.planned:
                self._drop(fetch)
            self.open, self.planned = [], []
        self.pool.shutdown()

    # --- the consumer's side

    def plan(self, urls: Sequence[str]) -> None:
        """The shards to be opened next, in order (replacing the previous plan)."""
        with self.lock:
            old: dict[str, list[_Fetch]] = {}
            for fetch in self.planned:
                old.setdefault(fetch.url, []).append(fetch)
            self.planned = [old[url].pop(0) if old.get(url) else _Fetch(url) for url in urls]
            for leftovers in old.values():
                for fetch in leftovers:
                    self._drop(fetch)
            self._pump()

    def open_shard(self, url: str) -> tuple[_Fetch, int, bool]:
        """Start reading `url` (the planned fetch, if there is one); returns it, its size and whether
        it can be read in ranges."""
        with self.lock:
            index = next((i for i, f in enumerate(self.planned) if f.url == url), None)
            if index is None:
                fetch = _Fetch(url)
            else:  # planned shards before it were meant to be read before it: the plan is stale
                fetch = self.planned[index]
                for stale in self.planned[:index]:
                    self._drop(stale)
                self.planned = self.planned[index + 1 :]
            self.open.append(fetch)
            if fetch.head is not None and fetch.head is not _DONE and _failed_transiently(fetch.head):
                fetch.head = None  # it failed while fetched ahead, in an outage that may be over: again
            if fetch.head is None or fetch.head is _DONE:
                fetch.head, fetch.num_chunks = None, None
                self._submit_head(fetch)
            fetch.num_fetched_ahead = fetch.next_submit
            self._pump()
            head = fetch.head
        try:
            size, ranged = head.result()
        except BaseException:
            self.release(fetch)
            raise
        return fetch, size, ranged

    def forget(self, url: str) -> None:
        """`url` was read without fetching (from the cache): its planned fetch, and those before it, go."""
        with self.lock:
            index = next((i for i, f in enumerate(self.planned) if f.url == url), None)
            if index is not None:
                for fetch in self.planned[: index + 1]:
                    self._drop(fetch)
                self.planned = self.planned[index + 1 :]
                self._pump()

    def take(self, fetch: _Fetch, index: int) -> bytes:
        """Chunk `index` of an open shard; raises `ShardUnavailable` if it cannot be had."""
        with self.lock:
            if index not in fetch.chunks:  # not yet submitted: the window was full
                assert index == fetch.next_submit, (index, fetch.next_submit)
                self._submit_chunk(fetch)
            future = fetch.chunks.pop(index)
            again = fetch.calls.pop(index)
        try:
            if index < fetch.num_fetched_ahead and _failed_transiently(future):
                # It failed while fetched ahead, in an outage that may be over: one more schedule.
                return self.retry(*again, self.pool.stopped)
            return future.result()
        finally:
            with self.lock:
                if not fetch.dropped:
                    fetch.num_outstanding -= 1
                    self.num_outstanding -= 1
                self._pump()

    def release(self, fetch: _Fetch) -> None:
        """The consumer is done with an open shard (read, failed or abandoned)."""
        with self.lock:
            if fetch in self.open:
                self.open.remove(fetch)
            self._drop(fetch)
            self._pump()

    # --- scheduling (lock held)

    def _drop(self, fetch: _Fetch) -> None:
        if fetch.dropped:
            return
        fetch.dropped = True
        for future in fetch.chunks.values():
            future.cancel()
        fetch.chunks.clear()
        fetch.calls.clear()
        self.num_outstanding -= fetch.num_outstanding
        fetch.num_outstanding = 0

    def _pump(self) -> None:
        while self.num_outstanding < self.num_fetches:
            fetch = self._next_to_fetch()
            if fetch is None:
                return
            if fetch.head is None:
                self._submit_head(fetch)
            else:
                self._submit_chunk(fetch)

    def _next_to_fetch(self) -> _Fetch | None:
        # The open shard with the fewest chunks under way (shards read in turn get turns), else the
        # first planned one with work left.
        candidates = [f for f in self.open if f.wants_work()]
        if candidates:
            return min(candidates, key=lambda f: f.num_outstanding)
        for fetch in self.planned:
            if fetch.head is None and self.skip(fetch.url):
                fetch.head, fetch.num_chunks = _DONE, 0
            if fetch.wants_work():
                return fetch
        return None

    def _submit_head(self, fetch: _Fetch) -> None:
        store = store_for(fetch.url, self.timeout_s)
        size = functools.partial(store.size, fetch.url)
        fetch.head = self.pool.submit(self.retry, size, fetch.url, self.pool.stopped)
        fetch.num_outstanding += 1
        self.num_outstanding += 1
        fetch.head.add_done_callback(functools.partial(self._head_done, fetch))

    def _head_done(self, fetch: _Fetch, head: Future) -> None:
        with self.lock:
            if fetch.dropped:
                return
            fetch.num_outstanding -= 1
            self.num_outstanding -= 1
            if not head.cancelled() and head.exception() is None:
                size, ranged = head.result()
                fetch.num_chunks = -(-size // self.chunk_bytes) if ranged else 1
            else:
                fetch.num_chunks = 0  # the consumer gets the error from the head
            self._pump()

    def _submit_chunk(self, fetch: _Fetch) -> None:
        size, ranged = fetch.head.result()
        index = fetch.next_submit
        start = index * self.chunk_bytes if ranged else 0
        end = min(size, start + self.chunk_bytes) if ranged else size
        store = store_for(fetch.url, self.timeout_s)
        fetch.calls[index] = (
            functools.partial(store.read, fetch.url, start, end),
            f"{fetch.url} [{start}, {end})",
        )
        fetch.chunks[index] = self.pool.submit(self.retry, *fetch.calls[index], self.pool.stopped)
        fetch.next_submit += 1
        fetch.num_outstanding += 1
        self.num_outstanding += 1


class _ChunkStream(io.RawIOBase):
    """A shard's chunks, taken in order, as a readable stream; each chunk also goes to `sink`."""

    def __init__(self, fetcher: Fetcher, fetch: _Fetch, size: int, ranged: bool, sink: BinaryIO | None):
        super().__init__()
        self.fetcher, self.fetch, self.size, self.sink = fetcher, fetch, size, sink
        self.chunk_bytes = fetcher.chunk_bytes if ranged else size
        self.index, self.num_read = 0, 0
        self.chunk, self.pos = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        if self.num_read >= self.size:
            return False
        data = self.fetcher.take(self.fetch, self.index)
        expected = min(self.size - self.num_read, self.chunk_bytes)
        if len(data) != expected:
            raise ShardUnavailable(
                f"{self.fetch.url}: got {len(data)} bytes at offset {self.num_read}, expected {expected}: "
                "the shard changed while it was read",
                transient=False,
            )
        if self.sink is not None:
            self.sink.write(data)
        self.index += 1
        self.num_read += len(data)
        self.chunk, self.pos = memoryview(data), 0
        return True

    def readinto(self, buffer) -> int:
        while self.pos >= len(self.chunk):
            if not self._next_chunk():
                return 0
        n = min(len(buffer), len(self.chunk) - self.pos)
        buffer[:n] = self.chunk[self.pos : self.pos + n]
        self.pos += n
        return n

    def drain(self) -> None:
        """Take the rest (the tar reader stops at the end-of-archive marker; a cached copy needs all)."""
        self.chunk, self.pos = memoryview(b""), 0
        while self._next_chunk():
            pass


# ---------------------------------------------------------------------------------------------- pipe


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


# ------------------------------------------------------------------------------------- the reader


class ShardReader:
    """Reads shards by URL, for one loader slot (a worker of a rank); create it in the process that reads.

    `cache`, if given, keeps copies of remote shards on local disk (see `cache.py`). `num_fetches`
    range requests of `chunk_bytes` each are in flight at once; each is retried as `retry` says, and a
    request's socket may be silent for `timeout_s` before it counts as failed.
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
        self._num_unreachable = 0  # shards in a row lost to transient failures

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

    def prefetch(self, urls: Iterable[str]) -> None:
        """A hint: these shards will be read next, in this order (replacing the previous hint). Their
        remote bytes start arriving while the shards before them are read."""
        remote = [u for u in urls if is_remote(u) and not (self.cache and self.cache.has(u))]
        if remote or self._fetcher is not None:
            self.fetcher.plan(remote)

    def samples(self, url: str) -> Iterator[dict]:
        """The samples of the shard at `url`; raises `OSError` or `TarError` where it stops being readable."""
        if is_pipe(url):
            yield from pipe_samples(url, self.timeout_s)
        elif not is_remote(url):
            yield from tar_samples(local_path(url))
        else:
            yield from self._remote_samples(url)

    def _remote_samples(self, url: str) -> Iterator[dict]:
        cached = self.cache.get(url) if self.cache else None
        if cached is not None:
            if self._fetcher is not None:
                self._fetcher.forget(url)
            try:
                yield from tar_samples(str(cached))
            except TarError:
                self.cache.remove(url)  # a damaged copy: the next epoch fetches the shard again
                raise
            return
        try:
            yield from self._fetched_samples(url)
        except ShardUnavailable as exn:
            self._num_unreachable = self._num_unreachable + 1 if exn.transient else 0
            if self._num_unreachable >= MAX_SHARDS_UNREACHABLE:
                raise StoreUnreachable(
                    f"{self._num_unreachable} shards in a row could not be fetched, each after "
                    f"{self.retry.num_retries} retries; the last: {exn}"
                ) from exn
            raise
        self._num_unreachable = 0

    def _fetched_samples(self, url: str) -> Iterator[dict]:
        fetch, size, ranged = self.fetcher.open_shard(url)
        writer = self.cache.writer(url, size) if self.cache else None
        try:
            stream = _ChunkStream(self.fetcher, fetch, size, ranged, writer)
            yield from read_tar(stream, url, size)
            if writer is not None:
                stream.drain()
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
