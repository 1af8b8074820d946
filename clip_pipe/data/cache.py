"""An optional bounded local cache of remote shards (`data.cache_dir`, `data.cache_limit`).

    CACHE/shards/<sha256(url)[:32]>-<name>      whole shards, one file each
    CACHE/tmp/<size>~<host>~<pid>~<n>~<key>.part  shards being written (their size is reserved)
    CACHE/.lock                                  taken (flock) only to decide what to admit or evict

- **Keys that cannot collide**: the key is a hash of the whole URL, not the file name, so
  `s3://a/00000.tar` and `s3://b/00000.tar` are two entries (webdataset's cache keys by basename, #471).
  The name is kept after the hash for people reading the folder.
- **Atomic writes**: a shard is written under tmp/ while it is read, fsynced, then renamed into
  shards/; a reader that dies part-way leaves only a .part file, removed by the next process on the
  same host once the writer's pid is gone. A copy is made only of a shard read to its end.
- **No thrashing when the limit is smaller than the data**: an LRU cache under a cyclic scan (every
  epoch reads every shard once) evicts each shard just before it is needed again and never hits.
  Here the shards of the data being trained on (`keep_urls`) are never evicted: once the cache is
  full of them, the rest of the data streams past uncached, and every epoch hits the same
  limit / data share. Only entries of other data (an earlier run's) are evicted, least recently used
  first (a hit touches the file's mtime).
- **No shared memory**: all state is the folder itself, shared by the ranks and loader workers of a
  node through the file system and one advisory lock; a killed process cannot leave it inconsistent.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import socket
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_counter = itertools.count()
MIN_FREE_FRACTION = 0.05
"""Never fill the disk: a shard is not admitted if it would leave less than this share of it free."""


def cache_key(url: str) -> str:
    name = _UNSAFE.sub("_", url.rstrip("/").rsplit("/", 1)[-1])[-64:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:32]}-{name}"


class ShardCache:
    """Whole remote shards on local disk, at most `limit_bytes` of them (None: no limit but the
    disk's). `keep_urls` are the shards of the run's data, never evicted to make room."""

    def __init__(self, folder: str | os.PathLike, limit_bytes: int | None, keep_urls: Iterable[str] = ()):
        self.folder = Path(folder)
        self.limit_bytes = limit_bytes
        self.keep = {cache_key(url) for url in keep_urls}
        try:
            (self.folder / "shards").mkdir(parents=True, exist_ok=True)
            (self.folder / "tmp").mkdir(exist_ok=True)
        except OSError as exn:
            raise ValueError(f"data.cache_dir {folder}: cannot create it: {exn}") from None
        if not os.access(self.folder / "tmp", os.W_OK):
            raise ValueError(f"data.cache_dir {folder}: not writable")

    def path(self, url: str) -> Path:
        return self.folder / "shards" / cache_key(url)

    def has(self, url: str) -> bool:
        return self.path(url).is_file()

    def get(self, url: str) -> Path | None:
        """The cached copy of `url`, if there is one (marked as just used)."""
        path = self.path(url)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def remove(self, url: str) -> None:
        self.path(url).unlink(missing_ok=True)

    def writer(self, url: str, num_bytes: int) -> CacheWriter | None:
        """A place to write `url`'s `num_bytes` as they are read, or None if they do not fit."""
        with self._locked():
            entries, num_used = self._scan()
            disk = shutil.disk_usage(self.folder)
            free = disk.free
            # Entries of other data, least recently used first, make room; the run's own never do.
            evictable = sorted((e for e in entries if e[0].name not in self.keep), key=lambda e: e[2])
            while evictable and not self._fits(num_bytes, num_used, free, disk.total):
                path, size, _ = evictable.pop(0)
                path.unlink(missing_ok=True)
                num_used, free = num_used - size, free + size
            if not self._fits(num_bytes, num_used, free, disk.total):
                return None
            part = f"{num_bytes}~{socket.gethostname()}~{os.getpid()}~{next(_counter)}~{cache_key(url)}.part"
            return CacheWriter(self.folder / "tmp" / part, self.path(url))

    def _fits(self, num_bytes: int, num_used: int, free: int, total: int) -> bool:
        if self.limit_bytes is not None and num_used + num_bytes > self.limit_bytes:
            return False
        return free - num_bytes >= MIN_FREE_FRACTION * total

    def _scan(self) -> tuple[list[tuple[Path, int, float]], int]:
        """The cached entries (path, size, last use), and the bytes they and the shards being written take."""
        entries = []
        for entry in os.scandir(self.folder / "shards"):
            with contextlib.suppress(FileNotFoundError):  # evicted by another process just now
                stat = entry.stat()
                entries.append((Path(entry.path), stat.st_size, stat.st_mtime))
        num_used = sum(size for _, size, _ in entries)
        host = socket.gethostname()
        for part in os.scandir(self.folder / "tmp"):
            fields = part.name.split("~", 4)
            if len(fields) < 5 or not fields[0].isdigit():
                continue
            if fields[1] == host and fields[2].isdigit() and not _alive(int(fields[2])):
                Path(part.path).unlink(missing_ok=True)  # its writer died
                continue
            num_used += int(fields[0])
        return entries, num_used

    @contextmanager
    def _locked(self):
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class CacheWriter:
    """A shard's copy being written; `commit` makes it visible in one rename, `abort` throws it away."""

    def __init__(self, part: Path, final: Path):
        self.part, self.final = part, final
        self.file = open(part, "wb")  # noqa: SIM115 (closed by commit or abort)
        self.done = False

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # a crash after the rename must not leave a hole in the copy
        self.file.close()
        os.replace(self.part, self.final)
        self.done = True

    def abort(self) -> None:
        if not self.done:
            self.file.close()
            self.part.unlink(missing_ok=True)
            self.done = True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
