"""A real SLURM cluster for the tests, and helpers to submit to it and wait for jobs.

`.ci/run` starts one (scripts/slurm_cluster.sh) and exports SLURM_CONF; without SLURM_CONF the
`slurm_cluster` fixture (tests/conftest.py) starts its own for the session and stops it afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests import capabilities

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue")
# Job states after which nothing more happens (REQUEUED and COMPLETING are on the way somewhere).
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED",
}  # fmt: skip


@dataclass(frozen=True)
class Cluster:
    conf: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment to submit from: ours minus any SLURM_* of an enclosing job, plus `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["PATH"] = f"{env.get('PATH', '')}:/usr/sbin"
        return {**env, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *args: str) -> str:
        proc = subprocess.run(args, env=self.env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{args} failed: {proc.stderr}"
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields. Finished jobs stay listed for MinJobAge (an hour on ours)."""
        fields = {}
        for item in self.run("scontrol", "show", "job", "--oneliner", job_id).split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float, logs: Path | None = None) -> dict[str, str]:
        """Wait for the job to finish; cancel it and fail, showing its logs, if it takes too long."""
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env(), check=False)
                raise AssertionError(
                    f"job {job_id} still {job['JobState']} after {timeout} s\n{show_logs(logs)}"
                )
            time.sleep(0.5)
        return job


def show_logs(logs: Path | None, num_chars: int = 4000) -> str:
    if logs is None or not logs.is_dir():
        return "(no logs)"
    return "\n".join(f"--- {path}\n{path.read_text()[-num_chars:]}" for path in sorted(logs.iterdir()))


def cluster_for_tests():
    """Yield the cluster SLURM_CONF names, or start one and stop its daemons by PID at the end."""
    if os.environ.get("SLURM_CONF"):
        conf = Path(os.environ["SLURM_CONF"])
        yield Cluster(conf)
        return
    missing = [tool for tool in TOOLS if not shutil.which(tool, path=f"{os.environ['PATH']}:/usr/sbin")]
    if missing:
        capabilities.missing(
            "SLURM",
            f"{', '.join(missing)} not found: install slurmctld slurmd slurm-client munge "
            "(scripts/setup.sh does), or point SLURM_CONF at a cluster",
        )
    if os.geteuid() != 0:
        capabilities.missing(
            "SLURM", "starting a test cluster needs root (slurmd starts job tasks as their users)"
        )
    # Not under pytest's 0700 tmp_path: munged wants every directory above its socket searchable by all.
    folder = Path(tempfile.mkdtemp(prefix="clip-pipe-slurm-"))
    proc = subprocess.run([CLUSTER_SCRIPT, "start", folder], capture_output=True, text=True, timeout=120)
    try:
        assert proc.returncode == 0, f"the test SLURM cluster did not start:\n{proc.stdout}{proc.stderr}"
        yield Cluster(folder / "slurm.conf")
    finally:
        # Also after a failed test or start: the script cancels leftover jobs and stops what is running.
        subprocess.run([CLUSTER_SCRIPT, "stop", folder], check=False, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
