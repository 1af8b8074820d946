"""Shard URL -> samples: the one place a training shard is opened.

Today only local paths. This is the seam for remote sources (fsspec, `pipe:`), retries, a local cache
and fetching ahead: the order knows which shards each stream reads next and says so with `prefetch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from clip_pipe.data.tar import tar_samples


class ShardReader:
    """Reads shards by URL, for one loader slot (a worker of a rank); create it in the process that reads."""

    def prefetch(self, urls: Sequence[str]) -> None:
        """A hint: these shards will be read soon, in this order. Local files need no fetching ahead."""

    def samples(self, url: str) -> Iterator[dict]:
        """The samples of the shard at `url`; raises `OSError` or `TarError` where it stops being readable."""
        yield from tar_samples(url)
