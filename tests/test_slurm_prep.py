"""slurm/prep.sbatch submitted for real: an array of 3 tasks, then the dependent finalize job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clip_pipe.prep.verify import verify_dataset
from tests.conftest import REPO
from tests.prep_helpers import image_bytes, noise
from tests.slurm_cluster import Cluster, show_logs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SCRIPT = REPO / "slurm" / "prep.sbatch"


def dataset_bytes(folder: Path) -> dict[str, bytes]:
    """Every file, and the manifest's shard list (the manifest also records each command's argv)."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    return {**files, "manifest shards": json.loads((folder / "manifest.json").read_text())["shards"]}


def sbatch(cluster: Cluster, logs: Path, *args: str) -> str:
    proc = subprocess.run(
        [
            "sbatch", "--parsable", "--cpus-per-task=1", "--time=10", f"--output={logs}/prep-%A_%a.log",
            *args,
        ],
        cwd=REPO, env=cluster.env(PYTHON=sys.executable, PYTHONPATH=str(REPO)), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_array_job_then_finalize_gives_dense_shards_equal_to_one_process(slurm_cluster, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    lines = ["image,caption"]
    for i in range(23):  # rows 20-22 repeat rows 0-2: the finalize job's dedup must drop them
        (root / f"{i}.png").write_bytes(image_bytes(noise((20, 20), seed=i % 20)))
        lines.append(f"{i}.png,picture {i % 20}")
    lines.append("../../etc/passwd,a path that leaves the image folder")
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    args = ["--images", str(root), "--captions", str(tmp_path / "c.csv"), "--shard-size", "4"]
    args += ["--image-size", "16"]
    logs = tmp_path / "logs"
    logs.mkdir()

    out = tmp_path / "array"
    array_id = sbatch(slurm_cluster, logs, "--array=0-2", str(SCRIPT), *args, "--out", str(out))
    final_id = sbatch(
        slurm_cluster, logs, f"--dependency=afterany:{array_id}", str(SCRIPT), *args, "--out", str(out)
    )
    final = slurm_cluster.wait(final_id, timeout=300, logs=logs)
    assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), show_logs(logs)
    states = slurm_cluster.run("scontrol", "show", "job", "--oneliner", array_id).splitlines()
    assert len(states) == 3 and all("JobState=COMPLETED" in s for s in states), states
    # Each array task built its own shards (number % 3 == task); the final job found them all done.
    task_logs = {p.name: p.read_text() for p in logs.glob(f"prep-{array_id}_*.log")}
    assert len(task_logs) == 3 and all("of 3" in text for text in task_logs.values()), task_logs

    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == [f"shard-{i:06d}.tar" for i in range(6)]  # 24 rows / 4: dense, no gap
    report = verify_dataset(out)
    assert not report.problems and report.num_samples == 20, str(report)

    single = tmp_path / "single"
    proc = subprocess.run(
        [sys.executable, "data_prep/make_shards.py", *args, "--out", str(single), "--workers", "1"],
        cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert dataset_bytes(out) == dataset_bytes(single)
