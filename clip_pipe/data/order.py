"""The order in which samples are read: which shards each loader slot reads, epoch by epoch, and how
far each slot has got (the resumable position). Pure functions of seeds and counts; no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def assign_shards(
    num_shards: int, slot: int, num_slots: int, seed: int, epoch: int
) -> list[tuple[int, int, int]]:
    """This slot's work for one epoch: (shard index, part, num_parts) triples.

    A slot reads samples `i` of its shard with `i % num_parts == part`. Shards are split into parts
    only when there are fewer shards than slots, so that every slot gets work.
    """
    assert 0 <= slot < num_slots and num_shards > 0
    num_parts = -(-num_slots // num_shards)  # ceil
    order = list(range(num_shards))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    pieces = [(shard, part, num_parts) for part in range(num_parts) for shard in order]
    return pieces[slot::num_slots]


@dataclass(frozen=True)
class SlotPosition:
    """How far one loader slot has read: `num_read` samples of epoch `epoch`'s shuffled order."""

    epoch: int = 0
    num_read: int = 0


def seed_of(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % 2**63
    return value


@dataclass
class LoaderPosition:
    """One rank's place in its data: batches the trainer has taken, and each loader worker's slot position.

    Workers run ahead of the trainer (prefetch), so this is advanced from the batches actually consumed,
    in the trainer's process, never from what the workers have read.
    """

    num_batches: int = 0
    workers: list[SlotPosition] = field(default_factory=lambda: [SlotPosition()])

    @classmethod
    def start(cls, num_workers: int) -> LoaderPosition:
        return cls(0, [SlotPosition()] * max(1, num_workers))

    def advance(self, batch: dict) -> None:
        self.num_batches += 1
        self.workers[batch["worker"]] = SlotPosition(*batch["position"])

    def to_dict(self) -> dict:
        return {"num_batches": self.num_batches, "workers": [[p.epoch, p.num_read] for p in self.workers]}

    @classmethod
    def from_dict(cls, state: dict) -> LoaderPosition:
        return cls(int(state["num_batches"]), [SlotPosition(int(e), int(n)) for e, n in state["workers"]])
