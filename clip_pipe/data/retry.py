"""What to do when a request for shard bytes fails: retry it (transient) or give the shard up (permanent).

Every request the loader makes (start-up reads, heads, byte ranges) goes through `Retry`, the one place
that decides, the same for every store: a reset or refused connection, a timeout, a 5xx, 408 or 429, a
body cut short are retried with jittered exponential backoff; a 404, 403, other 4xx or a shard that
changed are not. A shard that cannot be had raises `ShardUnavailable`, an `OSError`, which the stream
counts as lost samples, as it does a truncated tar's.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


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
