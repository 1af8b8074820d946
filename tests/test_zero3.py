"""ZeRO-3 end to end: 2-rank training with partitioned parameters, evaluation, the report, and export.

Under ZeRO-3 every forward pass gathers parameter slices from every rank, so evaluation deadlocks
unless all ranks run the same number of forward passes. The eval set here has 41 images: the ranks'
shares (21 and 20) make 6 and 5 batches of 4, so the padding and masking must be right for the run to
finish and for its counts to match a single-process evaluation of the exported model.
"""

from __future__ import annotations

import json

import pytest

from clip_pipe.config import load_config
from clip_pipe.eval import embed, evaluate, read_eval_set
from clip_pipe.model import load_export
from tests.conftest import REPO, run_ranks, write_eval_set
from tests.eval_helpers import write_pairs_set
from tests.test_engine import partition_everything

pytestmark = pytest.mark.slow


def _train(rank: int, world_size: int, overrides: list[str]) -> None:
    from clip_pipe.train import train

    train(load_config(REPO / "configs" / "tiny_test.yaml", overrides))


def test_zero3_trains_evaluates_and_exports(tmp_path, color_shards):
    eval_set = write_eval_set(tmp_path / "eval", num_samples=41)
    pairs = write_pairs_set(tmp_path / "pairs", num_images=9)
    run_dir = tmp_path / "run"
    overrides = [
        f"data.train={color_shards}", f"eval.sets=[{eval_set}]", f"run.out_dir={run_dir}",
        f"eval.retrieval_sets=[{pairs}]", f"eval.linear_probe_train={pairs}",
        f"run.deepspeed_config={partition_everything(tmp_path)}", "run.zero_stage=3", "run.steps=6",
        "run.checkpoint_every=3", "run.threads_per_rank=1", "eval.batch_size=4", "eval.every_steps=3",
    ]  # fmt: skip
    run_ranks(_train, 2, overrides, timeout=300)

    everything = json.loads((run_dir / "eval.json").read_text())
    results = everything["eval"]
    assert results["num_samples"] == 41 and results["num_skipped"] == 0
    assert json.loads((run_dir / "zeroshot.json").read_text()) == {"eval": results}  # still written
    assert everything["pairs"]["num_images"] == 9
    assert results["linear_probe_train_samples"] == 18  # every rank's share of the probe's training set
    assert "linear_probe_top1" not in everything["pairs"]  # the probe's own training set
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "zeroshot_top1" in r] == [3, 6]
    assert [(r["step"], r["eval_set"]) for r in records if "alignment" in r] == [
        (3, "eval"),
        (3, "pairs"),
        (6, "eval"),
        (6, "pairs"),
    ]
    assert [r["step"] for r in records if "image_retrieval_recall@1" in r] == [3, 6]
    assert (run_dir / "report" / "index.html").read_text().count("data:image/png;base64,") == 8
    assert (run_dir / "report" / "pairs_retrieval.png").is_file()
    assert all(r["logit_scale"] > 1 for r in records if "loss" in r)  # gathered, not an empty slice

    # The exported model.safetensors is whole: open_clip loads it (strictly), and a one-process evaluation of
    # it agrees with the 2-rank ZeRO-3 one, so no padding row was counted.
    encoder = load_export(run_dir / "model.safetensors")
    towers = encoder.model, encoder.preprocess_val, encoder.tokenizer
    probe = embed(*towers, read_eval_set(pairs), 4)
    again = evaluate(*towers, read_eval_set(eval_set), 4, probe_train=probe)
    assert again["num_samples"] == 41
    probe_keys = [f"linear_probe_{m}" for m in ("top1", "top5", "mean_per_class_recall", "C")]
    for key in ("top1", "top5", "mean_per_class_recall", "per_class_accuracy", *probe_keys):
        assert again[key] == pytest.approx(results[key], abs=1e-6), key
    # So does the checkpoint's export, and the checkpoint itself is DeepSpeed's partitioned one.
    checkpoint = run_dir / "checkpoints" / "step_00000006"
    assert (checkpoint / "model.safetensors").is_file() and list(checkpoint.glob("*optim_states.pt"))
