"""Where this process sits in the job, read from the launcher's environment. No collectives here.

`deepspeed`, `torchrun` and `srun` each describe a rank with environment variables; a plain
`python launch/train.py` has none, and is a one-rank job.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def __post_init__(self):
        assert 0 <= self.rank < self.world_size, self
        assert 0 <= self.local_rank < self.local_world_size, self

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_os(environ: dict | None = None) -> DistEnv:
    """Read rank and world size as set by deepspeed/torchrun (RANK...), else srun (SLURM_*), else 1 rank."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", 0))
        # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
        local_world_size = int(environ.get("LOCAL_WORLD_SIZE", environ.get("LOCAL_SIZE", world_size)))
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank, world_size = int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"])
        local_rank = int(environ.get("SLURM_LOCALID", 0))
        local_world_size = int(environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    else:
        rank, world_size, local_rank, local_world_size = 0, 1, 0, 1
    # Some launchers omit LOCAL_WORLD_SIZE; a local rank can never exceed it.
    return DistEnv(rank, world_size, local_rank, max(local_world_size, local_rank + 1))


def export_env(env: DistEnv, environ: dict | None = None) -> None:
    """Fill in the variables torch.distributed's env:// init needs but a launcher did not set.

    Without them DeepSpeed falls back to MPI discovery (and wants mpi4py) in a plain `python` run.
    """
    environ = os.environ if environ is None else environ
    environ.setdefault("RANK", str(env.rank))
    environ.setdefault("WORLD_SIZE", str(env.world_size))
    environ.setdefault("LOCAL_RANK", str(env.local_rank))
    environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_world_size))
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in environ:
        assert env.world_size == 1, "a multi-rank launcher must set MASTER_PORT"
        environ["MASTER_PORT"] = str(free_port())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(env: DistEnv, requested: int = 0) -> int:
    """Intra-op threads for this rank: requested, or the node's cores split between its ranks.

    Oversubscribed CPU ranks (each one defaulting to every core) run several times slower.
    """
    if requested:
        return requested
    num_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, num_cores // env.local_world_size)
