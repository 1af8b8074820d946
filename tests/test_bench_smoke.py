"""Every benchmark still runs: each bench/ script once, on tiny inputs, in seconds, so a broken benchmark
shows here and not on the day someone needs its numbers. These check that a script runs to its table;
the figures mean nothing at this size. Where a benchmark compares against a tool CI is not set up with
(img2dataset, infinity, a CUDA device), our half runs and the test then skips saying what is missing."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import webdataset as wds

from bench.elastic import BASELINE
from clip_pipe.config import ModelConfig
from clip_pipe.model import build_model, save_export
from tests.capabilities import missing, needs
from tests.conftest import COLORS, REPO, color_jpeg, write_eval_set, write_train_shards

pytestmark = pytest.mark.slow

BENCH = REPO / "bench"
IMPORTED_ONLY = {"__init__.py", "common.py"}  # imported by the scripts, not run
NOT_ON_A_CPU = {
    "gpu.sh": "runs the gpu-marked tests and the gpu_* benches on a lent GPU machine (nvidia-smi, CUDA)",
    "gpu_wheels.sh": "downloads wheels from PyPI for the GPU machine (network, not a benchmark)",
}
NO_CUDA = "a CUDA device", "the gpu_* benches time CUDA kernels; run bench/gpu.sh on a lent GPU machine"
TUXPAINT = Path("/usr/share/tuxpaint/stamps")  # bench/decode's default images
HAS_TUXPAINT = TUXPAINT.is_dir()
NO_TUXPAINT = (
    "Tux Paint stamps",
    "bench/decode builds its shards from them: apt-get install tuxpaint-stamps-default",
)
# bench/elastic measures against an export of the per-slot loader's commit: a full clone has it.
HAS_BASELINE = subprocess.run(["git", "cat-file", "-e", f"{BASELINE}^{{commit}}"], cwd=REPO).returncode == 0
NO_BASELINE = (
    f"commit {BASELINE}",
    "bench/elastic exports the per-slot loader from it: a full clone (not shallow)",
)


def run_bench(module: str, *args: str) -> str:
    """`python -m bench.<module> ARGS` from the repository root; its stdout, after checking it succeeded."""
    command = [sys.executable, "-m", f"bench.{module}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def last_json(stdout: str) -> dict:
    """The JSON table a bench prints last (json.dumps(..., indent=2) starts it with a lone '{')."""
    return json.loads(stdout[stdout.rfind("\n{\n") + 1 :])  # from 0 where no line comes before it


def markdown_rows(stdout: str, header: str) -> list[list[str]]:
    """The cells of each row of the last markdown table whose header line starts with `header`."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(header))
    assert lines[start + 1].startswith("|---"), lines[start + 1]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def ratio_cell(cell: str) -> tuple[float, float, float]:
    """'1.23x (0.98-1.40)' or '1.230 (0.980–1.400)': median, min, max; checks min <= median <= max."""
    median, low, high = map(float, re.fullmatch(r"([\d.]+)x? \(([\d.]+)x?[-–]([\d.]+)x?\)", cell).groups())
    assert 0 < low <= median <= high, cell
    return median, low, high


def write_jpeg_shards(folder: Path, num_samples: int, side: int, seed: int) -> Path:
    """One shard of `side`-pixel colour squares captioned with their colour, plus sizes.json: big enough
    that the reduced-scale decode applies to a 28-pixel crop (tests.conftest's shards are 16 pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with wds.TarWriter(str(folder / "shard-000000.tar"), mtime=0) as writer:
        for index in range(num_samples):
            color = rng.choice(list(COLORS))
            jpeg = color_jpeg(color, rng, size=side)
            writer.write(
                {"__key__": f"{seed}{index:08d}", "jpg": jpeg, "txt": f"a photo of a {color} square"}
            )
    (folder / "sizes.json").write_text(json.dumps({"shard-000000.tar": num_samples}))
    return folder


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
    jpeg_train = write_jpeg_shards(folder / "jpeg_train", 48, 64, seed=0)
    jpeg_heldout = write_jpeg_shards(folder / "jpeg_heldout", 16, 64, seed=1)
    return {
        # The smallest of each part: one engine model, precision and stage; ViT-S-32 at batch 2; one loss size.
        "plan_check": [
            "--engine-models", "38.7M", "--engine-precisions", "fp32", "--engine-stages", "0",
            "--ckpt-model", "ViT-S-32", "--ckpt-batches", "2", "--loss-sizes", "256",
        ],
        # One seed, one masking ratio against none, then its unmasked tune; no equal-time runs.
        "patch_dropout_demo": [
            "--steps", "3", "--tune-steps", "1", "--seeds", "0", "--equal-time-seeds", "--ratios", "0", "0.5",
            "--ranks", "1", "--out", str(folder / "patch_dropout"), "--config", "configs/tiny_test.yaml",
            "--eval-set", str(eval_set), "--set", f"data.train={train}",
        ],
        **({"elastic": [
            "--shards", str(train), "--batch", "8", "--batches", "2", "--warmup", "1", "--rounds", "1",
            "--resume-at", "3", "--shuffle-buffer", "16",
        ]} if HAS_BASELINE else {}),
        "gpu_levers": ["--smoke", "--planner-gpu", "H100-SXM"],  # its CPU mode: the checks and the table
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
        "levers": ["tower", "--b16-batch", "1", "--rounds", "1"],
        "decode_accuracy": [
            "--train", str(jpeg_train), "--heldout", str(jpeg_heldout), "--seeds", "0", "--steps", "2",
            "--batch", "8",
        ],
        **({"decode": ["--smoke", "--root", str(TUXPAINT)]} if HAS_TUXPAINT else {}),
        "remote_fetch": [
            "--rounds", "1", "--shards", "2", "--shard-mb", "0.5", "--fetches", "1", "4", "--latency-ms", "1",
            "--mb-per-s", "100",
        ],
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


def test_plan_check(smoke):
    result = last_json(smoke["plan_check"].result())
    engine = [(r["model"], r["precision"], r["zero_stage"]) for r in result["engine"]]
    assert engine == [("fixed cost", "fp32", 0), ("38.7M", "fp32", 0)]
    checkpointing = [(r["model"], r["batch"], r["checkpointing"]) for r in result["checkpointing"]]
    assert checkpointing == [("ViT-S-32", 2, False), ("ViT-S-32", 2, True)]
    assert [(r["loss"], r["B_local"]) for r in result["loss"]] == [
        ("clip-pipe tiled", 256), ("open_clip ClipLoss", 256),
    ]  # fmt: skip
    measured = [r for part in ("engine", "checkpointing", "loss") for r in result[part] if "ratio" in r]
    for row in measured:
        assert row["predicted_mib"] > 0 and row["measured_mib"] > 0
        # Predicted over measured, within 3x even at this size: a unit slip (bytes, KiB, MiB) or a term
        # dropped from the planner lands far outside.
        assert 1 / 3 < row["ratio"] < 3 and row["ratio"] == pytest.approx(
            row["predicted_mib"] / row["measured_mib"]
        )
    assert result["summary"]["num_points"] == len(measured) == 5
    published = result["published"]
    runs = {r["run"] for r in published["throughput"]}
    assert {f"open_clip {m}" for m in ("ViT-B-16", "ViT-L-14", "ViT-H-14")} < runs
    assert sum(r["as_published"] for r in published["throughput"]) == len(runs)  # each run once as published
    assert all(r["predicted"] > 0 and r["ratio"] > 0 for r in published["throughput"])
    assert len(published["datacomp"]) == 2 and len(published["inf_cl"]) == 3


def test_patch_dropout_demo(smoke):
    lines = smoke["patch_dropout_demo"].result().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("patch dropout  variant"))
    rows = [line.split() for line in lines[start + 1 : start + 4]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("0.0", "unmasked", "3"),
        ("0.5", "masked", "3"),
        ("0.5", "tuned", "1"),
    ]
    for row in rows:
        top1 = float(row[3].rstrip("%"))
        assert 0 <= top1 <= 100 and row[-1] == "1", row  # one seed
    speedup = re.fullmatch(
        r"train-time speedup over unmasked \(median over seeds\): 0\.5: ([\d.]+)x", lines[-1]
    )
    assert speedup and float(speedup[1]) > 0, lines[-1]


@needs(HAS_BASELINE, *NO_BASELINE, expected_in_ci=False)  # CI may clone shallow
def test_elastic(smoke):
    table = last_json(smoke["elastic"].result())
    assert table["commits"]["per_slot"] == BASELINE
    for figure in ("samples_per_s", "first_batch_s_resumed_at_step_3"):
        both = table[figure]
        assert both["elastic"] > 0 and both["per_slot"] > 0, figure
        low, high = both["ratio_range"]
        assert 0 < low <= both["ratio_median"] <= high
        assert both["ratio_median"] == pytest.approx(both["elastic"] / both["per_slot"])  # one round


def test_gpu_levers(smoke):
    out = smoke["gpu_levers"].result()
    for check in ("patch dropout", "checkpointing fp32", "checkpointing bf16", "locked image tower"):
        assert f"\nok  {check}: " in out, check
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    assert lines[start].endswith("planner's prediction for H100-SXM")
    rows = lines[start + 1 :]
    variants = [
        "plain",
        "patch dropout 0.5",
        "patch dropout 0.75",
        "checkpointing",
        "checkpointing + patch dropout 0.5",
    ]
    assert [row[:34].strip() for row in rows] == variants
    plain = float(rows[0][34:].split()[0])
    for row in rows:
        rate, versus = (float(cell.rstrip("x")) for cell in row[34:].split()[:2])
        # the ratio of the two rates, as far as the printed rates (whole samples/s) and ratio tell
        assert (
            rate > 0
            and (rate - 0.5) / (plain + 0.5) - 0.005 <= versus <= (rate + 0.5) / (plain - 0.5) + 0.005
        ), row
        assert re.search(r"planner: \d+ samples/s at \d+% utilisation, peak [\d.]+ GiB$", row), row


def test_levers(smoke):
    out = smoke["levers"].result()
    for model in ("clip-pipe-small-28", "ViT-B-16"):
        lines = out.split(f"\n{model} image tower, ")[1].splitlines()
        assert lines[1].split() == ["patch", "dropout", "samples/s", "vs", "0", "min-max"]
        rows = [line.split() for line in lines[2:5]]
        assert [r[0] for r in rows] == ["0.0", "0.5", "0.75"] and rows[0][2] == "1.00x"
        assert all(float(r[1]) > 0 and float(r[2].rstrip("x")) > 0 for r in rows)


def test_decode_accuracy(smoke):
    out = smoke["decode_accuracy"].result()
    share = re.search(r"full vs reduced-scale decode; (\d+)% of crops reduced; seeds \[0\]", out)
    assert share and int(share[1]) > 0, "64-pixel images: some 28-pixel crops decode at a reduced scale"
    rows = markdown_rows(out, "| metric |")
    metrics = [f"{d}_retrieval_recall@{k} (%)" for k in (1, 5, 10) for d in ("image", "text")]
    assert [r[0] for r in rows] == metrics
    for _, full, reduced, delta in rows:
        full, reduced = (float(cell.split()[0]) for cell in (full, reduced))
        assert 0 <= full <= 100 and 0 <= reduced <= 100
        assert float(delta.split()[0]) == pytest.approx(reduced - full, abs=0.01)


@needs(HAS_TUXPAINT, *NO_TUXPAINT)
def test_decode(smoke):
    rows = markdown_rows(smoke["decode"].result(), "| shard | open_clip | ours |")
    assert [r[0].split(" (")[0] for r in rows] == ["stamps, 128 px", "photos, 128 px"]
    for row in rows:
        assert "(6 JPEGs, " in row[0]
        assert all(float(rate.replace(",", "")) > 0 for rate in row[1:5]), row
        for ratio in row[5:8]:
            ratio_cell(ratio)
        assert 0 <= int(row[8].rstrip("%")) <= 100


def test_remote_fetch(smoke):
    rows = markdown_rows(smoke["remote_fetch"].result(), "| reader |")
    assert [r[0] for r in rows] == ["local disk", "HTTP, data.num_fetches=1", "HTTP, data.num_fetches=4"]
    assert rows[0][2] == "1.000 (1.000–1.000)"
    local = float(rows[0][1])
    for _, rate, ratio in rows:
        assert float(rate) > 0
        # one round: the ratio is the two rates'
        assert ratio_cell(ratio)[0] == pytest.approx(float(rate) / local, rel=0.02, abs=0.001), (rate, ratio)
