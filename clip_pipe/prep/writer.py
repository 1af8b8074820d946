"""Deterministic WebDataset shards from Rows, with sizes.json, manifest.json and rejected.csv beside them."""

import collections
import contextlib
import csv
import functools
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path

import PIL
from tqdm import tqdm

from clip_pipe.prep.samples import EncodeConfig, Rejection, Row, Sample, encode_row

FORMAT_VERSION = 1
SHARD_MTIME = 0  # every member gets the same mtime (and TarInfo's uid/gid 0), so reruns are byte-identical


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class PrepSummary:
    out_dir: Path
    num_rows: int
    num_written: int
    num_rejected: int
    shards: list[ShardInfo]
    reasons: collections.Counter = field(default_factory=collections.Counter)  # rejection reason -> count
    num_duplicates: int = 0
    num_failed: int = 0  # downloads that failed (network, HTTP status, timeout); see --retry-failed

    def __str__(self) -> str:
        line = (
            f"{self.out_dir}: {self.num_rows} rows = {self.num_written} written to {len(self.shards)} shards"
            f" + {self.num_rejected} rejected (listed in rejected.csv)"
        )
        if self.num_duplicates or self.num_failed:
            line += (
                f" + {self.num_duplicates} duplicates (duplicates.csv)"
                f" + {self.num_failed} failed downloads (failed.csv)"
            )
        return "\n".join([line] + [f"  {n:>8}  {reason}" for reason, n in self.reasons.most_common(10)])


def tar_blocks(sample: Sample) -> bytes:
    """The tar blocks (USTAR header, data, padding) of one sample's files. Built in the worker
    processes, because tarfile's header code would otherwise bound the single writer process."""
    blocks = []
    for ext, data in sample.fields.items():
        info = tarfile.TarInfo(f"{sample.key}.{ext}")
        info.size, info.mtime, info.mode = len(data), SHARD_MTIME, 0o444
        blocks += [info.tobuf(tarfile.USTAR_FORMAT), data, bytes(-len(data) % tarfile.BLOCKSIZE)]
    return b"".join(blocks)


def encode_row_for_tar(row: Row, cfg: EncodeConfig) -> bytes | Rejection:
    result = encode_row(row, cfg)
    return result if isinstance(result, Rejection) else tar_blocks(result)


class ShardWriter:
    """Tar shards of `shard_size` samples (the last may hold fewer) from tar_blocks() output, each
    written under a temporary name and renamed once complete, so a shard that looks done is done."""

    def __init__(self, out_dir: Path, name_format: str, shard_size: int):
        self.out_dir, self.name_format, self.shard_size = out_dir, name_format, shard_size
        self.shards: list[ShardInfo] = []
        self._file = None
        self._hash = None
        self._num_samples = self._num_bytes = 0

    def write(self, blocks: bytes):
        if self._file is None:
            self._file, self._hash = open(self._tmp_path, "wb"), hashlib.sha256()  # noqa: SIM115
        self._write(blocks)
        self._num_samples += 1
        if self._num_samples == self.shard_size:
            self._finish()

    def _write(self, data: bytes):
        self._file.write(data)
        self._hash.update(data)
        self._num_bytes += len(data)

    @property
    def _path(self) -> Path:
        return self.out_dir / self.name_format.format(len(self.shards))

    @property
    def _tmp_path(self) -> Path:
        return self._path.with_name(self._path.name + ".tmp")

    def _finish(self):
        # End of archive as tarfile writes it: two zero blocks, then zeros up to a whole record.
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self._num_bytes % tarfile.RECORDSIZE))
        self._file.close()
        os.replace(self._tmp_path, self._path)
        self.shards.append(
            ShardInfo(self._path.name, self._num_samples, self._num_bytes, self._hash.hexdigest())
        )
        self._file, self._hash, self._num_samples, self._num_bytes = None, None, 0, 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if self._file is None:
            return
        if exc_type is None:
            self._finish()
        else:  # leave no half-written shard behind
            self._file.close()
            self._tmp_path.unlink()


def write_shards(
    rows: Iterable[Row],
    out_dir: str | Path,
    cfg: EncodeConfig,
    *,
    shard_size: int = 1000,
    shard_format: str = "shard-{:06d}.tar",
    num_workers: int = 1,
    num_rows: int | None = None,
    args: Mapping[str, object] | None = None,
    input_file: str | None = None,
) -> PrepSummary:
    """Validate, normalise and shard `rows`; every row is either written or listed in rejected.csv.

    Writes `out_dir/{shard_format}` shards, `sizes.json` ({shard name: num samples}, as open_clip
    reads it), `manifest.json` and `rejected.csv`. The shards depend only on `rows` and `cfg`, not on
    `num_workers`. `num_rows` sizes the progress bar when `rows` has no len(); `args` and
    `input_file` are recorded in the manifest.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    first_name = shard_format.format(0)
    if Path(first_name).name != first_name or not first_name.endswith(".tar") or first_name == shard_format:
        raise ValueError(
            f"shard_format {shard_format!r} must number plain .tar file names, e.g. 'shard-{{:06d}}.tar'"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob("*.tar")) or (out_dir / "manifest.json").exists():
        # Stale shards from a bigger earlier run would silently join this dataset.
        raise ValueError(f"{out_dir} already holds shards; remove them or choose another output directory")
    if num_rows is None and isinstance(rows, Sized):
        num_rows = len(rows)

    reasons = collections.Counter()
    num_seen = 0
    with (
        encoded(rows, cfg, num_workers, num_rows) as results,
        ShardWriter(out_dir, shard_format, shard_size) as writer,
        open(out_dir / "rejected.csv", "w", newline="", encoding="utf-8") as rejected_file,
    ):
        rejected = csv.writer(rejected_file)
        rejected.writerow(["index", "image", "caption", "reason"])
        for result in tqdm(results, total=num_rows, desc=f"sharding {out_dir}", unit="img", smoothing=0.1):
            num_seen += 1
            if isinstance(result, Rejection):
                caption = "" if result.caption is None else result.caption
                rejected.writerow([result.index, result.source, caption, result.reason])
                reasons[result.reason] += 1
            else:
                writer.write(result)

    num_written = sum(s.num_samples for s in writer.shards)
    num_rejected = sum(reasons.values())
    assert num_written + num_rejected == num_seen, "every row must be written or rejected"
    assert num_rows is None or num_seen == num_rows, f"expected {num_rows} rows, got {num_seen}"

    sizes = {s.name: s.num_samples for s in writer.shards}
    (out_dir / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    manifest = {
        "tool": "clip_pipe.prep",
        "tool_version": _package_version(),
        "format_version": FORMAT_VERSION,
        "pillow_version": PIL.__version__,  # JPEG bytes, hence shard hashes, depend on it
        "args": dict(args or {}),
        "input_file": input_file,
        "encode": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "shard_size": shard_size,
        "num_rows": num_seen,
        "num_written": num_written,
        "num_rejected": num_rejected,
        "shards": [asdict(s) for s in writer.shards],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return PrepSummary(out_dir, num_seen, num_written, num_rejected, writer.shards, reasons)


@contextlib.contextmanager
def encoded(
    rows: Iterable[Row], cfg: EncodeConfig, num_workers: int, num_rows: int | None
) -> Iterator[Iterator[bytes | Rejection]]:
    """encode_row_for_tar over `rows`, in input order, in `num_workers` processes (1: this one)."""
    work = functools.partial(encode_row_for_tar, cfg=cfg)
    if num_workers == 1:
        yield map(work, rows)
        return
    # Big chunks amortise pickling for tiny images; the cap keeps the progress bar moving.
    chunksize = 64 if num_rows is None else max(1, min(64, num_rows // (16 * num_workers)))
    with multiprocessing.Pool(num_workers) as pool:
        yield pool.imap(work, rows, chunksize)


def _package_version() -> str:
    try:
        return importlib.metadata.version("clip-pipe")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"
