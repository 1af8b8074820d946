"""`run.report_to: [tensorboard]`: the run's curves and eval metrics, read back with TensorBoard's own
reader (EventAccumulator)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clip_pipe.config import load_config
from clip_pipe.metrics import MetricsLog
from tests.conftest import REPO
from tests.test_readme_examples import check_example


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_points(points: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """Same steps, same values to float32 precision (TensorBoard stores scalars as float32)."""
    assert [step for step, _ in points] == [step for step, _ in expected]
    assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_records_become_scalars_and_a_resume_purges_the_steps_it_redoes(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", report_to=["tensorboard"])
    for step in (1, 2, 3):
        log.write(
            {"step": step, "loss": 4.0 - step, "lr": 1e-3 * step, "grad_norm": None, "samples_per_s": 100.0}
        )
    log.write({"step": 3, "eval_set": "colors", "zeroshot_top1": 0.5, "zeroshot_top5": 1.0})
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert_points(scalars["train/lr"], [(1, 1e-3), (2, 2e-3), (3, 3e-3)])
    assert scalars["eval/colors/zeroshot_top1"] == [(3, 0.5)]
    assert "train/grad_norm" not in scalars  # None: no point

    # Resumed from the checkpoint at step 1: steps 2 and 3 are trained again, and only the new ones show.
    resumed = MetricsLog(tmp_path / "metrics.jsonl", report_to=["tensorboard"])
    resumed.truncate_after(1)
    for step in (2, 3):
        resumed.write({"step": step, "loss": 10.0 + step})
    assert read_scalars(tmp_path / "tb")["train/loss"] == [(1, 3.0), (2, 12.0), (3, 13.0)]


def test_off_by_default_and_only_known_choices():
    assert load_config(overrides=["data.train=x"]).run.report_to == []
    with pytest.raises(
        ValueError, match=r"run.report_to\[0\]' must be one of \['tensorboard'\], got 'wandb'"
    ):
        load_config(overrides=["data.train=x", "run.report_to=[wandb]"])


@pytest.mark.slow
def test_a_training_run_writes_its_curves_to_tensorboard(color_shards, color_eval_set, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"  # where the README's example looks
    command = [
        sys.executable, "launch/train.py", "--config", "configs/tiny_test.yaml", f"data.train={color_shards}",
        f"eval.sets=[{color_eval_set}]", f"run.out_dir={run_dir}", "run.steps=6", "run.log_every=2",
        "eval.every_steps=3", "optim.warmup_steps=2", "run.report_to=[tensorboard]",
        "run.zero_stage=1",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr

    scalars = read_scalars(run_dir / "tb")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and all(r["grad_norm"] is not None for r in train)
    for key in ("loss", "lr", "samples_per_s", "grad_norm", "logit_scale"):
        assert_points(scalars[f"train/{key}"], [(r["step"], r[key]) for r in train])
    evals = [r for r in records if "eval_set" in r]
    assert [r["step"] for r in evals] == [3, 6]
    name = evals[0]["eval_set"]
    for key in ("zeroshot_top1", "zeroshot_top5"):
        assert_points(scalars[f"eval/{name}/{key}"], [(r["step"], r[key]) for r in evals])
    assert len(list((run_dir / "tb").iterdir())) == 1  # one event file, from rank 0
    check_example("tensorboard", tmp_path)
