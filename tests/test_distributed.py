"""Rank and world size from each launcher's environment, and the threads each rank gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clip_pipe.distributed import DistEnv, env_from_os, export_env, threads_per_rank


def test_torchrun_environment():
    env = env_from_os({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert env == DistEnv(rank=3, world_size=8, local_rank=1, local_world_size=4)
    assert not env.is_main


def test_deepspeed_launcher_environment_uses_local_size():
    env = env_from_os({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2"})
    assert env == DistEnv(rank=1, world_size=4, local_rank=1, local_world_size=2)


def test_srun_environment():
    env = env_from_os(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    )
    assert env == DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4)


def test_plain_python_is_one_rank_and_gets_the_variables_deepspeed_needs():
    env = env_from_os({})
    assert env == DistEnv() and env.is_main
    environ: dict = {}
    export_env(env, environ)
    assert environ["RANK"] == "0" and environ["WORLD_SIZE"] == "1" and environ["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(environ["MASTER_PORT"]) < 65536


def test_launcher_variables_are_not_overwritten():
    environ = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    export_env(env_from_os(environ), environ)
    assert environ["MASTER_ADDR"] == "10.0.0.1" and environ["MASTER_PORT"] == "29500"


def test_cores_are_split_between_local_ranks():
    assert threads_per_rank(DistEnv(0, 2, 0, 2), requested=3) == 3
    one = threads_per_rank(DistEnv())
    assert threads_per_rank(DistEnv(0, 2, 0, 2)) == max(1, one // 2)
    assert threads_per_rank(DistEnv(0, 64, 0, 64)) == 1


def _check_group_left_before_finalisation(rank: int, world_size: int, out: str) -> None:
    import atexit
    from pathlib import Path

    import torch.distributed as dist

    from clip_pipe.engine import init_process_group

    # atexit runs last-in first-out: registered before the group exists, this runs after the engine's hook.
    atexit.register(lambda: Path(out, f"rank{rank}").write_text(str(dist.is_initialized())))
    init_process_group(env_from_os())
    dist.all_reduce(torch.ones(1))


def test_ranks_leave_the_process_group_before_the_interpreter_is_torn_down(tmp_path):
    """A group still alive at finalisation can abort a rank whose work succeeded (gloo's threads, SIGABRT)."""
    from tests.conftest import run_ranks

    run_ranks(_check_group_left_before_finalisation, 2, str(tmp_path))
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["False", "False"]


def _check_no_shm_build(rank: int, world_size: int, out: str) -> None:
    import deepspeed.comm.comm as ds_comm

    from clip_pipe.engine import init_process_group

    init_process_group(env_from_os())
    if rank == 0:
        Path(out).write_text(json.dumps({"shm_comm_op": ds_comm.cdb.shm_comm_op is not None}))


@pytest.mark.slow
def test_deepspeed_shm_op_is_never_built(tmp_path, monkeypatch):
    # Only DeepSpeed's tensor-parallel inference layers use the op, and its first build costs 30-60 s of
    # g++: joining the group must neither build nor load it, without any variable set by the user.
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    from tests.conftest import run_ranks

    run_ranks(_check_no_shm_build, 2, str(tmp_path / "out.json"))
    assert json.loads((tmp_path / "out.json").read_text()) == {"shm_comm_op": False}
    assert not any(extensions.rglob("*")), sorted(extensions.rglob("*"))
