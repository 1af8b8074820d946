"""Truncated and corrupt tars in training: the exact number of lost samples, in metrics.jsonl and the log,
the same whether the run was interrupted and resumed or not.

Every shard is damaged the same way, so the count after any number of batches is known in closed form
whichever shard a loader slot reads: sizes.json promises 10 samples; sample 3's image is corrupt; the
tar is cut off inside sample 8. webdataset yields a sample only once the next one starts, so sample 7
goes down with 8 and 9: three samples lost to one tar error. That is 6 good samples and 4 lost per shard.
Each of the 4 loader slots reads 2 shards an epoch, so a resumed slot's replay of its epoch passes damage
that the interrupted run had already counted.
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
NUM_SHARDS, NUM_PROMISED, NUM_GOOD, NUM_LOST = 8, 10, 6, 4
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


def lost_after(num_given: int) -> int:
    """Samples one loader slot has counted as lost once it has given out `num_given` good ones."""
    num_shards_done, num_into_shard = divmod(num_given, NUM_GOOD)
    if num_into_shard == 0:  # the last shard's cut-off end is found only when the next sample is asked for
        return max(0, NUM_LOST * num_shards_done - 3)
    return NUM_LOST * num_shards_done + (
        1 if num_into_shard > 3 else 0
    )  # sample 3 comes before the 4th good one


def expected_lost(step: int) -> int:
    # 2 ranks x 2 workers; a rank's workers take turns, worker 0 first.
    per_rank = lost_after(BATCH * ((step + 1) // 2)) + lost_after(BATCH * (step // 2))
    return 2 * per_rank


def _runs(rank: int, world_size: int, train: str, out: str) -> None:
    import multiprocessing

    import clip_pipe.train

    multiprocessing.set_start_method("fork", force=True)
    main = launch_main()
    command = [
        "--config", str(REPO / "configs" / "tiny_test.yaml"), f"data.train={train}", "eval.sets=[]",
        "data.num_workers=2", "data.shuffle_buffer=0", f"data.batch_size={BATCH}", f"run.steps={NUM_STEPS}",
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
    statuses = [main(interrupted)]
    clip_pipe.train.lr_at = real_lr_at
    statuses.append(main([*interrupted, "--resume", "latest"]))
    Path(out, f"status{rank}.json").write_text(json.dumps(statuses))


def test_lost_samples_are_counted_exactly_across_a_resume(tmp_path):
    assert [lost_after(n) for n in (3, 4, 6, 7, 10, 12, 13)] == [0, 1, 1, 4, 5, 5, 8]  # the formula itself
    train = write_damaged_shards(tmp_path / "train")
    out = tmp_path / "runs"
    out.mkdir()
    run_ranks(_runs, 2, str(train), str(out), timeout=600)
    for rank in range(2):
        assert json.loads((out / f"status{rank}.json").read_text()) == [3, 0]
    expected = [expected_lost(step) for step in range(1, NUM_STEPS + 1)]
    assert expected[-1] == 2 * (lost_after(20) + lost_after(20)) == 48
    # Steps 1-5 were logged before the stop, 6-10 after the resume, which re-read the damage before its
    # checkpoint's place in the data without counting it again.
    records = [json.loads(line) for line in (out / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_skipped"] for r in records if "loss" in r] == expected
    log = (out / "resumed" / "train.log").read_text()
    assert f"{expected[-1]} training samples skipped as unreadable since step 0" in log, log
