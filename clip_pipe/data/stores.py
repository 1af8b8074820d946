"""Byte ranges of remote files, by URL: fsspec for s3:// gs:// and the like, httpx for http(s)://.

A store raises its client's own errors; `Retry` (retry.py) sorts them into transient and permanent.
One store per protocol, timeout, endpoint and process (`store_for`): clients do not survive a fork.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from clip_pipe.data.retry import ShardUnavailable


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://") and not is_pipe(url)


def local_path(url: str) -> str:
    return url.removeprefix("file://")


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


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

    def write(self, url: str, data: bytes) -> None:
        """A small file, whole (`clip-pipe count-shards` writes sizes.json beside the shards)."""
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

    def write(self, url: str, data: bytes) -> None:
        self.fs.pipe_file(url, data)


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

    def write(self, url: str, data: bytes) -> None:
        raise ValueError(f"{url}: cannot write to an HTTP server; write the counts to a local file (--out)")


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
