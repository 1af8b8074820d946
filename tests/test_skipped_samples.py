"""Truncated and corrupt tars in training: the exact number of lost samples, in metrics.jsonl and the log,
the same whether the run was interrupted and resumed (on another number of loader workers) or not.

Every shard is damaged the same way, so the count after any number of steps is known in closed form:
sizes.json promises 10 samples; sample 3's image is corrupt; the tar is cut off inside sample 8, and the
tar reader gives samples 0 to 6 (the cut falls where sample 7's last member is incomplete): 3 samples
lost to the cut, 1 undecodable, 6 good. With 8 streams over 8 shards of 10, each stream's range in an
epoch is one whole shard, read as one block (no shuffle), and it gives one sample a step to the global
batch of 8 (2 ranks x 4). So every stream starts an epoch every 7 steps, its 3 lost samples counted
with its first sample, its undecodable one at its 4th (stood in for by the 5th).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import webdataset as wds

from tests.conftest import COLORS, REPO, color_jpeg, run_ranks
from tests.test_resume import launch_main

pytestmark = pytest.mark.slow
NUM_SHARDS, NUM_PROMISED, NUM_READ, NUM_LOST = 8, 10, 7, 3
BATCH, NUM_STEPS, SIGNAL_STEP = 4, 10, 4


def write_damaged_shards(folder: Path) -> Path:
    import random

    folder.mkdir(parents=True)
    rng = random.Random(0)
    for index in range(NUM_SHARDS):
        path = folder / f"shard-{index:06d}.tar"
        offsets = []
        with open(path, "wb") as stream, wds.TarWriter(stream) as writer:
            for i in range(NUM_PROMISED):
                color = rng.choice(list(COLORS))
                image = b"\xff\xd8 not a jpeg" if i == 3 else color_jpeg(color, rng)
                offsets.append(stream.tell())
                writer.write(
                    {"__key__": f"{index}{i:08d}", "jpg": image, "txt": f"a photo of a {color} square"}
                )
        data = path.read_bytes()
        path.write_bytes(data[: offsets[8] + 700])  # inside sample 8's image
    sizes = {f"shard-{i:06d}.tar": NUM_PROMISED for i in range(NUM_SHARDS)}
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return folder


def expected_lost(num_steps: int) -> int:
    """Samples lost by all 8 streams in their first `num_steps` steps: 3 at the first sample of each
    epoch (steps 1, 8, 15, ...), 1 at the 4th (steps 4, 11, ...)."""
    num_epochs_started = -(-num_steps // NUM_READ)
    num_undecodable = (num_steps + NUM_READ - 4) // NUM_READ
    return NUM_SHARDS * (NUM_LOST * num_epochs_started + num_undecodable)


def _runs(rank: int, world_size: int, train: str, out: str) -> None:
    import multiprocessing

    import clip_pipe.train

    multiprocessing.set_start_method("fork", force=True)
    main = launch_main()
    command = [
        "--config", str(REPO / "configs" / "tiny_test.yaml"), f"data.train={train}", "eval.sets=[]",
        "data.shuffle_buffer=0", "data.num_streams=8", f"data.batch_size={BATCH}", f"run.steps={NUM_STEPS}",
        "run.log_every=1", "run.threads_per_rank=1", "run.checkpoint_every=1000",
    ]  # fmt: skip
    real_lr_at = clip_pipe.train.lr_at
    if rank == 1:

        def lr_at(step, optim, num_steps):
            if step == SIGNAL_STEP:
                os.kill(os.getpid(), signal.SIGUSR1)
            return real_lr_at(step, optim, num_steps)

        clip_pipe.train.lr_at = lr_at
    interrupted = [*command, f"run.out_dir={out}/resumed"]
    statuses = [main([*interrupted, "data.num_workers=2"])]
    clip_pipe.train.lr_at = real_lr_at
    statuses.append(main([*interrupted, "data.num_workers=1", "--resume", "latest"]))
    Path(out, f"status{rank}.json").write_text(json.dumps(statuses))


def test_lost_samples_are_counted_exactly_across_a_resume(tmp_path):
    assert [expected_lost(n) for n in (1, 3, 4, 7, 8, 10, 11)] == [24, 24, 32, 32, 56, 56, 64]  # the formula
    train = write_damaged_shards(tmp_path / "train")
    out = tmp_path / "runs"
    out.mkdir()
    run_ranks(_runs, 2, str(train), str(out), timeout=600)
    for rank in range(2):
        assert json.loads((out / f"status{rank}.json").read_text()) == [3, 0]
    expected = [expected_lost(step) for step in range(1, NUM_STEPS + 1)]
    # Steps 1-5 were logged before the stop (2 loader workers a rank), 6-10 after the resume (1 worker),
    # which re-read the damage before its checkpoint's place in the data without counting it again.
    records = [json.loads(line) for line in (out / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_skipped"] for r in records if "loss" in r] == expected
    log = (out / "resumed" / "train.log").read_text()
    assert f"{expected[-1]} training samples skipped as unreadable since step 0" in log, log
