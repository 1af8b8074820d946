"""slurm/train.sbatch on a real SLURM cluster (loopback): 2 tasks on the CPU, the GPU form, preemption."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, write_eval_set, write_train_shards
from tests.slurm_cluster import Cluster, show_logs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SCRIPT = REPO / "slurm" / "train.sbatch"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("slurm_data")
    return write_train_shards(folder / "train", [50, 37, 13]), write_eval_set(folder / "eval")


def submit(cluster: Cluster, data, run_dir: Path, *sbatch_args: str, overrides=()) -> str:
    """Submit the real script from the repository root, as a user would; returns the job id."""
    train, eval_set = data
    env = cluster.env(
        CONFIG="configs/tiny_test.yaml", RUN_DIR=str(run_dir), PYTHON=sys.executable, PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )  # fmt: skip
    proc = subprocess.run(
        [
            "sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
            f"--output={run_dir.parent}/sbatch-%j.out",  # only errors before the script reaches RUN_DIR
            *sbatch_args, str(SCRIPT), f"data.train={train}", f"eval.sets=[{eval_set}]", *overrides,
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def rank_lines(run_dir: Path, job_id: str) -> list[str]:
    """The line each task prints about itself before starting Python, one per rank log."""
    logs = sorted((run_dir / "logs").glob(f"slurm-{job_id}-rank*.out"))
    return [next(line for line in p.read_text().splitlines() if line.startswith("rank ")) for p in logs]


def check_completed(
    cluster: Cluster, job_id: str, run_dir: Path, num_steps: int, timeout: float = 240
) -> dict:
    job = cluster.wait(job_id, timeout, run_dir / "logs")
    logs = show_logs(run_dir / "logs")
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), logs
    # One job of two ranks, not two one-rank runs: the tasks formed one process group.
    assert re.search(r"\b2 ranks\b", (run_dir / "train.log").read_text()), logs
    assert json.loads((run_dir / "zeroshot.json").read_text())["eval"]["num_samples"] == 40
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{num_steps:08d}"
    assert (run_dir / "checkpoints" / f"step_{num_steps:08d}" / "model.safetensors").is_file()
    assert (run_dir / "model.safetensors").is_file()
    assert train_steps(run_dir) == list(range(5, num_steps + 1, 5))
    return job


def test_two_tasks_on_cpu(slurm_cluster, data, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(slurm_cluster, data, run_dir, "--gpus-per-node=0", overrides=["run.steps=20"])
    check_completed(slurm_cluster, job_id, run_dir, num_steps=20)
    lines = [re.sub(r" on \S+,", ",", line) for line in rank_lines(run_dir, job_id)]
    assert lines == [
        "rank 0/2, local rank 0/2, CUDA_VISIBLE_DEVICES=",
        "rank 1/2, local rank 1/2, CUDA_VISIBLE_DEVICES=",
    ]
    batch_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert f"rank 0 at localhost:{20000 + int(job_id) % 20000}" in batch_log
    assert "training exited with status 0" in batch_log


def test_gpu_form_with_placeholder_gres(slurm_cluster, data, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(slurm_cluster, data, run_dir, "--gpus-per-node=2", overrides=["run.steps=10"])
    job = check_completed(slurm_cluster, job_id, run_dir, num_steps=10)
    assert job["TresPerNode"] == "gres:gpu:2", job
    # Every task sees both of its node's GPUs and would take the one at its local rank; with no
    # driver behind the placeholders, training runs on the CPU.
    lines = rank_lines(run_dir, job_id)
    assert len(lines) == 2 and all(line.endswith("CUDA_VISIBLE_DEVICES=0,1") for line in lines), lines


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, data, tmp_path):
    """Needs the training loop's signal handling: USR1 -> checkpoint at a step boundary -> exit 3."""
    run_dir, num_steps = tmp_path / "run", 100
    # No periodic checkpoint before the end: a resume mid-run can only come from the preemption's.
    overrides = [f"run.steps={num_steps}", "run.checkpoint_every=100000"]
    job_id = submit(slurm_cluster, data, run_dir, "--gpus-per-node=0", overrides=overrides)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and re.findall(r'"step": (?:[1-9]\d+)', metrics.read_text())):
        assert slurm_cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), show_logs(run_dir / "logs")
        assert time.monotonic() < deadline, f"no training progress in 180 s\n{show_logs(run_dir / 'logs')}"
        time.sleep(0.2)
    # What `#SBATCH --signal=USR1@120` does before the time limit: USR1 to every task (not the batch shell).
    slurm_cluster.run("scancel", "--signal=USR1", job_id)

    job = check_completed(slurm_cluster, job_id, run_dir, num_steps)
    assert job["Restarts"] == "1", job
    batch_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert "training exited with status 3" in batch_log and f"requeued job {job_id}" in batch_log
    assert "(restart 1)" in batch_log and batch_log.count("training exited with status 0") == 1
    resumed = re.findall(r"resumed from \S+ at step (\d+)", (run_dir / "train.log").read_text())
    assert len(resumed) == 1 and 10 <= int(resumed[0]) < num_steps, resumed
    # The preemption's checkpoint, beside the final one (keep_checkpoints=2).
    assert (run_dir / "checkpoints" / f"step_{int(resumed[0]):08d}").is_dir()
