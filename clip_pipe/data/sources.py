"""Where the training samples are: `data.train` -> a list of shards with their sample counts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int


def list_shards(folders: list[str]) -> list[Shard]:
    """The shards of one or more shard folders, from each folder's `sizes.json`."""
    shards = []
    for folder in map(Path, folders):
        sizes_path = folder / "sizes.json"
        if not sizes_path.is_file():
            raise ValueError(
                f"{folder}: no sizes.json; is this a folder written by data_prep/make_shards.py?"
            )
        sizes = json.loads(sizes_path.read_text())
        for name in sorted(sizes):
            if not (folder / name).is_file():
                raise ValueError(f"{folder}: sizes.json lists {name}, which does not exist")
            # Data prep fixes shard numbers by input position, so a shard whose rows were all rejected
            # holds no samples; a loader slot given only such shards would read nothing.
            if int(sizes[name]) > 0:
                shards.append(Shard(str(folder / name), int(sizes[name])))
    if not shards or sum(s.num_samples for s in shards) == 0:
        raise ValueError(f"no samples in {folders}")
    return shards


@dataclass(frozen=True)
class Source:
    """A weighted set of shards. `name` (its shard sets, joined with '::') finds its streams' places in
    a checkpoint."""

    name: str
    shards: list[Shard]
    weight: float


def list_sources(configs: list) -> list[Source]:
    """`data.source_list` (entries with `train` and `weight`) -> sources with their shards."""
    sources = [Source("::".join(c.train), list_shards(c.train), c.weight) for c in configs]
    names = [s.name for s in sources]
    if len(set(names)) < len(names):
        raise ValueError(f"data.sources names the same shard sets twice: {names}")
    return sources
