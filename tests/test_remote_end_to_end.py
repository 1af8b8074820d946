"""`deepspeed launch/train.py` on 2 ranks trains from s3:// shards in img2dataset's layout (real images:
Fashion-MNIST) exactly as from the same shards on local disk."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clip_pipe.distributed import free_port
from clip_pipe.prep.fashion_mnist import DEFAULT_ROOT, load_split, train_caption
from tests.capabilities import needs
from tests.conftest import REPO, write_eval_set
from tests.remote_helpers import write_img2dataset_shards

pytestmark = [
    pytest.mark.slow,
    needs(
        (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file(),
        "Fashion-MNIST",
        f"not installed in {DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
    ),
]


def fashion_mnist_shards(folder: Path, shard_sizes: list[int]) -> Path:
    """The first rows of Fashion-MNIST's train split as img2dataset would have downloaded them."""
    from PIL import Image

    images, labels = load_split(DEFAULT_ROOT, "train")

    def sample(index, rng):
        ext = ("png", "jpg", "webp")[index % 3]
        buffer = io.BytesIO()
        Image.fromarray(images[index]).save(buffer, {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext])
        return ext, buffer.getvalue(), train_caption(int(labels[index]), index, seed=0)

    return write_img2dataset_shards(folder, shard_sizes, image=sample)


def train(run_dir: Path, train: str, eval_set: Path, *overrides: str, env: dict | None = None) -> None:
    command = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", f"--master_port={free_port()}",
        "launch/train.py", "--config", "configs/tiny_test.yaml", f"data.train={train}", f"eval.sets=[{eval_set}]",
        f"run.out_dir={run_dir}", "run.steps=12", "run.log_every=1", "run.checkpoint_every=100",
        "data.num_workers=1", "data.batch_size=16", "model.context_length=16", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_train_from_s3_img2dataset_shards_as_from_local_disk(tmp_path, s3):
    folder = fashion_mnist_shards(tmp_path / "fmnist", [96, 80, 72, 64])  # uneven; no sizes.json
    eval_set = write_eval_set(tmp_path / "eval")
    prefix = s3.upload(folder, "fmnist")
    cache = tmp_path / "cache"

    train(tmp_path / "local", f"{folder}/{{00000..00003}}.tar", eval_set)
    train(
        tmp_path / "s3",
        prefix + "{00000..00003}.tar",
        eval_set,
        f"data.cache_dir={cache}",
        "data.cache_limit=1GB",
    )

    losses = {}
    for name in ("local", "s3"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if "loss" in r]
        assert len(losses[name]) == 12 and all(r["num_skipped"] == 0 for r in records if "loss" in r)
    assert losses["s3"] == losses["local"]
    local, remote = (
        load_file(tmp_path / "local" / "model.safetensors"),
        load_file(tmp_path / "s3" / "model.safetensors"),
    )
    for key in local:
        assert torch.equal(local[key], remote[key]), key
    # 12 steps x 32 = 384 samples: more than the 312 in the shards, so every shard was read, and each
    # loader worker kept what it read in the cache, whole.
    assert sorted(p.name.split("-", 1)[1] for p in (cache / "shards").iterdir()) == [
        f"{i:05d}.tar" for i in range(4)
    ]
    for entry in (cache / "shards").iterdir():
        assert entry.read_bytes() == (folder / entry.name.split("-", 1)[1]).read_bytes()
    gets = {Path(r.path).name for r in s3.faults.gets(".tar")}
    assert gets == {f"{i:05d}.tar" for i in range(4)}
