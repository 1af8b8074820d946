"""Preemption and exact resume, in real 2-rank runs through `launch/train.py`'s `main`.

A run stopped by SIGUSR1 on one rank mid-run (exit status 3, checkpoint saved) and resumed with
`--resume latest` must end with the same parameters as the same run left alone: the checkpoint holds
each rank's and each loader worker's place in the data, so no sample is repeated or skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_ranks, write_train_shards

pytestmark = pytest.mark.slow
NUM_STEPS, SIGNAL_STEP = 10, 4


def launch_main():
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _runs(rank: int, world_size: int, train: str, out: str) -> None:
    import multiprocessing

    import clip_pipe.engine
    import clip_pipe.train

    # Ranks from a launcher (deepspeed, torchrun, srun) fork their loader workers; a process made by
    # mp.spawn would spawn them too, re-importing torch in each worker (some 20 s a run here).
    multiprocessing.set_start_method("fork", force=True)
    main = launch_main()
    statuses, num_steps_run = {}, {}
    # Count the optimizer steps each run really takes: a resume that silently restarted from step 0
    # would still end with the same weights (the rerun is deterministic) and a tidy metrics.jsonl.
    real_train_step = clip_pipe.engine.Engine.train_step

    def train_step(self, *args, **kwargs):
        num_steps_run[current] = num_steps_run.get(current, 0) + 1
        return real_train_step(self, *args, **kwargs)

    clip_pipe.engine.Engine.train_step = train_step
    # SLURM's warning signal with the loader in the trainer's process; SIGTERM with two loader workers.
    for num_workers, sig in ((0, signal.SIGUSR1), (2, signal.SIGTERM)):
        command = [
            "--config", str(REPO / "configs" / "tiny_test.yaml"), f"data.train={train}", "eval.sets=[]",
            f"data.num_workers={num_workers}", f"run.steps={NUM_STEPS}", "run.log_every=1", "run.threads_per_rank=1",
            "run.checkpoint_every=1000", "eval.batch_size=16",
        ]  # fmt: skip
        current = f"full{num_workers}"
        statuses[current] = main([*command, f"run.out_dir={out}/full{num_workers}"])

        interrupted = [*command, f"run.out_dir={out}/interrupted{num_workers}"]
        real_lr_at = clip_pipe.train.lr_at
        if rank == 1:  # the signal reaches one rank only, mid-step, as a scheduler's would

            def lr_at(step, optim, num_steps, sig=sig, real_lr_at=real_lr_at):
                if step == SIGNAL_STEP:
                    os.kill(os.getpid(), sig)
                return real_lr_at(step, optim, num_steps)

            clip_pipe.train.lr_at = lr_at
        current = f"interrupted{num_workers}"
        statuses[current] = main(interrupted)
        clip_pipe.train.lr_at = real_lr_at
        # The handlers were put back: the default for SIGUSR1 would end the process, so check by lookup.
        assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler), signal.getsignal(sig)
        current = f"resumed{num_workers}"
        statuses[current] = main([*interrupted, "--resume", "latest"])
    Path(out, f"status{rank}.json").write_text(json.dumps({"statuses": statuses, "steps": num_steps_run}))


def test_preempted_run_resumes_exactly(tmp_path, color_shards):
    out = tmp_path / "runs"
    out.mkdir()
    run_ranks(_runs, 2, str(color_shards), str(out), timeout=600)
    for rank in range(2):
        report = json.loads((out / f"status{rank}.json").read_text())
        assert report["statuses"] == {
            "full0": 0, "interrupted0": 3, "resumed0": 0, "full2": 0, "interrupted2": 3, "resumed2": 0
        }, f"rank {rank}: {report}"  # fmt: skip
        # The resumed process took only the steps left after the checkpoint, not the whole run again.
        assert report["steps"] == {
            "full0": NUM_STEPS, "interrupted0": SIGNAL_STEP + 1, "resumed0": NUM_STEPS - SIGNAL_STEP - 1,
            "full2": NUM_STEPS, "interrupted2": SIGNAL_STEP + 1, "resumed2": NUM_STEPS - SIGNAL_STEP - 1,
        }, f"rank {rank}: {report}"  # fmt: skip

    for num_workers in (0, 2):
        full, resumed = out / f"full{num_workers}", out / f"interrupted{num_workers}"
        # Both ranks stopped at the end of the step the signal came in, and saved there.
        stopped_at = f"step_{SIGNAL_STEP + 1:08d}"
        assert (resumed / "checkpoints" / stopped_at / "model.safetensors").is_file()
        log_text = (resumed / "train.log").read_text()
        assert f"resumed from {resumed / 'checkpoints'} at step {SIGNAL_STEP + 1}" in log_text, log_text
        assert f"done: {NUM_STEPS - SIGNAL_STEP - 1} steps in" in log_text, log_text
        records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == list(range(1, NUM_STEPS + 1))
        assert (resumed / "model.safetensors").is_file()

        expected = load_file(full / "model.safetensors")
        actual = load_file(resumed / "model.safetensors")
        stopped = load_file(resumed / "checkpoints" / stopped_at / "model.safetensors")
        assert max((expected[k] - stopped[k]).abs().max() for k in expected) > 1e-4, (
            "steps after the stop count"
        )
        for key in expected:
            torch.testing.assert_close(
                actual[key], expected[key], rtol=1e-6, atol=1e-7, msg=f"workers={num_workers} {key}"
            )


# --- Elastic resume: another number of ranks and loader workers ------------------------------------

GLOBAL_BATCH, LEG_STEPS = 12, 3


def _elastic_command(train: str, out: str, world_size: int, num_workers: int, num_steps: int) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "tiny_test.yaml"), f"data.train={train}", "eval.sets=[]",
        f"data.batch_size={GLOBAL_BATCH // world_size}", f"data.num_workers={num_workers}", "data.num_streams=8",
        f"run.steps={num_steps}", f"run.out_dir={out}", "run.log_every=1", "run.threads_per_rank=1",
        f"run.checkpoint_every={LEG_STEPS}", "run.keep_checkpoints=0", "optim.schedule=constant",
    ]  # fmt: skip


def _first_leg(rank: int, world_size: int, train: str, out: str) -> None:
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)  # as a launcher's ranks fork their workers
    status = launch_main()(_elastic_command(train, f"{out}/elastic", 2, 1, LEG_STEPS))
    Path(out, f"first{rank}.json").write_text(json.dumps(status))


def _one_process_runs(rank: int, world_size: int, train: str, out: str, other: str) -> None:
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)
    main = launch_main()
    statuses = [
        # The third leg: 1 rank x 2 workers, from the 3-rank checkpoint at step 6.
        main([*_elastic_command(train, f"{out}/elastic", 1, 2, 3 * LEG_STEPS), "--resume", "latest"]),
        # The run left alone, in one process.
        main(_elastic_command(train, f"{out}/whole", 1, 0, 3 * LEG_STEPS)),
        # The first leg's checkpoint as the loader before the elastic order wrote it: it resumes.
        main([*_elastic_command(train, f"{out}/old_format", 1, 0, LEG_STEPS + 2), "--resume", "latest"]),
        # The first leg's checkpoint with another global batch (8 instead of 12): it resumes, and says so.
        main(
            [
                *_elastic_command(train, f"{out}/other_batch", 1, 0, LEG_STEPS + 2),
                "data.batch_size=8",
                "--resume",
                "latest",
            ]
        ),
        # A weighted mix of two sources, from the config through the trainer.
        main(
            [
                *_elastic_command(train, f"{out}/mix", 1, 0, 2),
                "data.train=[]",
                f"data.sources=[{{train: {train}, weight: 0.7}}, {{train: {other}, weight: 0.3}}]",
            ]
        ),
    ]
    Path(out, "one_process.json").write_text(json.dumps(statuses))


def checkpoint_state(checkpoint: Path) -> dict:
    from clip_pipe.engine import _DEEPSPEED_CHECKPOINT_GLOBALS

    with torch.serialization.safe_globals(_DEEPSPEED_CHECKPOINT_GLOBALS):
        return torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=True)


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


def test_a_run_resumes_exactly_on_other_ranks_and_workers(tmp_path, color_shards):
    """Global batch 12: 3 steps on 2 ranks x 1 worker, 3 on 3 ranks x 0 (the deepspeed launcher), 3 on 1
    rank x 2 workers, against 9 steps in one process. Each leg's checkpoint holds the same stream
    positions as the whole run's at that step (so the legs read the same batches: tests/test_data.py
    compares them sample by sample); per-step losses and the final weights agree to the rounding of
    summing the batch in another order."""
    import subprocess
    import sys

    from clip_pipe.distributed import free_port

    out, train = tmp_path / "runs", str(color_shards)
    out.mkdir()
    run_ranks(_first_leg, 2, train, str(out), timeout=600)
    assert [json.loads((out / f"first{r}.json").read_text()) for r in range(2)] == [0, 0]
    leg1 = out / "elastic" / "checkpoints" / f"step_{LEG_STEPS:08d}"
    # Copies of the first leg for the old-format and changed-batch resumes.
    import shutil

    for name in ("old_format", "other_batch"):
        shutil.copytree(out / "elastic", out / name)
    old = out / "old_format" / "checkpoints" / leg1.name / "mp_rank_00_model_states.pt"
    state = checkpoint_state(old.parent)
    assert state["data"]["version"] == 2
    state["data"] = [{"num_batches": LEG_STEPS, "workers": [[0, 18]]}] * 2  # as the per-rank loader saved it
    torch.save(state, old)

    deepspeed = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "3",
        f"--master_port={free_port()}",
    ]
    command = _elastic_command(train, str(out / "elastic"), 3, 0, 2 * LEG_STEPS)
    proc = subprocess.run(
        [*deepspeed, "launch/train.py", *command, "--resume", "latest"], cwd=REPO, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    other = write_train_shards(tmp_path / "other", [20, 9], seed=5, first_key=10_000)
    run_ranks(_one_process_runs, 1, train, str(out), str(other), timeout=900)
    assert json.loads((out / "one_process.json").read_text()) == [0, 0, 0, 0, 0]

    elastic, whole = out / "elastic", out / "whole"
    log_text = (elastic / "train.log").read_text()
    assert "global batch" not in log_text and "restarts" not in log_text, log_text
    for step in (LEG_STEPS, 2 * LEG_STEPS, 3 * LEG_STEPS):
        tag = f"step_{step:08d}"
        ours, theirs = (
            checkpoint_state(elastic / "checkpoints" / tag),
            checkpoint_state(whole / "checkpoints" / tag),
        )
        assert ours["data"] == theirs["data"], tag
    torch.testing.assert_close(losses(elastic), losses(whole), rtol=1e-5, atol=0)
    expected, actual = load_file(whole / "model.safetensors"), load_file(elastic / "model.safetensors")
    start = load_file(leg1 / "model.safetensors")
    assert max((expected[k] - start[k]).abs().max() for k in expected) > 1e-4, "the later legs' steps count"
    for key in expected:
        # The ranks sum the batch's gradient in another order, so weights differ by rounding: about 3e-7
        # here. Attention's key bias has no true gradient (softmax ignores a constant added to every
        # key's score), so AdamW steps it by normalised rounding noise: up to 2e-6 in 9 steps. One
        # other sample in one batch moves weights by some 1e-4 (lr 1e-3).
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)

    old_log = (out / "old_format" / "train.log").read_text()
    assert old_log.count("written before the elastic data order") == 1, old_log
    assert (
        checkpoint_state(out / "old_format" / "checkpoints" / f"step_{LEG_STEPS + 2:08d}")["data"]["version"]
        == 2
    )
    other_log = (out / "other_batch" / "train.log").read_text()
    assert "the global batch is 8 samples, the checkpoint's 12" in other_log, other_log
    assert len(losses(out / "other_batch")) == LEG_STEPS + 2
    mix_log = (out / "mix" / "train.log").read_text()
    assert f"source {train}: 8 samples/step (weight 0.7), 100 samples" in mix_log, mix_log
    assert f"source {other}: 4 samples/step (weight 0.3), 29 samples" in mix_log, mix_log
