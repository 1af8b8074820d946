"""Every benchmark still runs: each bench/ script once, on tiny inputs, in seconds, so a broken benchmark
shows here and not on the day someone needs its numbers. These check that a script runs to its table;
the figures mean nothing at this size. Where a benchmark compares against a tool CI is not set up with
(img2dataset, infinity, a CUDA device), our half runs and the test then skips saying what is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from clip_pipe.config import ModelConfig
from clip_pipe.model import build_model, save_export
from tests.capabilities import missing, needs
from tests.conftest import REPO, write_eval_set, write_train_shards

pytestmark = pytest.mark.slow

BENCH = REPO / "bench"
IMPORTED_ONLY = {"__init__.py", "common.py"}  # imported by the scripts, not run
NOT_ON_A_CPU = {
    "gpu.sh": "runs the gpu-marked tests and the gpu_* benches on a lent GPU machine (nvidia-smi, CUDA)",
    "gpu_wheels.sh": "downloads wheels from PyPI for the GPU machine (network, not a benchmark)",
}
NO_CUDA = "a CUDA device", "the gpu_* benches time CUDA kernels; run bench/gpu.sh on a lent GPU machine"


def run_bench(module: str, *args: str) -> str:
    """`python -m bench.<module> ARGS` from the repository root; its stdout, after checking it succeeded."""
    command = [sys.executable, "-m", f"bench.{module}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def last_json(stdout: str) -> dict:
    """The JSON table a bench prints last (json.dumps(..., indent=2) starts it with a lone '{')."""
    return json.loads(stdout[stdout.rindex("\n{\n") + 1 :] if not stdout.startswith("{\n") else stdout)


def test_every_bench_script_has_a_smoke_run():
    scripts = {p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh")} - IMPORTED_ONLY
    smoked = {name for name in scripts if f"test_{Path(name).stem}" in globals()}
    assert scripts - smoked == set(NOT_ON_A_CPU), "a bench script without a test_<name> here"


def smoke_commands(folder: Path) -> dict[str, list[str]]:
    """Each CPU bench's arguments for a seconds-long run, longest first."""
    train, eval_set = write_train_shards(folder / "train", [40, 24]), write_eval_set(folder / "eval", 16)
    tiny_training = ["--config", "configs/tiny_test.yaml", "--ranks", "1", "--set", f"data.train={train}"]
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(name="clip-pipe-test"))
    model_file = save_export(encoder.model, encoder.model_cfg, folder / "model")
    infinity = os.environ.get("INFINITY_EMB") or shutil.which("infinity_emb")
    return {
        "train_throughput": [
            "--shards", str(train), "--eval-set", str(eval_set), "--batch", "4", "--short", "1", "--long", "2",
            "--rounds", "1", "--precision", "fp32", "--log-every", "1",
        ],
        # One size for both losses: a memory run each, then one timed pair; no demo-size timing.
        "loss": [
            "--sizes", "256", "--calibrate", "256", "--dim", "64", "--tile", "64", "--repeats", "1",
            "--demo-repeats", "0", "--cap-gib", "1",
        ],
        # Two variants, so the table's differences to the first are computed too.
        "objectives": [
            "--only", "infonce", "siglip", "--seeds", "0", "--steps", "3", *tiny_training,
            f"eval.sets=[{eval_set}]",
        ],
        "ssl_throughput": ["--steps", "3", "--skip", "0", "--log-every", "1", "--rounds", "1", *tiny_training],
        "serve_load": [
            "--model", "clip-pipe-test", "--clients", "2", "--requests", "3", "--warmup", "1", "--rounds", "1",
            *(["--infinity", infinity] if infinity else []),
        ],
        "soak": ["--clients", "4", "--seconds", "2", "--warmup", "1", "--slowloris", "2"],
        "hf_clip": [str(model_file), str(folder / "hf")],  # it checks the two models' embeddings itself
        "loader": ["--shards", str(train), "--batch", "8", "--batches", "2", "--rounds", "1", "--profile-samples", "16"],
        "prep": ["--smoke", "--work", str(folder / "prep")],
        "remote_loader": ["--smoke"],  # generated images; MosaicML Streaming's row where MOSAIC_STREAMING is set
    }  # fmt: skip


@pytest.fixture(scope="module")
def smoke(request, tmp_path_factory) -> dict[str, Future]:
    """The selected benches' runs, started together two at a time, in the order of the tests below; each
    test waits for its own output.

    Most of a run is one process importing torch and friends, so two at a time keep both cores busy and
    take about half the time of one after another.
    """
    selected = {item.name.removeprefix("test_") for item in request.session.items}
    commands = smoke_commands(tmp_path_factory.mktemp("bench_smoke"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {
            name: pool.submit(run_bench, name, *args) for name, args in commands.items() if name in selected
        }
        yield runs
        for run in runs.values():
            run.cancel()  # any not started yet, when a test failed before waiting for them


def test_train_throughput(smoke):
    table = last_json(smoke["train_throughput"].result())["fp32"]
    assert set(table) == {"clip-pipe", "open_clip_train"}
    for tool in table.values():
        assert tool["logged_samples_per_s"] > 0 and 0 <= tool["zeroshot_top1_per_seed"][0] <= 1
    assert table["clip-pipe"]["logged_ratio_vs_open_clip_train"]["median"] > 0


def test_loss(smoke):
    result = last_json(smoke["loss"].result())
    (row,) = result["rows"]
    assert row["B_local"] == 256 and row["num_pairs"] == 1 and row["memory_ratio"] > 0
    fits = result["largest_B_local_in_budget (extrapolated from the measured peaks)"]
    assert set(fits) == {"1 GiB cap", "ClipLoss's peak at B_local 256"}


def test_objectives(smoke):
    header, _, infonce, siglip = smoke["objectives"].result().splitlines()[-4:]
    assert header.startswith("| variant | eval/top1 |"), header
    assert infonce.startswith("| infonce |") and siglip.startswith("| siglip |") and "Δ" in siglip


def test_ssl_throughput(smoke):
    table = last_json(smoke["ssl_throughput"].result())
    assert table["samples_per_s_without"] > 0 and table["samples_per_s_with"] > 0


def test_serve_load(smoke):
    out = smoke["serve_load"].result()
    assert "| batched (--max-batch 32) |" in out and "| one-at-a-time (--max-batch 1) |" in out
    if "clip-pipe vs infinity" not in out:
        missing(
            "infinity_emb", "ours ran; for infinity's half put infinity_emb on PATH or set INFINITY_EMB "
            "(its own venv: pip install 'infinity-emb[all]' aiohttp)", expected_in_ci=False,
        )  # fmt: skip


def test_soak(smoke):
    result = last_json(smoke["soak"].result())
    assert result["valid"] > 0 and result["invalid"] > 0 and result["server_alive"]


def test_hf_clip(smoke):
    assert "transformers CLIPModel with the same embeddings" in smoke["hf_clip"].result()


def test_loader(smoke):
    table = last_json(smoke["loader"].result())["samples_per_s_per_worker"]
    assert table["clip-pipe"] > 0 and table["open_clip_train"] > 0 and table["ratio_median"] > 0


def test_prep(smoke):
    out = smoke["prep"].result()
    ours = out.split("| clip-pipe |")[1].splitlines()[0]
    assert ours.endswith("| 24 |"), ours  # every image written
    assert "| 100 |" in out and "| 200 |" in out  # the memory table's rows
    if "img2dataset not found" in out:
        missing(
            "img2dataset", "ours ran; for img2dataset's half put it on PATH or set IMG2DATASET "
            "(its own venv: pip install img2dataset)", expected_in_ci=False,
        )  # fmt: skip
    assert "| ratio (ours / img2dataset) |" in out


def test_remote_loader(smoke):
    out = smoke["remote_loader"].result()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    for name in (
        "ours, local disk",
        "ours, HTTP",
        "ours, S3",
        "open_clip, local disk",
        "open_clip, HTTP (pipe:curl)",
    ):
        assert float(rows[name].split(" | ")[1]) > 0, rows[name]  # samples/s
        assert not name.startswith("ours") or rows[name].endswith("| 0 |"), rows[name]  # none stood in for
    for goal in (
        "ours HTTP / ours local ≥ 0.9",
        "ours S3 / ours local ≥ 0.9",
        "ours HTTP / open_clip HTTP ≥ 4",
    ):
        assert rows[goal].endswith(("| met |", "| not met |")), rows[goal]
    if "MosaicML Streaming not found" in out:
        missing(
            "mosaicml-streaming", "ours and open_clip's ran; for Mosaic's row: pip install --target DIR --no-deps "
            "mosaicml-streaming xxhash zstd python-snappy brotli cramjam catalogue; MOSAIC_STREAMING=DIR",
            expected_in_ci=False,
        )  # fmt: skip
    assert float(rows["MosaicML Streaming, S3 (MDS)"].split(" | ")[1]) > 0


@needs(torch.cuda.is_available(), *NO_CUDA, expected_in_ci=False)
def test_gpu_loss():
    out = run_bench("gpu_loss", "--sizes", "1024", "--dim", "64", "--repeats", "1")
    assert out.count("  1024  ") == 2  # a row per loss


@needs(torch.cuda.is_available(), *NO_CUDA, expected_in_ci=False)
def test_gpu_train():
    out = run_bench("gpu_train", "--short", "1", "--long", "2", "--images", "64", "--workers", "2")
    assert "clip-pipe / open_clip_train:" in out
