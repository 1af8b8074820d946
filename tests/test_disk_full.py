"""The disk fills up, for real: a small tmpfs mounted for the test (needs root and a container that
allows mounts; CI runs as root, as the SLURM tests need).

- Data prep: a one-line error, only complete shards visible, and a rerun with space gives the bytes of
  a run that never ran out.
- Training: the checkpoint that did not fit is never `latest`; the previous one stays loadable, and
  `--resume latest` with space ends with the parameters of an uninterrupted run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.capabilities import missing
from tests.conftest import REPO, write_train_shards
from tests.prep_helpers import image_bytes, noise

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs at tmp_path/disk; `resize(n)` changes its size (in MiB) in place, keeping its files."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()

    def mount(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(mount_point)],
                              capture_output=True, text=True)  # fmt: skip

    proc = mount("size=1m")
    if proc.returncode != 0:  # a failure under CI=true, which runs as root; a skip elsewhere
        missing("a tmpfs mount", f"run as root where mounts are allowed ({proc.stderr.strip()})")

    def resize(mib: float) -> Path:
        done = mount("remount", f"size={int(mib * 1024)}k")
        assert done.returncode == 0, done.stderr
        return mount_point

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def make_images(folder: Path, num_images: int) -> Path:
    folder.mkdir()
    lines = ["image,caption"]
    for i in range(num_images):
        (folder / f"{i}.png").write_bytes(image_bytes(noise((160, 128), seed=i)))
        lines.append(f"{i}.png,picture number {i}")
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return folder


def make_shards(images: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable, "data_prep/make_shards.py", "--images", str(images), "--captions",
            str(images / "captions.csv"), "--out", str(out), "--shard-size", "10", "--image-size", "128",
            "--workers", "1",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


def test_prep_on_a_full_disk_fails_clearly_and_a_rerun_with_space_completes_identically(tmp_path, small_disk):
    images = make_images(tmp_path / "images", 120)
    clean = tmp_path / "clean"
    assert make_shards(images, clean).returncode == 0
    total = sum(p.stat().st_size for p in clean.iterdir())
    assert total > 2 << 20, total

    # Room for a few shards, not all. Shards are most of the bytes (noise compresses badly), so the disk
    # fills in the middle of writing one.
    disk = small_disk(1)
    out = disk / "out"
    proc = make_shards(images, out)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the progress bar
    assert "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("error: [Errno 28] No space left on device") and "rerun the same command" in last
    shards = sorted(out.glob("shard-*.tar"))
    assert shards and len(shards) < len(list(clean.glob("shard-*.tar"))), shards
    for shard in shards:  # whatever is visible is whole: byte-identical to the clean run's shard
        assert shard.read_bytes() == (clean / shard.name).read_bytes(), shard.name
    assert not (out / "manifest.json").exists()

    small_disk(16)
    proc = make_shards(images, out)
    assert proc.returncode == 0, proc.stderr
    assert files(out) == files(clean)


def train(shards: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "launch/train.py", "--config", "configs/tiny_test.yaml", f"data.train={shards}",
        "eval.sets=[]", f"run.out_dir={run_dir}", "run.steps=6", "run.checkpoint_every=3", "run.log_every=1",
        "run.keep_checkpoints=2", "data.num_workers=0", "run.threads_per_rank=1", *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_checkpoint_on_a_full_disk_keeps_latest_on_the_last_whole_one(tmp_path, small_disk):
    from clip_pipe.classifier import ZeroShotClassifier

    shards = write_train_shards(tmp_path / "train", [40])
    reference = tmp_path / "reference"
    assert train(shards, reference).returncode == 0
    step_3 = reference / "checkpoints" / "step_00000003"
    checkpoint_bytes = sum(p.stat().st_size for p in step_3.iterdir())

    # Room for one checkpoint and the run's small files, not for a second checkpoint.
    disk = small_disk(1.5 * checkpoint_bytes / 2**20)
    run_dir = disk / "run"
    proc = train(shards, run_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # One line (after the progress bar's carriage returns), no traceback.
    assert proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    assert "error: [Errno 28] No space left on device\n" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000003"
    assert (checkpoints / "step_00000006").is_dir(), "the second checkpoint was attempted"
    # The previous checkpoint is whole: its exported model loads, through `latest`, as users load it.
    ZeroShotClassifier.from_checkpoint(run_dir)

    small_disk(4 * checkpoint_bytes / 2**20)
    proc = train(shards, run_dir, "--resume", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 3" in (run_dir / "train.log").read_text()
    expected = load_file(reference / "model.safetensors")
    actual = load_file(run_dir / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
