"""A rank SIGKILLed mid-step: the job exits non-zero within a bounded time (no rank hangs in a
collective), and `--resume latest` then ends with the parameters of the same run left alone.

Rank 1 kills itself at the start of step KILL_STEP, through a `sitecustomize` on PYTHONPATH, so the
real entry points run unchanged: the deepspeed launcher, and slurm/train.sbatch on the loopback cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clip_pipe.distributed import free_port
from tests.conftest import REPO, write_eval_set, write_train_shards

pytestmark = pytest.mark.slow
NUM_STEPS, CHECKPOINT_EVERY, KILL_STEP, TIMEOUT_S = 8, 3, 5, 20

SITECUSTOMIZE = """
import json
import os

if os.environ.get("RANK") == "1" and os.environ.get("CLIP_PIPE_TEST_KILL_ONCE"):
    import signal
    import time

    import clip_pipe.train

    marker, real_lr_at = os.environ["CLIP_PIPE_TEST_KILL_ONCE"], clip_pipe.train.lr_at

    def lr_at(step, optim, num_steps):
        if step == {kill_step} and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: as the OOM killer would
        return real_lr_at(step, optim, num_steps)

    clip_pipe.train.lr_at = lr_at
"""


def overrides(train: Path, eval_set: Path, run_dir: Path) -> list[str]:
    return [
        f"data.train={train}", "eval.sets=[]", f"run.out_dir={run_dir}", f"run.steps={NUM_STEPS}",
        f"run.checkpoint_every={CHECKPOINT_EVERY}", f"run.collective_timeout_s={TIMEOUT_S}",
        "run.threads_per_rank=1", "run.log_every=1", "data.num_workers=1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("rank_death")
    hook = folder / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE.replace("{kill_step}", str(KILL_STEP)))
    train, eval_set = write_train_shards(folder / "train", [50, 37, 13]), write_eval_set(folder / "eval")
    reference = folder / "reference"
    proc = subprocess.run(
        deepspeed_command(overrides(train, eval_set, reference)), cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"hook": hook, "train": train, "eval": eval_set, "reference": reference / "model.safetensors"}


def deepspeed_command(args: list[str], *extra: str) -> list[str]:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [
        deepspeed, "--num_gpus", "2", f"--master_port={free_port()}", "launch/train.py",
        "--config", "configs/tiny_test.yaml", *args, *extra,
    ]  # fmt: skip


def check_same_as_reference(run_dir: Path, reference: Path) -> None:
    expected = load_file(reference)
    actual = load_file(run_dir / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def check_resumed_from(run_dir: Path, step: int) -> None:
    log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints'} at step {step}" in log, log[-3000:]
    assert f"done: {NUM_STEPS - step} steps" in log, log[-3000:]


def test_rank_killed_under_deepspeed_launcher_exits_then_resumes(setup, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    env = {
        **os.environ, "PYTHONPATH": f"{setup['hook']}:{REPO}", "CLIP_PIPE_TEST_KILL_ONCE": str(marker),
        "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    args = overrides(setup["train"], setup["eval"], run_dir)
    proc = subprocess.run(
        deepspeed_command(args), cwd=REPO, capture_output=True, text=True, env=env, timeout=900
    )
    exited = time.time()
    assert marker.is_file(), f"rank 1 was not killed:\n{proc.stderr[-3000:]}"
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert exited - float(marker.read_text()) < TIMEOUT_S + 30, "the job outlived the collective timeout"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not (run_dir / "model.safetensors").exists()

    proc = subprocess.run(
        deepspeed_command(args, "--resume", "latest"), cwd=REPO, capture_output=True, text=True, env=env,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_resumed_from(run_dir, 3)
    check_same_as_reference(run_dir, setup["reference"])


def submit(cluster, setup: dict, run_dir: Path, marker: Path) -> str:
    """slurm/train.sbatch as tests/test_slurm.py submits it, with the killing hook on PYTHONPATH."""
    env = cluster.env(
        CONFIG="configs/tiny_test.yaml", RUN_DIR=str(run_dir), PYTHON=sys.executable, PYTHONUNBUFFERED="1",
        PYTHONPATH=f"{setup['hook']}:{REPO}", CLIP_PIPE_TEST_KILL_ONCE=str(marker),
    )  # fmt: skip
    proc = subprocess.run(
        [
            "sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
            "--gpus-per-node=0", f"--output={run_dir.parent}/sbatch-%j.out", str(REPO / "slurm" / "train.sbatch"),
            *overrides(setup["train"], setup["eval"], run_dir),
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


@pytest.mark.slurm
def test_rank_killed_under_slurm_fails_the_job_then_a_resubmit_resumes(setup, slurm_cluster, tmp_path):
    from tests.slurm_cluster import show_logs

    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    job_id = submit(slurm_cluster, setup, run_dir, marker)
    job = slurm_cluster.wait(job_id, 240, run_dir / "logs")
    logs = show_logs(run_dir / "logs")
    assert marker.is_file(), f"rank 1 was not killed: {job}\n{logs}"
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", f"{job}\n{logs}"
    # Both tasks ended: the survivor did not wait out more than the collective timeout.
    ended = time.mktime(time.strptime(job["EndTime"], "%Y-%m-%dT%H:%M:%S"))
    assert ended - float(marker.read_text()) < TIMEOUT_S + 30, f"{job}\n{logs}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    # The script always passes --resume latest: resubmitting it is the whole recovery.
    job_id = submit(slurm_cluster, setup, run_dir, marker)
    job = slurm_cluster.wait(job_id, 240, run_dir / "logs")
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n{show_logs(run_dir / 'logs')}"
    check_resumed_from(run_dir, 3)
    check_same_as_reference(run_dir, setup["reference"])


def _hung_peer(rank: int, world_size: int, port: int, out: str) -> None:
    import signal

    import torch.distributed as dist

    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import init_process_group

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    init_process_group(env_from_os(), timeout_s=5)
    dist.barrier()
    if rank == 1:
        Path(out, "pid1").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)  # alive, its sockets open: as a node cut off the network
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        outcome = "returned"
    except Exception as e:  # gloo's timeout error
        outcome = type(e).__name__
    Path(out, "rank0.json").write_text(json.dumps([outcome, time.monotonic() - start]))


def test_a_hung_rank_fails_the_others_after_the_collective_timeout(tmp_path):
    """No connection reset to notice here (the peer is stopped, not dead): only the timeout ends the wait."""
    import multiprocessing
    import signal

    context = multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [context.Process(target=_hung_peer, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in ranks:
        p.start()
    try:
        ranks[0].join(timeout=240)
        assert not ranks[0].is_alive(), "rank 0 still waiting on a hung peer"
        outcome, waited = json.loads((tmp_path / "rank0.json").read_text())
        assert outcome != "returned" and 4 < waited < 5 + 20, (outcome, waited)
    finally:
        for p in ranks:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join()
