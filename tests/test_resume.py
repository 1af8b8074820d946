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

from tests.conftest import REPO, run_ranks

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
