"""The tar bytes of one sample, and what a sharding run reports (clip_pipe.prep.dataset writes shards)."""

import collections
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from clip_pipe.prep.samples import Sample

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
