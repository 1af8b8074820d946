"""Where the training samples are: `data.train` -> a list of shards with their sample counts.

Each entry of `data.train` is split at `::` and brace-expanded (open_clip's `--train-data` syntax), and
each resulting item is one of
    a folder                 /data/laion, s3://bucket/laion/        its sizes.json's shards, else its *.tar
    a shard                  /data/laion/{00000..00041}.tar, s3://..., gs://..., http(s)://..., file://...
    a command                pipe:aws s3 cp s3://bucket/laion/{00000..00041}.tar -

A shard's sample count comes from, in this order:
    1. `sizes.json` beside it ({shard name: count}; our data prep writes it, open_clip reads it);
    2. img2dataset's and DataComp's `<shard>_stats.json` beside it (its `successes`);
    3. `data.num_samples`, the total the user gives (open_clip's --train-num-samples): what the counted
       shards leave of it is spread evenly over the others.
For a `pipe:` command, "beside it" means beside the first shard URL in the command. Counts are read
where the shards are, remote ones included, concurrently. Every remote store is asked once at start-up,
so a wrong endpoint, bucket or credentials fail here in one line, before any process group exists.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from clip_pipe.data.retry import Retry, ShardUnavailable
from clip_pipe.data.stores import is_pipe, is_remote, local_path, protocol, store_for
from clip_pipe.data.tar import TarError

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SHARD_IN_COMMAND = re.compile(r"\S+?(?:\.tar|\.tar\.gz|\.tgz)(?=\s|$|['\"])")


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int


def expand(specs: list[str]) -> list[str]:
    """`data.train` entries -> items (folders, shard URLs, pipe: commands): split at '::', then braces."""
    items = []
    for spec in specs:
        for part in str(spec).split("::"):
            part = part.strip()
            if part:
                items.extend(braceexpand(part))
    return items


def list_shards(
    specs: list[str],
    num_samples: int | None = None,
    timeout_s: float = 30.0,
    retry: Retry | None = None,
    known_counts: dict[str, int] | None = None,
) -> list[Shard]:
    """The shards `specs` name, with their sample counts; a `ValueError` in one line if any cannot be
    found or counted. `known_counts` ({shard URL: samples}, `data.counts_file`) are taken first. `retry`
    governs the start-up reads (by default, three tries in about two seconds)."""
    lister = _Lister(timeout_s, retry or Retry(num_retries=2, base_s=0.5))
    urls, counts, _ = _gather(specs, lister, known_counts or {})

    uncounted = [u for u in urls if u not in counts]
    if uncounted:
        if num_samples is None:
            raise ValueError(
                f"{len(uncounted)} of {len(urls)} shards have no sample count (e.g. {uncounted[0]}): put a "
                "sizes.json ({shard name: count}, as data_prep writes and open_clip reads) or img2dataset's "
                "<shard>_stats.json files beside them, or set data.num_samples to the total number of samples"
            )
        counted = sum(counts[u] for u in urls if u in counts)
        remainder = num_samples - counted
        if remainder < len(uncounted):
            raise ValueError(
                f"data.num_samples ({num_samples}) leaves {remainder} samples for the {len(uncounted)} shards "
                f"without a count (those with one hold {counted}); set it to the total number of samples"
            )
        base, extra = divmod(remainder, len(uncounted))
        counts |= {url: base + (i < extra) for i, url in enumerate(uncounted)}
        log.info(
            "%d shards without a count file: data.num_samples gives them %d samples each",
            len(uncounted),
            base,
        )
    elif num_samples is not None:
        log.info("data.num_samples (%d) is not used: every shard's count is in a file", num_samples)

    # Data prep fixes shard numbers by input position, so a shard whose rows were all rejected holds no
    # samples; a loader slot given only such shards would read nothing.
    shards = [Shard(url, counts[url]) for url in urls if counts[url] > 0]
    if not shards:
        raise ValueError(f"no samples in {specs}")
    return shards


def _gather(
    specs: list[str], lister: _Lister, known_counts: dict[str, int]
) -> tuple[list[str], dict[str, int], dict[str, str]]:
    """The shard URLs `specs` name, the counts their files give (or `known_counts`), and for each shard
    (or pipe: command) the URL its count files sit beside."""
    urls: list[str] = []
    counts: dict[str, int] = {}  # from known_counts, sizes.json or *_stats.json
    count_at: dict[str, str] = {}
    for item in expand(specs):
        if is_pipe(item):
            _check_command(item)
            urls.append(item)
            match = _SHARD_IN_COMMAND.search(item.removeprefix("pipe:"))
            if match:
                count_at[item] = match.group(0).strip("'\"")
        elif item.endswith(TAR_SUFFIXES):
            urls.append(item)
            count_at[item] = item
        else:
            folder_urls, folder_counts = lister.folder(item)
            urls += folder_urls
            counts |= folder_counts
            count_at |= {url: url for url in folder_urls}
    for url in urls:
        if count_at.get(url) in known_counts:
            counts[url] = known_counts[count_at[url]]
    lister.probe(u for u in urls if u in count_at and not is_pipe(u))  # known counts or not
    counts |= lister.counts([count_at[u] for u in urls if u in count_at and u not in counts])
    for url in urls:
        if url not in counts and count_at.get(url) in counts:  # a pipe: command, counted by its shard
            counts[url] = counts[count_at[url]]
    return urls, counts, count_at


def count_shards(specs: list[str], timeout_s: float = 30.0, num_threads: int = 16) -> dict[str, int]:
    """{shard URL: samples} for every shard `specs` name: from the sizes.json or *_stats.json beside it
    (read concurrently), else counted by reading the shard itself (`num_threads` at once). For a pipe:
    command, the URL is its shard's."""
    from concurrent.futures import ThreadPoolExecutor

    from clip_pipe.data.open import ShardReader

    lister = _Lister(timeout_s, Retry(num_retries=2, base_s=0.5))
    urls, counts, count_at = _gather(specs, lister, {})
    uncounted = [u for u in urls if u not in counts]

    def read(url: str) -> int:
        reader = ShardReader(num_fetches=2, timeout_s=timeout_s)
        try:
            return sum(1 for _ in reader.samples(url))
        except (OSError, TarError) as exn:
            raise ValueError(f"{url}: cannot be counted: {exn}") from None
        finally:
            reader.close()

    if uncounted:
        log.info("%d shards have no count file: reading them to count their samples", len(uncounted))
        with ThreadPoolExecutor(num_threads) as pool:
            counts |= dict(zip(uncounted, pool.map(read, uncounted), strict=True))
    return {count_at.get(url, url): counts[url] for url in urls}


def write_counts(counts: dict[str, int], out: str | None = None, timeout_s: float = 30.0) -> list[str]:
    """Writes `count_shards`' counts: to `out` as {shard URL: samples} (`data.counts_file` reads it), or
    else as a sizes.json beside the shards of each folder (merged into one already there), which every
    run then reads in one request per folder, and open_clip reads too. Returns what was written."""
    if out is not None:
        Path(out).write_text(json.dumps(dict(sorted(counts.items())), indent=0) + "\n")
        return [out]
    by_folder: dict[str, dict[str, int]] = {}
    for url, num in counts.items():
        by_folder.setdefault(_dirname(url), {})[posixpath.basename(url)] = num
    lister = _Lister(timeout_s, Retry(num_retries=2, base_s=0.5))
    written = []
    for folder, sizes in by_folder.items():
        merged = (lister.sizes_json(folder) or {}) | sizes
        target, raw = _join(folder, "sizes.json"), json.dumps(dict(sorted(merged.items())), indent=0).encode()
        if is_remote(folder):
            lister._call(
                target, lambda target=target, raw=raw: store_for(target, timeout_s).write(target, raw)
            )
        else:
            path = Path(target)
            path.with_suffix(".json.tmp").write_bytes(raw)
            path.with_suffix(".json.tmp").replace(path)
        written.append(target)
    return written


def read_counts_file(path: str) -> dict[str, int]:
    """`data.counts_file`: {shard URL: samples}, as `clip-pipe count-shards --out` writes it."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exn:
        raise ValueError(f"data.counts_file: {exn}") from None
    counts = _parse_json(raw, path)
    if not isinstance(counts, dict) or not all(isinstance(n, int) for n in counts.values()):
        raise ValueError(
            f"{path}: not a counts file ({{shard URL: samples}}, as clip-pipe count-shards writes)"
        )
    return counts


def _check_command(item: str) -> None:
    words = shlex.split(item.removeprefix("pipe:"))
    if not words:
        raise ValueError(f"{item!r}: an empty pipe: command")
    if not shutil.which(words[0]):
        raise ValueError(f"{item}: {words[0]!r} is not an installed command")


def _dirname(url: str) -> str:
    return posixpath.dirname(url) if is_remote(url) else os.path.dirname(local_path(url))


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if is_remote(folder) else os.path.join(local_path(folder), name)


def _stats_name(shard_url: str) -> str:
    name = posixpath.basename(shard_url)
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + "_stats.json"
    raise AssertionError(shard_url)


class _Lister:
    """Reads folders and count files at start-up, turning every failure into one line."""

    def __init__(self, timeout_s: float, retry: Retry):
        self.timeout_s, self.retry = timeout_s, retry
        self.sizes: dict[str, dict | None] = {}  # folder -> its sizes.json, if it has one

    def folder(self, folder: str) -> tuple[list[str], dict[str, int]]:
        """A folder's shards and the counts its sizes.json gives (`counts` reads the *_stats.json)."""
        if not is_remote(folder):
            path = Path(local_path(folder))
            if not path.is_dir():
                raise ValueError(f"{folder}: no such folder (or shard: shard names end in .tar)")
            names = sorted(p.name for p in path.iterdir() if p.is_file())
        else:
            names = None  # listed only if there is no sizes.json (an HTTP folder cannot be)
        sizes = self.sizes_json(folder)
        if sizes is not None:
            if names is not None:
                for name in sizes:
                    if name not in names:
                        raise ValueError(f"{folder}: sizes.json lists {name}, which does not exist")
            urls = [_join(folder, name) for name in sorted(sizes)]
            return urls, {url: int(sizes[name]) for url, name in zip(urls, sorted(sizes), strict=True)}
        if names is None:
            names = sorted(self._call(folder, lambda: store_for(folder, self.timeout_s).list(folder)))
        shard_names = [n for n in names if n.endswith(TAR_SUFFIXES)]
        if not shard_names:
            raise ValueError(f"{folder}: no sizes.json and no *.tar files; is this a folder of shards?")
        return [_join(folder, n) for n in shard_names], {}

    def sizes_json(self, folder: str) -> dict | None:
        if folder not in self.sizes:
            raw = self._read([_join(folder, "sizes.json")]).get(_join(folder, "sizes.json"))
            self.sizes[folder] = None if raw is None else _parse_json(raw, _join(folder, "sizes.json"))
        return self.sizes[folder]

    def probe(self, urls) -> None:
        """Ask each remote folder's store for its first shard: a wrong endpoint, credentials or path
        fail now, once, rather than as every shard lost during training. Local shards must exist."""
        seen = set()
        for url in urls:
            if not is_remote(url):
                if not os.path.isfile(local_path(url)):
                    raise ValueError(f"{url}: no such shard")
            elif _dirname(url) not in seen:
                seen.add(_dirname(url))
                self._call(url, lambda url=url: store_for(url, self.timeout_s).size(url))

    def counts(self, shard_urls: list[str]) -> dict[str, int]:
        """Sample counts of shards (given by URL) from the sizes.json or *_stats.json beside them."""
        counts, by_stats = {}, {}
        for url in dict.fromkeys(shard_urls):
            sizes = self.sizes_json(_dirname(url))
            name = posixpath.basename(url)
            if sizes is not None and name in sizes:
                counts[url] = int(sizes[name])
            else:
                by_stats[_join(_dirname(url), _stats_name(url))] = url
        found = self._read_stats(list(by_stats))
        counts |= {by_stats[stats]: n for stats, n in found.items()}
        return counts

    def _read_stats(self, stats_urls: list[str]) -> dict[str, int]:
        found = {}
        for url, raw in self._read(stats_urls).items():
            if raw is not None:
                stats = _parse_json(raw, url)
                if not isinstance(stats, dict) or not isinstance(stats.get("successes"), int):
                    raise ValueError(f"{url}: no 'successes' count in it; is it img2dataset's stats file?")
                found[url] = stats["successes"]
        return found

    def _read(self, urls: list[str]) -> dict[str, bytes | None]:
        """Whole small files; None for those that do not exist. Remote ones are read concurrently,
        and those that fail transiently are read again."""
        results: dict[str, bytes | None] = {}
        by_store: dict[str, list[str]] = {}
        for url in urls:
            if is_remote(url):
                by_store.setdefault(protocol(url), []).append(url)
            else:
                path = Path(local_path(url))
                results[url] = path.read_bytes() if path.is_file() else None
        for group in by_store.values():
            store = store_for(group[0], self.timeout_s)
            pending = list(group)

            def read_pending(store=store) -> None:
                nonlocal pending
                for url, value in store.read_many(pending).items():
                    if isinstance(value, FileNotFoundError):
                        results[url] = None
                    elif isinstance(value, Exception):
                        raise value
                    else:
                        results[url] = value
                pending = [u for u in pending if u not in results]

            self._call(pending[0], read_pending)
        return results

    def _call(self, url: str, fn):
        try:
            return self.retry(fn, url)
        except ShardUnavailable as exn:
            raise startup_error(url, exn) from None


def startup_error(url: str, exn: ShardUnavailable) -> ValueError:
    """A start-up read that failed, in one line with what to check."""
    cause = exn.__cause__
    message = str(exn)
    if is_remote(url) and protocol(url) in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f" at {endpoint} (AWS_ENDPOINT_URL)" if endpoint else ""
        credentials = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials"
        if isinstance(cause, PermissionError):
            return ValueError(f"{message}: access denied{where}; check the credentials ({credentials})")
        if "credentials" in message.lower():
            return ValueError(f"{message}: no credentials found; set them ({credentials})")
        if exn.transient:
            return ValueError(f"{message}: cannot reach the S3 endpoint{where}; check AWS_ENDPOINT_URL")
    if isinstance(cause, PermissionError):
        return ValueError(f"{message}: access denied; check the credentials")
    if isinstance(cause, FileNotFoundError):
        return ValueError(f"{message}: not found")
    if exn.transient:
        return ValueError(f"{message}: cannot reach the server")
    return ValueError(message)


def _parse_json(raw: bytes, url: str):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"{url}: not valid JSON ({exn})") from None


@dataclass(frozen=True)
class Source:
    """A weighted set of shards. `name` (its shard sets, joined with '::') finds its streams' places in
    a checkpoint."""

    name: str
    shards: list[Shard]
    weight: float


def list_sources(configs: list, timeout_s: float = 30.0, counts_file: str | None = None) -> list[Source]:
    """`data.source_list` (entries with `train`, `weight` and `num_samples`) -> sources with their shards;
    `counts_file` (`data.counts_file`) gives counts before any file beside the shards is read."""
    known = read_counts_file(counts_file) if counts_file else None
    sources = [
        Source(
            "::".join(c.train), list_shards(c.train, c.num_samples, timeout_s, known_counts=known), c.weight
        )
        for c in configs
    ]
    names = [s.name for s in sources]
    if len(set(names)) < len(names):
        raise ValueError(f"data.sources names the same shard sets twice: {names}")
    return sources
