"""Remote shards as byte ranges fetched ahead: one `Fetcher` per loader slot, shared by its streams.

A remote shard is read as a queue of `chunk_bytes` ranges. A loader slot reads several streams at once
(order.py), each its own shard, and each stream names the shards it reads next (`plan`). The fetcher
keeps one lane per stream (its open shard, then its plan, in order) and one budget for the slot: at
most `num_fetches` heads and chunks in flight or fetched and not yet taken, which bounds the memory at
`num_fetches` chunks (plus the one a blocked reader asks for out of turn) however many streams and
shards there are.

Which request goes next: the next one of the lane with the fewest requests under way (the least
recently served on a tie). Within a lane: its open shard's next chunk, else a planned shard's head (as
soon as there is room: a head costs no memory, and its round trip would otherwise come before the
chunk needed next), else the next chunk of its planned shards, in plan order. Streams move at the same
speed (order.py), so the lane with the fewest chunks under way is the one whose data runs out first:
this is earliest-deadline-first, and it is what lets a stream's next shard arrive while its open
shard's last chunks are read, instead of waiting behind other streams' open shards. With one stream
it is the open shard's chunks, then the planned shards' in order.

Several requests at once also beat a per-connection bandwidth cap, which one request per shard
(webdataset, open_clip) cannot.
"""

from __future__ import annotations

import functools
import io
import itertools
import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import BinaryIO

from clip_pipe.data.retry import Retry, ShardUnavailable
from clip_pipe.data.stores import store_for

CHUNK_BYTES = 8 * 2**20
"""A range request's size: at 20 MB/s per connection and 30 ms a request, 8 MiB keeps 93% of the
connection busy; with `num_fetches` 8 a slot holds at most 64 MiB of shard data."""


class _Fetch:
    """One remote shard, fetched as chunks. All fields are guarded by the fetcher's lock."""

    def __init__(self, url: str, lane: Hashable):
        self.url, self.lane = url, lane
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


class _Lane:
    """One stream's fetches: the shards it has open (usually one) and those it will open next, in order."""

    def __init__(self):
        self.open: list[_Fetch] = []
        self.planned: list[_Fetch] = []
        self.last_served = -1  # when it last had a request submitted (ties go to the longest waiting)

    def num_outstanding(self) -> int:
        return sum(f.num_outstanding for f in self.open) + sum(f.num_outstanding for f in self.planned)

    def next_work(self, skip: Callable[[str], bool]) -> _Fetch | None:
        """The fetch whose request this lane needs next."""
        candidates = [f for f in self.open if f.wants_work()]
        if candidates:  # (a lane with several open shards reads them in turn)
            return min(candidates, key=lambda f: f.num_outstanding)
        # The planned shards' heads as soon as there is room (they cost no memory, and a head's round
        # trip would otherwise come before the chunk that is needed next), their chunks in plan order.
        in_order = not any(_awaits_head(f) for f in self.open)
        for fetch in self.planned:
            if fetch.head is None and skip(fetch.url):
                fetch.head, fetch.num_chunks = _DONE, 0
            if fetch.head is None or (in_order and fetch.wants_work()):
                return fetch
            in_order = in_order and not _awaits_head(fetch)
        return None


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


def _awaits_head(fetch: _Fetch) -> bool:
    return fetch.head is not None and fetch.head is not _DONE and not fetch.head.done()


class Fetcher:
    """A pool of `num_fetches` threads fetching the chunks that the slot's streams need soonest; at most
    `num_fetches` heads and chunks are in flight or waiting to be taken. `lane` names a stream: any
    hashable, one plan each."""

    def __init__(
        self, num_fetches: int, chunk_bytes: int, retry: Retry, timeout_s: float, skip: Callable[[str], bool]
    ):
        self.num_fetches, self.chunk_bytes = num_fetches, chunk_bytes
        self.retry, self.timeout_s = retry, timeout_s
        self.skip = skip  # planned shards that need no fetching after all (cached since they were planned)
        self.pool = _DaemonPool(num_fetches)
        self.lock = threading.RLock()  # futures' callbacks may run at once, in the thread that adds them
        self.lanes: dict[Hashable, _Lane] = {}
        self.num_outstanding = 0
        self._clock = itertools.count()

    def close(self) -> None:
        with self.lock:
            for lane in self.lanes.values():
                for fetch in lane.open + lane.planned:
                    self._drop(fetch)
            self.lanes.clear()
        self.pool.shutdown()

    # --- the consumer's side

    def plan(self, lane: Hashable, urls: Sequence[str]) -> None:
        """The shards stream `lane` opens next, in order (replacing its previous plan; other lanes'
        plans stay). Shards planned before are kept with what was fetched of them."""
        with self.lock:
            fetches = self.lanes.setdefault(lane, _Lane())
            old: dict[str, list[_Fetch]] = {}
            for fetch in fetches.planned:
                old.setdefault(fetch.url, []).append(fetch)
            fetches.planned = [old[url].pop(0) if old.get(url) else _Fetch(url, lane) for url in urls]
            for leftovers in old.values():
                for fetch in leftovers:
                    self._drop(fetch)
            self._tidy(lane)
            self._pump()

    def open_shard(self, lane: Hashable, url: str) -> tuple[_Fetch, int, bool]:
        """Stream `lane` starts reading `url` (its planned fetch, if there is one); returns the fetch,
        the shard's size and whether it can be read in ranges."""
        with self.lock:
            fetches = self.lanes.setdefault(lane, _Lane())
            index = next((i for i, f in enumerate(fetches.planned) if f.url == url), None)
            if index is None:
                fetch = _Fetch(url, lane)
            else:  # shards planned before it were meant to be read before it: that plan is stale
                fetch = fetches.planned[index]
                for stale in fetches.planned[:index]:
                    self._drop(stale)
                fetches.planned = fetches.planned[index + 1 :]
            fetches.open.append(fetch)
            if fetch.head is not None and fetch.head is not _DONE and _failed_transiently(fetch.head):
                fetch.head = None  # it failed while fetched ahead, in an outage that may be over: again
            if fetch.head is None or fetch.head is _DONE:
                fetch.head, fetch.num_chunks = None, None
                self._submit_head(fetch)  # now, even past the budget: the reader waits for it
            fetch.num_fetched_ahead = fetch.next_submit
            self._pump()
            head = fetch.head
        try:
            size, ranged = head.result()
        except BaseException:
            self.release(fetch)
            raise
        return fetch, size, ranged

    def forget(self, lane: Hashable, url: str) -> None:
        """`url` was read without fetching (from the cache): its planned fetch, and those before it, go."""
        with self.lock:
            fetches = self.lanes.get(lane)
            index = None if fetches is None else next(
                (i for i, f in enumerate(fetches.planned) if f.url == url), None
            )  # fmt: skip
            if index is not None:
                for fetch in fetches.planned[: index + 1]:
                    self._drop(fetch)
                fetches.planned = fetches.planned[index + 1 :]
                self._tidy(lane)
                self._pump()

    def take(self, fetch: _Fetch, index: int) -> bytes:
        """Chunk `index` of an open shard; raises `ShardUnavailable` if it cannot be had."""
        with self.lock:
            if index not in fetch.chunks:  # not yet submitted: the budget was spent on other chunks
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
            fetches = self.lanes.get(fetch.lane)
            if fetches is not None and fetch in fetches.open:
                fetches.open.remove(fetch)
            self._drop(fetch)
            self._tidy(fetch.lane)
            self._pump()

    # --- scheduling (lock held)

    def _tidy(self, lane: Hashable) -> None:
        fetches = self.lanes.get(lane)
        if fetches is not None and not fetches.open and not fetches.planned:
            del self.lanes[lane]

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
        best, best_rank = None, None
        for lane in self.lanes.values():
            fetch = lane.next_work(self.skip)
            if fetch is not None:
                rank = (lane.num_outstanding(), lane.last_served)
                if best_rank is None or rank < best_rank:
                    best, best_rank = (lane, fetch), rank
        if best is None:
            return None
        best[0].last_served = next(self._clock)
        return best[1]

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


class ChunkStream(io.RawIOBase):
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
