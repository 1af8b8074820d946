"""Re-read a shard folder and check it against its own records: every shard, member and image."""

import csv
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from clip_pipe.prep.images import DEFAULT_MAX_PIXELS

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ROW_TABLES = {"rejected": "num_rejected", "failed": "num_failed", "duplicates": "num_duplicates"}


@dataclass
class Report:
    out_dir: Path
    num_shards: int = 0
    num_samples: int = 0
    num_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = (
            f"{self.out_dir}: {self.num_shards} shards, {self.num_samples} samples, "
            f"{self.num_bytes / 2**20:.1f} MiB: "
        )
        if not self.problems:
            return head + "OK"
        lines = [head + f"{len(self.problems)} problems"] + [f"  {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more")
        return "\n".join(lines)


def verify_dataset(out_dir: str | Path) -> Report:
    out_dir = Path(out_dir)
    report = Report(out_dir)
    problem = report.problems.append
    try:
        sizes = json.loads((out_dir / "sizes.json").read_text())
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        problem(f"cannot read sizes.json / manifest.json: {e}")
        return report

    listed = {s["name"]: s for s in manifest.get("shards", [])}
    if sorted(listed) != sorted(sizes):
        problem("manifest.json and sizes.json list different shards")
    name_format = manifest.get("shard_format")
    if name_format and sorted(sizes) != [name_format.format(i) for i in range(len(sizes))]:
        problem(f"shard numbers are not dense 0..{len(sizes) - 1}: {sorted(sizes)[:5]} ...")
    for path in sorted(out_dir.glob("*.tar")):
        if path.name not in sizes:
            problem(f"{path.name} is not listed in sizes.json")
    for path in sorted(out_dir.glob(".*.tmp")):
        problem(f"{path.name}: a temporary file left by an unfinished run")

    captions = manifest.get("encode", {}).get("captions", True)
    max_pixels = manifest.get("encode", {}).get("max_pixels", DEFAULT_MAX_PIXELS)
    seen_keys: dict[str, str] = {}
    for name in sorted(sizes):
        report.num_shards += 1
        path = out_dir / name
        if not path.is_file():
            problem(f"{name}: listed but missing")
            continue
        data = path.read_bytes()
        report.num_bytes += len(data)
        expected = listed.get(name, {})
        if expected and (expected.get("bytes"), expected.get("sha256")) != (
            len(data),
            hashlib.sha256(data).hexdigest(),
        ):
            problem(f"{name}: size or sha256 differs from manifest.json (truncated or modified)")
        if len(data) % tarfile.BLOCKSIZE or data[-2 * tarfile.BLOCKSIZE :].count(0) != 2 * tarfile.BLOCKSIZE:
            problem(f"{name}: truncated (no end-of-archive marker)")
        num_samples = check_shard(name, data, captions, max_pixels, seen_keys, problem)
        report.num_samples += num_samples
        if num_samples != sizes[name]:
            problem(f"{name}: holds {num_samples} samples, sizes.json says {sizes[name]}")
        if expected and expected.get("num_samples") != num_samples:
            problem(f"{name}: holds {num_samples} samples, manifest.json says {expected.get('num_samples')}")

    if manifest.get("num_written") != report.num_samples:
        problem(
            f"manifest.json says {manifest.get('num_written')} written, the shards hold {report.num_samples}"
        )
    num_accounted = report.num_samples
    for table, key in ROW_TABLES.items():
        if key not in manifest:
            continue
        num_accounted += manifest[key]
        try:
            with open(out_dir / f"{table}.csv", newline="", encoding="utf-8") as f:
                num_listed = sum(1 for _ in csv.reader(f)) - 1
        except OSError as e:
            problem(f"cannot read {table}.csv: {e}")
            continue
        if num_listed != manifest[key]:
            problem(f"{table}.csv lists {num_listed} rows, manifest.json says {manifest[key]}")
    if "num_duplicates" in manifest and num_accounted != manifest.get("num_rows"):
        problem(f"{manifest.get('num_rows')} input rows, but {num_accounted} are accounted for")
    return report


def check_shard(name, data: bytes, captions: bool, max_pixels: int, seen_keys: dict, problem) -> int:
    """Members grouped by key, keys unique across the dataset, every sample complete and decodable."""
    samples: dict[str, dict[str, bytes]] = {}
    previous = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not ext or not member.isfile():
                    problem(f"{name}: member {member.name!r} is not a key.ext file")
                    continue
                if key != previous and key in samples:
                    problem(f"{name}: the files of sample {key} are not contiguous")
                previous = key
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        problem(f"{name}: unreadable tar ({type(e).__name__}: {e})")
    for key, fields in samples.items():
        if key in seen_keys:
            problem(f"{name}: key {key} also appears in {seen_keys[key]}")
        seen_keys[key] = name
        images = [ext for ext in IMAGE_EXTENSIONS if ext in fields]
        if not images:
            problem(f"{name}: sample {key} has no image")
            continue
        if captions and "txt" not in fields and "cls" not in fields:
            problem(f"{name}: sample {key} has no txt")
        try:
            with Image.open(io.BytesIO(fields[images[0]])) as image:
                if image.width * image.height > max_pixels:
                    raise ValueError(f"{image.width}x{image.height} is over {max_pixels} pixels")
                image.load()
        except Exception as e:  # any decoder error means a broken sample
            problem(f"{name}: sample {key}'s image does not decode ({type(e).__name__}: {e})")
    return len(samples)
