"""Checkpoints are read weights-only through the real paths: a pickle that would run code is refused.

A checkpoint folder from a real run gets one of its files replaced by a pickle whose unpickling would
create a marker file. Every loader (Engine.load, `launch/train.py --resume`, ZeroShotClassifier,
`launch/zeroshot.py`) must refuse it with a clear error, and the marker must never appear.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clip_pipe.engine import _DEEPSPEED_CHECKPOINT_GLOBALS
from tests.conftest import REPO, run_ranks

pytestmark = pytest.mark.slow


class TouchFile:
    """Unpickling this creates `path`: stands in for any code an attacker's pickle would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mknod, (self.path,))


def poison(file: Path, marker: Path) -> None:
    """Keep `file`'s real contents, so only the payload can make a loader fail."""
    with torch.serialization.safe_globals(_DEEPSPEED_CHECKPOINT_GLOBALS):
        state = torch.load(file, weights_only=True)
    state["payload"] = TouchFile(marker)
    torch.save(state, file)


def train_command(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "launch/train.py", "--config", "configs/tiny_test.yaml", f"data.train={shards}",
        "eval.sets=[]", f"run.out_dir={run_dir}", "run.steps=2", "run.checkpoint_every=2", "run.log_every=1",
        "run.zero_stage=1", "data.num_workers=0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """A real 2-step single-rank run (ZeRO-1: model states and optimizer partitions in separate files)."""
    from tests.conftest import write_train_shards

    folder = tmp_path_factory.mktemp("untrusted")
    shards = write_train_shards(folder / "train", [20])
    run_dir = folder / "run"
    proc = subprocess.run(
        train_command(shards, run_dir), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    tag_dir = run_dir / "checkpoints" / "step_00000002"
    assert {p.name for p in tag_dir.glob("*.pt")} == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    }  # fmt: skip
    assert (tag_dir / "model.safetensors").is_file()
    return shards, run_dir


def copy_run(run_dir: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, dest)
    return dest


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_resume_refuses_a_checkpoint_that_runs_code(trained_run, tmp_path, name):
    shards, run_dir = trained_run[0], copy_run(trained_run[1], tmp_path / "run")
    marker = tmp_path / "pwned"
    poison(run_dir / "checkpoints" / "step_00000002" / name, marker)
    proc = subprocess.run(
        [*train_command(shards, run_dir, "run.steps=4"), "--resume", "latest"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and name in last and "weights-only" in last, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def _engine_load(rank: int, world_size: int, run_dir: str, marker: str) -> None:
    from clip_pipe.config import load_config
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group
    from clip_pipe.model import build_model

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    cfg = load_config(str(REPO / "configs" / "tiny_test.yaml"), ["data.train=/unused", "run.zero_stage=1"])
    engine = Engine(build_model(cfg.model).model, cfg, world_size)
    with pytest.raises(ValueError, match="weights-only") as caught:
        engine.load(Path(run_dir) / "checkpoints")
    assert "mp_rank_00_model_states.pt" in str(caught.value)
    assert not Path(marker).exists()


def test_engine_load_refuses_a_checkpoint_that_runs_code(trained_run, tmp_path):
    run_dir = copy_run(trained_run[1], tmp_path / "run")
    marker = tmp_path / "pwned"
    poison(run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", marker)
    run_ranks(_engine_load, 1, str(run_dir), str(marker))
    assert not marker.exists()


def test_model_file_that_runs_code_is_refused_by_classifier_and_zeroshot(trained_run, tmp_path):
    from clip_pipe.classifier import ZeroShotClassifier
    from tests.conftest import write_eval_set

    run_dir = copy_run(trained_run[1], tmp_path / "run")
    marker = tmp_path / "pwned"
    # Run directories written before exports were safetensors hold model.pt files, which still load:
    # turn this run into such a one, its pickles carrying a payload.
    for folder in (run_dir, run_dir / "checkpoints" / "step_00000002"):
        weights = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save({**weights, "payload": TouchFile(marker)}, folder / "model.pt")
    # A run directory (its final model.pt), a checkpoint directory, and the file itself.
    for source in (run_dir, run_dir / "checkpoints" / "step_00000002", run_dir / "model.pt"):
        with pytest.raises(ValueError, match="cannot load weights"):
            ZeroShotClassifier.from_checkpoint(source)
        assert not marker.exists(), f"{source}: the pickle ran code"

    eval_set = write_eval_set(tmp_path / "eval")
    proc = subprocess.run(
        [sys.executable, "launch/zeroshot.py", "--checkpoint", str(run_dir), "--eval-set", str(eval_set)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert not marker.exists(), "launch/zeroshot.py ran the pickle's code"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: cannot load weights"), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
