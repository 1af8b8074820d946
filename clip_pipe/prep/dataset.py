"""Resumable, atomic, deterministic sharding of a stream of Rows (local files, bytes or URLs).

Shard i holds the accepted rows among input rows [i * shard_size, (i + 1) * shard_size). Shard numbers are
therefore fixed by input position alone: any process, on any node, can build any shard without talking
to the others, a rerun knows exactly which shards are missing, and the numbering is dense whatever fails.
A shard can hold fewer than shard_size samples (rejects, duplicates), never more.

OUT/job.json                   the settings that fix the output; a rerun with other settings is refused
OUT/shard-000000.tar ...       written under a temporary name, renamed when complete
OUT/shard-000000.stats.json    each row's outcome; renamed after its tar, so it marks the shard done
OUT/sizes.json, manifest.json  written last, once every shard is done (finalize)
OUT/rejected.csv, failed.csv, duplicates.csv

Dedup needs the whole input in order ("first occurrence wins"), so it runs in finalize, a single pass
over the stats files in shard order: deterministic, and repeatable after a kill, since it only drops
members from shards and recomputes everything from the stats files.
"""

import concurrent.futures
import contextlib
import csv
import hashlib
import importlib.metadata
import itertools
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import asdict, dataclass
from pathlib import Path

import PIL
from tqdm import tqdm

from clip_pipe.prep.fetch import DownloadConfig, DownloadFailed, download, make_client
from clip_pipe.prep.images import Rejected, read_source, resolve_inside
from clip_pipe.prep.samples import (
    EncodeConfig,
    Rejection,
    Row,
    Sample,
    check_caption,
    encode_row,
    parse_label,
)
from clip_pipe.prep.writer import PrepSummary, ShardInfo, tar_blocks

FORMAT_VERSION = 2
DEDUP_MODES = ("exact", "image", "none")
END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)


@dataclass(frozen=True)
class ShardTask:
    index: int
    name: str
    rows: list[Row]
    retry: bool  # re-attempt only the failed downloads of a finished shard


def build_dataset(
    rows: Iterable[Row],
    out_dir: str | Path,
    cfg: EncodeConfig,
    *,
    shard_size: int = 1000,
    shard_format: str = "shard-{:06d}.tar",
    dedup: str = "exact",
    num_workers: int = 1,
    num_threads: int = 16,
    download_cfg: DownloadConfig = DownloadConfig(),  # noqa: B008 (frozen, so sharing it is safe)
    retry_failed: bool = False,
    task_index: int = 0,
    num_tasks: int = 1,
    num_rows: int | None = None,
    inputs: Mapping[str, object] | None = None,
    args: Mapping[str, object] | None = None,
) -> PrepSummary | None:
    """Shard `rows` (numbered 0, 1, 2 ... in order) into `out_dir`, resuming whatever an earlier run of
    the same job left. Shards whose number is `task_index` modulo `num_tasks` are this call's; with
    `num_tasks` 1 it also finalizes (dedup, sizes.json, manifest) and returns the summary, otherwise it
    returns None and a later single-task run of the same command finalizes. `shard_format` numbers
    the shard names. `inputs` describe the input (files, columns, counts) in job.json, so a rerun on
    other input is refused; `args` are recorded in the manifest. `num_rows` sizes the progress bar
    (default: len(rows), if it has one)."""
    if shard_size < 1 or num_workers < 1 or num_threads < 1:
        raise ValueError("shard_size, num_workers and num_threads must be at least 1")
    if dedup not in DEDUP_MODES:
        raise ValueError(f"dedup must be one of {DEDUP_MODES}, got {dedup!r}")
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task {task_index} is not in [0, {num_tasks})")
    first_name = shard_format.format(0)
    if Path(first_name).name != first_name or not first_name.endswith(".tar") or first_name == shard_format:
        raise ValueError(
            f"shard_format {shard_format!r} must number plain .tar file names, e.g. 'shard-{{:06d}}.tar'"
        )
    if num_rows is None and isinstance(rows, Sized):
        num_rows = len(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "format_version": FORMAT_VERSION,
        "encode": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "shard_size": shard_size,
        "shard_format": shard_format,
        "dedup": dedup,
        "inputs": dict(inputs or {}),
    }
    check_job(out_dir, job)

    num_shards = 0
    context = (cfg, download_cfg, num_threads, str(out_dir))
    progress = tqdm(total=num_rows, desc=f"sharding {out_dir}", unit="row", smoothing=0.05)
    with progress, WorkerPool(num_workers, context, progress) as submit:
        for index, shard_rows in enumerate(batched(rows, shard_size)):
            num_shards += 1
            assert shard_rows[0].index == index * shard_size, "rows must be numbered 0, 1, 2 ... in order"
            name = shard_format.format(index)
            stats_path = out_dir / stats_name(name)
            if index % num_tasks != task_index:
                progress.update(len(shard_rows))
            elif not stats_path.exists():
                submit(ShardTask(index, name, shard_rows, retry=False))
            elif retry_failed and json.loads(stats_path.read_text())["failed"]:
                submit(ShardTask(index, name, shard_rows, retry=True))
            else:  # finished by an earlier run
                progress.update(len(shard_rows))
    if num_tasks > 1:
        return None
    return finalize(out_dir, shard_format, num_shards, dedup, job, args)


def check_job(out_dir: Path, job: dict):
    path = out_dir / "job.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(job)):
            differing = sorted(k for k in job.keys() | old.keys() if old.get(k) != job.get(k))
            raise ValueError(
                f"{out_dir} holds a dataset made with other settings ({', '.join(differing)} differ); "
                "rerun with the same input and flags to resume it, or choose another output directory"
            )
        return
    if any(out_dir.glob("*.tar")) or (out_dir / "manifest.json").exists():
        raise ValueError(f"{out_dir} already holds shards; remove them or choose another output directory")
    write_atomic(path, json.dumps(job, indent=2).encode())


def batched(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def stats_name(shard_name: str) -> str:
    return shard_name.removesuffix(".tar") + ".stats.json"


def write_atomic(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: orphans never share one
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- the workers ---------------------------------------------------------------------------------

_worker: dict = {}  # per process: settings, a thread pool and an HTTP client


def init_worker(cfg: EncodeConfig, download_cfg: DownloadConfig, num_threads: int, out_dir: str):
    _worker.update(
        cfg=cfg,
        download_cfg=download_cfg,
        out_dir=Path(out_dir),
        threads=concurrent.futures.ThreadPoolExecutor(num_threads),
        client=make_client(download_cfg, num_threads),
    )


class WorkerPool:
    """submit(task) runs a ShardTask in `num_workers` processes (1: this one), keeping at most two tasks
    per process in flight, so reading the input never runs ahead of the work. Finished rows advance
    `progress`."""

    def __init__(self, num_workers: int, context: tuple, progress: tqdm):
        self.num_workers, self.context, self.progress = num_workers, context, progress
        self.pending: set[concurrent.futures.Future] = set()

    def __enter__(self):
        if self.num_workers == 1:
            init_worker(*self.context)
            self.executor = None
        else:
            self.executor = concurrent.futures.ProcessPoolExecutor(
                self.num_workers, initializer=init_worker, initargs=self.context
            )
        return self.submit

    def submit(self, task: ShardTask):
        if self.executor is None:
            run_shard(task)
            self.progress.update(len(task.rows))
            return
        future = self.executor.submit(run_shard, task)
        future.num_rows = len(task.rows)
        self.pending.add(future)
        if len(self.pending) >= 2 * self.num_workers:
            self._collect(concurrent.futures.FIRST_COMPLETED)

    def _collect(self, when: str):
        done, self.pending = concurrent.futures.wait(self.pending, return_when=when)
        for future in done:
            future.result()  # a worker's bug surfaces here
            self.progress.update(future.num_rows)

    def __exit__(self, exc_type, *_):
        if self.executor is None:
            _worker["threads"].shutdown()
            _worker["client"].close()
            return
        if exc_type is None and self.pending:
            self._collect(concurrent.futures.ALL_COMPLETED)
        self.executor.shutdown(cancel_futures=exc_type is not None)


def run_shard(task: ShardTask):
    """Build one shard and its stats file; both appear (by rename) only when complete."""
    out_dir: Path = _worker["out_dir"]
    stats_path = out_dir / stats_name(task.name)
    old = json.loads(stats_path.read_text()) if task.retry else None
    if old is None:
        todo, kept_members = task.rows, {}
        outcome_of = {}
    else:
        failed = {r["index"] for r in old["failed"]}
        todo = [row for row in task.rows if row.index in failed]
        kept_members = read_members(out_dir / task.name)
        outcome_of = {r["index"]: ("written", r) for r in old["written"]}
        outcome_of.update({r["index"]: ("rejected", r) for r in old["rejected"]})
    for row, outcome in zip(todo, _worker["threads"].map(process_row, todo), strict=True):
        outcome_of[row.index] = outcome

    stats = {"name": task.name, "first_row": task.rows[0].index, "num_rows": len(task.rows)}
    stats.update(written=[], rejected=[], failed=[])
    tmp = out_dir / f".{task.name}.{os.getpid()}.tmp"
    digest, num_bytes = hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        for row in task.rows:
            kind, record = outcome_of[row.index]
            stats[kind].append(record)
            if kind != "written":
                continue
            blocks = record.pop("blocks", None)
            if blocks is None:  # kept from the earlier run; absent if finalize dropped it as a duplicate
                blocks = kept_members.get(row.key, b"")
            f.write(blocks)
            digest.update(blocks)
            num_bytes += len(blocks)
        tail = END_OF_ARCHIVE + bytes(-(num_bytes + len(END_OF_ARCHIVE)) % tarfile.RECORDSIZE)
        f.write(tail)
        digest.update(tail)
    stats.update(bytes=num_bytes + len(tail), sha256=digest.hexdigest())
    os.replace(tmp, out_dir / task.name)
    write_atomic(stats_path, json.dumps(stats, ensure_ascii=True).encode())


def process_row(row: Row) -> tuple[str, dict]:
    """(kind, record): "written" with the sample's tar blocks, "rejected" with a reason, or "failed"
    (a download that may succeed another time) with the error."""
    cfg: EncodeConfig = _worker["cfg"]
    record = {"index": row.index, "source": row.source_name, "caption": row.caption}
    try:
        # Cheap checks before any download or file read.
        if cfg.captions:
            check_caption(row.caption, cfg.min_caption_chars)
        if cfg.labels:
            parse_label(row.label, cfg.num_classes)
        data = fetch(row, cfg)
        result = encode_row(row, cfg, data)
    except Rejected as e:
        return "rejected", {**record, "reason": str(e)}
    except DownloadFailed as e:
        return "failed", {**record, "reason": str(e)}
    except UnicodeEncodeError:  # a surrogate-escaped byte in some other text column
        return "rejected", {**record, "reason": "text is not valid UTF-8"}
    if isinstance(result, Rejection):
        return "rejected", {**record, "reason": result.reason}
    caption = result.fields["txt"].decode() if "txt" in result.fields else None
    record.update(caption=caption, sha256=hashlib.sha256(data).hexdigest(), blocks=tar_blocks(result))
    return "written", record


def fetch(row: Row, cfg: EncodeConfig) -> bytes:
    if row.url is not None:
        if not row.url.strip():
            raise Rejected("image URL is missing")
        return download(_worker["client"], row.url.strip(), _worker["download_cfg"])
    if isinstance(row.image, bytes):
        return row.image
    assert cfg.images_dir is not None, "rows with image paths need EncodeConfig.images_dir"
    return read_source(resolve_inside(Path(cfg.images_dir), row.image))


def read_members(path: Path) -> dict[str, bytes]:
    """key -> the tar blocks of that sample, rebuilt exactly as tar_blocks() made them."""
    fields: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            fields.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {key: tar_blocks(Sample(key, f)) for key, f in fields.items()}


# ---- finalize ------------------------------------------------------------------------------------


def finalize(
    out_dir: Path, name_format: str, num_shards: int, dedup: str, job: dict, args: Mapping | None
) -> PrepSummary:
    """Dedup in input order, then sizes.json, manifest.json and the three row tables. Repeatable: it
    reads only stats files, and dropping a member that is already gone is a no-op."""
    first_seen: dict[bytes, int] = {}  # dedup key -> index of the row that keeps it (memory: ~100 B/row)
    reasons, shards = Counter(), []
    counts = Counter()
    tables = {kind: out_dir / f"{kind}.csv" for kind in ("rejected", "failed", "duplicates")}
    tmp_tables = {kind: path.with_name(f".{path.name}.{os.getpid()}.tmp") for kind, path in tables.items()}
    with contextlib.ExitStack() as stack:
        files = {
            k: stack.enter_context(open(p, "w", newline="", encoding="utf-8", errors="backslashreplace"))
            for k, p in tmp_tables.items()
        }
        writers = {kind: csv.writer(f) for kind, f in files.items()}
        writers["rejected"].writerow(["index", "image", "caption", "reason"])
        writers["failed"].writerow(["index", "image", "caption", "error"])
        writers["duplicates"].writerow(
            ["index", "image", "caption", "duplicate_of_index", "duplicate_of_key"]
        )
        for index in tqdm(range(num_shards), desc="finalizing", unit="shard", disable=num_shards < 100):
            name = name_format.format(index)
            stats_path = out_dir / stats_name(name)
            if not stats_path.exists():
                raise ValueError(f"{out_dir}: shard {name} is not done; rerun the same command to finish it")
            stats = json.loads(stats_path.read_text())
            counts["rows"] += stats["num_rows"]
            for kind in ("rejected", "failed"):
                for r in stats[kind]:
                    writers[kind].writerow([r["index"], r["source"], r["caption"] or "", r["reason"]])
                    counts[kind] += 1
                    if kind == "rejected":
                        reasons[r["reason"]] += 1
            duplicates = set()
            for r in stats["written"]:
                if dedup == "none":
                    continue
                key = hashlib.sha256(f"{r['sha256']}\0{r['caption'] if dedup == 'exact' else ''}".encode())
                kept = first_seen.setdefault(key.digest()[:16], r["index"])
                if kept != r["index"]:
                    duplicates.add(f"{r['index']:09d}")
                    writers["duplicates"].writerow(
                        [r["index"], r["source"], r["caption"], kept, f"{kept:09d}"]
                    )
            counts["duplicates"] += len(duplicates)
            if duplicates:
                shards.append(drop_members(out_dir / name, duplicates))
            else:
                shards.append(ShardInfo(name, len(stats["written"]), stats["bytes"], stats["sha256"]))
    for kind, path in tables.items():
        os.replace(tmp_tables[kind], path)

    num_written = sum(s.num_samples for s in shards)
    total = num_written + counts["rejected"] + counts["duplicates"] + counts["failed"]
    assert total == counts["rows"], "every row is written, rejected, a duplicate, or a failed download"
    write_atomic(
        out_dir / "sizes.json",
        (json.dumps({s.name: s.num_samples for s in shards}, indent=1) + "\n").encode(),
    )
    manifest = {
        "tool": "clip_pipe.prep",
        "tool_version": _package_version(),
        "format_version": FORMAT_VERSION,
        "pillow_version": PIL.__version__,  # JPEG bytes, hence shard hashes, depend on it
        "args": dict(args or {}),
        **job,
        "num_rows": counts["rows"],
        "num_written": num_written,
        "num_rejected": counts["rejected"],
        "num_duplicates": counts["duplicates"],
        "num_failed": counts["failed"],
        "shards": [asdict(s) for s in shards],
    }
    write_atomic(out_dir / "manifest.json", (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    for stale in out_dir.glob(".*.tmp"):  # left by killed processes; every shard is done by now
        stale.unlink(missing_ok=True)
    return PrepSummary(
        out_dir, counts["rows"], num_written, counts["rejected"], shards, reasons,
        num_duplicates=counts["duplicates"], num_failed=counts["failed"],
    )  # fmt: skip


def drop_members(path: Path, keys: set[str]) -> ShardInfo:
    """Rewrite the shard without the samples `keys` (atomically, and only if any is present)."""
    members = read_members(path)
    kept = b"".join(blocks for key, blocks in members.items() if key not in keys)
    tail = END_OF_ARCHIVE + bytes(-(len(kept) + len(END_OF_ARCHIVE)) % tarfile.RECORDSIZE)
    data = kept + tail
    if keys & members.keys():
        write_atomic(path, data)
    num_samples = sum(key not in keys for key in members)
    return ShardInfo(path.name, num_samples, len(data), hashlib.sha256(data).hexdigest())


def _package_version() -> str:
    try:
        return importlib.metadata.version("clip-pipe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
