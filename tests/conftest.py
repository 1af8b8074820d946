"""Shared fixtures: tiny shard sets written per test, and real multi-process runs over gloo."""

from __future__ import annotations

import io
import json
import os
import random
import time
import traceback
from pathlib import Path

import pytest
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

# Hooks: a missing capability skips locally and fails under CI=true.
from tests.capabilities import pytest_configure, pytest_runtest_setup  # noqa: F401

# Any accidental hub download fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]

# Tests whose results could depend on the CPU's kernels (reduction order, tie order, rounding): losses,
# eval metrics, the engine's equality with plain PyTorch, the tar and image-header readers. `.ci/run`
# runs them again under the AVX2 and baseline x86-64 kernels (scripts/emulate_cpu.sh).
NUMERICS_MODULES = {
    "test_loss", "test_siglip", "test_ssl", "test_eval_metrics", "test_eval", "test_eval_distributed",
    "test_engine", "test_accum", "test_clipping", "test_tar", "test_image_size", "test_bf16_cpu",
}  # fmt: skip


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.module.__name__.rpartition(".")[2] in NUMERICS_MODULES:
            item.add_marker(pytest.mark.numerics)


COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def color_jpeg(name: str, rng: random.Random, size: int = 16) -> bytes:
    base = COLORS[name]
    pixel = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in base)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), pixel).save(buffer, "JPEG")
    return buffer.getvalue()


def write_train_shards(folder: Path, shard_sizes: list[int], seed: int = 0, first_key: int = 0) -> Path:
    """Shards of solid-colour squares captioned with their colour, plus sizes.json; keys count up from
    `first_key`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes, key = {}, first_key
    for index, num_samples in enumerate(shard_sizes):
        name = f"shard-{index:06d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for _ in range(num_samples):
                color = rng.choice(list(COLORS))
                writer.write(
                    {
                        "__key__": f"{key:09d}",
                        "jpg": color_jpeg(color, rng),
                        "txt": f"a photo of a {color} square",
                    }
                )
                key += 1
        sizes[name] = num_samples
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return folder


def write_eval_set(folder: Path, num_samples: int = 40, seed: int = 1) -> Path:
    """A CLIP_benchmark-layout eval set of the same colour classes."""
    (folder / "test").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLORS)
    with wds.TarWriter(str(folder / "test" / "0.tar")) as writer:
        for i in range(num_samples):
            label = i % len(names)
            writer.write({"__key__": f"s{i:07d}", "jpg": color_jpeg(names[label], rng), "cls": str(label)})
    (folder / "test" / "nshards.txt").write_text("1\n")
    (folder / "classnames.txt").write_text("\n".join(names) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c} square\na {c} thing\n")
    return folder


@pytest.fixture
def color_shards(tmp_path) -> Path:
    """Uneven shards (50, 37, 13 samples), so ranks and workers cannot split them evenly."""
    return write_train_shards(tmp_path / "train", [50, 37, 13])


@pytest.fixture
def color_eval_set(tmp_path) -> Path:
    return write_eval_set(tmp_path / "eval")


def _rank_entry(rank: int, fn, world_size: int, port: int, args: tuple, error_dir: str) -> None:
    import faulthandler

    faulthandler.enable(all_threads=True)  # a rank killed by a signal (SIGABRT, SIGSEGV) shows where it was
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    try:
        fn(rank, world_size, *args)
    except BaseException:
        Path(error_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    import torch.distributed as dist

    # Leave together, as the trainer does; the engine's exit hook then leaves the group.
    if dist.is_initialized():
        dist.barrier()


def run_ranks(fn, world_size: int, *args, timeout: float = 300) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` real processes that can form a gloo group."""
    import tempfile

    from clip_pipe.distributed import free_port

    with tempfile.TemporaryDirectory() as error_dir:
        context = mp.start_processes(
            _rank_entry, args=(fn, world_size, free_port(), args, error_dir), nprocs=world_size,
            join=False, start_method="spawn",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    raise AssertionError(f"ranks still running after {timeout} s: the job hangs")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            errors = "\n".join(p.read_text() for p in sorted(Path(error_dir).glob("*.txt")))
            raise AssertionError(f"a rank failed:\n{errors}") from e


# --- Zero-shot API (classifier, CLI, HTTP service) ---------------------------------------------------


def train_color_export(folder: Path, num_steps: int = 60, seed: int = 0) -> Path:
    """A `clip-pipe-test` model taught the colour squares in-process (about a second), exported to `folder`."""
    import torch

    from clip_pipe.config import ModelConfig
    from clip_pipe.losses import ClipLoss
    from clip_pipe.model import build_model, save_export

    # Tiny ops: threads only contend with each other (16 s instead of 2 s on a busy 2-core machine).
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoder = build_model(ModelConfig(name="clip-pipe-test"))
    model, loss_fn, names = encoder.model.train(), ClipLoss(), list(COLORS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(num_steps):
        rng.shuffle(names)  # one square per colour: no duplicate captions in a batch
        images = torch.stack(
            [encoder.preprocess_val(Image.open(io.BytesIO(color_jpeg(c, rng)))) for c in names]
        )
        texts = encoder.tokenizer([f"a photo of a {c} square" for c in names])
        loss = loss_fn(*model(images, texts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(num_threads)
    return save_export(model.eval(), encoder.model_cfg, folder)


@pytest.fixture(scope="session")
def color_model(tmp_path_factory) -> Path:
    """The `model.safetensors` of a model that tells red, green, blue and yellow squares apart."""
    return train_color_export(tmp_path_factory.mktemp("color_model"))


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (its data is far too short for them)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def truncated_jpeg(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]  # the header survives; half the scan data does not


class LiveServer:
    """`clip-pipe serve` in a subprocess on a free 127.0.0.1 port; stopped (and reaped) on exit."""

    def __init__(self, checkpoint: Path, *args: str, env: dict | None = None):
        import subprocess
        import sys

        from clip_pipe.distributed import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "clip_pipe.cli", "serve", "--checkpoint", str(checkpoint)]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port), *args],
            cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip

    def __enter__(self) -> LiveServer:
        import httpx

        deadline = time.monotonic() + 120
        try:
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(f"server exited early:\n{self.process.stdout.read()}")
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server not up within 120 s"
                time.sleep(0.2)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except Exception:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


# --- SLURM (tests/slurm_cluster.py) ---


@pytest.fixture(scope="session")
def slurm_cluster():
    """The test SLURM cluster: SLURM_CONF's (from .ci/run), else one started for this session."""
    from tests.slurm_cluster import cluster_for_tests

    yield from cluster_for_tests()


# Real S3 (moto) and HTTP servers on loopback, with faults on demand: tests/remote_helpers.py.
@pytest.fixture(scope="session")
def s3_server():
    from tests.remote_helpers import s3_session_server

    yield from s3_session_server()


@pytest.fixture
def s3(s3_server):
    from tests.remote_helpers import s3_for_test

    yield from s3_for_test(s3_server)


@pytest.fixture
def http(tmp_path):
    from tests.remote_helpers import http_for_test

    yield from http_for_test(tmp_path / "www")
