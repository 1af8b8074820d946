"""Image downloads over HTTP(S): timeouts, retries with backoff, capped redirects, capped size."""

import time
from dataclasses import dataclass

import httpx

from clip_pipe.prep.images import Rejected

USER_AGENT = "clip-pipe-prep/0.1 (+https://github.com/clip-pipe)"


class DownloadFailed(Exception):
    """A download that did not produce the file (network error, HTTP error status, timeout).
    Unlike Rejected, trying again later may succeed; `--retry-failed` re-attempts exactly these rows."""


@dataclass(frozen=True)
class DownloadConfig:
    timeout: float = 10.0  # seconds for the whole download of one attempt, connect included
    num_retries: int = 2  # further attempts after a timeout, a connection error, HTTP 429 or 5xx
    backoff: float = 1.0  # seconds before the first retry, doubled for each further one
    max_redirects: int = 5
    max_bytes: int = 32 << 20  # larger files are rejected while streaming, before they fill memory

    def __post_init__(self):
        if self.timeout <= 0 or self.num_retries < 0 or self.backoff < 0 or self.max_bytes < 1:
            raise ValueError(f"invalid download settings: {self}")


def make_client(cfg: DownloadConfig, num_threads: int) -> httpx.Client:
    limits = httpx.Limits(max_connections=num_threads, max_keepalive_connections=num_threads)
    return httpx.Client(
        follow_redirects=True,
        max_redirects=cfg.max_redirects,
        timeout=cfg.timeout,
        limits=limits,
        headers={"User-Agent": USER_AGENT},
    )


def download(client: httpx.Client, url: str, cfg: DownloadConfig) -> bytes:
    """The body at `url`, or DownloadFailed (worth retrying later) or Rejected (never worth it)."""
    if not url.startswith(("http://", "https://")):
        raise Rejected(f"not an http(s) URL: {url[:100]!r}")
    for attempt in range(cfg.num_retries + 1):
        try:
            return _download_once(client, url, cfg)
        except _Transient as e:
            if attempt == cfg.num_retries:
                raise DownloadFailed(str(e)) from None
            time.sleep(cfg.backoff * 2**attempt)
    raise AssertionError("unreachable")


class _Transient(Exception):
    pass


def _download_once(client: httpx.Client, url: str, cfg: DownloadConfig) -> bytes:
    # httpx's timeout bounds each network operation; a server that trickles bytes needs a deadline too.
    deadline = time.monotonic() + cfg.timeout
    try:
        with client.stream("GET", url) as response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise _Transient(f"HTTP {status}")
            if status >= 400:
                raise DownloadFailed(f"HTTP {status}")
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > cfg.max_bytes:
                raise Rejected(f"download is {length} bytes, over the limit of {cfg.max_bytes}")
            chunks, num_bytes = [], 0
            for chunk in response.iter_bytes():
                num_bytes += len(chunk)
                if num_bytes > cfg.max_bytes:
                    raise Rejected(f"download is over the limit of {cfg.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise _Transient(f"timed out after {cfg.timeout} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TooManyRedirects:
        raise DownloadFailed(f"more than {cfg.max_redirects} redirects") from None
    except httpx.TimeoutException:
        raise _Transient(f"timed out after {cfg.timeout} s") from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
        raise Rejected(f"invalid URL: {e}") from None
    except httpx.TransportError as e:  # connection refused or reset, DNS failure, broken chunking
        raise _Transient(f"{type(e).__name__}: {e}") from None
