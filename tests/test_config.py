"""The config tree: typed, validated, and strict about keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from clip_pipe.config import TrainConfig, load_config, save_config
from tests.conftest import REPO


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_typed_config(tmp_path):
    path = write(tmp_path, "data:\n  train: /x\nrun:\n  steps: 7\n")
    cfg = load_config(
        path, ["optim.lr=3e-4", "run.zero_stage=2", "eval.sets=[/a, /b]", "model.hf_text_model=null"]
    )
    assert isinstance(cfg, TrainConfig)
    assert cfg.data.train == ["/x"] and cfg.run.steps == 7 and cfg.run.zero_stage == 2
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.eval.sets == ["/a", "/b"] and cfg.model.hf_text_model is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["bogus.x=1"], "unknown config key 'bogus'"),
        (["run.steps=ten"], "config key 'run.steps' expects int"),
        (["run.steps=1.5"], "config key 'run.steps' expects int"),
        (["run.precision=fp16"], "run.precision must be 'fp32' or 'bf16'"),
        (["run.zero_stage=4"], "run.zero_stage must be 0, 1, 2 or 3"),
        (["optim.accum_steps=0"], "optim.accum_steps must be >= 1"),
        (
            ["data.batch_size=6", "optim.accum_steps=4"],
            "data.batch_size (6) must be a multiple of optim.accum_steps",
        ),
        (["optim.grad_clip=-1"], "optim.grad_clip must be >= 0"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        (["run=5"], "run must be a mapping"),
        (["novalue"], "must look like key.sub=value"),
        (["data.sources=[{train: /y}]"], "give data.train (one source) or data.sources, not both"),
        (
            ["data.num_workers=9", "data.batch_size=8"],
            "data.num_workers (9) must be at most data.batch_size (8)",
        ),
        (["data.num_streams=-1"], "data.num_streams must be >= 0"),
    ],
)
def test_bad_keys_and_values_are_errors_that_name_them(overrides, message):
    with pytest.raises(ValueError) as info:
        load_config(None, ["data.train=/x", *overrides])
    assert message in str(info.value)


@pytest.mark.parametrize(
    "sources, message",
    [
        ("[{train: /a, wieght: 2}]", "unknown config key 'data.sources[0].wieght' (did you mean"),
        ("[{train: /a, weight: 0}]", "data.sources: weight must be > 0, got 0"),
        ("[{weight: 1}]", "each entry of data.sources needs train"),
        ("[/a, /b]", "data.sources[0] must be a mapping"),
    ],
)
def test_bad_sources_are_errors_that_name_them(sources, message):
    with pytest.raises(ValueError) as info:
        load_config(None, [f"data.sources={sources}"])
    assert message in str(info.value)


def test_sources_mix_and_train_is_the_one_source_shorthand():
    cfg = load_config(None, ["data.sources=[{train: /a, weight: 0.7}, {train: [/b, /c], weight: 0.3}]"])
    assert [(s.train, s.weight) for s in cfg.data.source_list] == [(["/a"], 0.7), (["/b", "/c"], 0.3)]
    assert [(s.train, s.weight) for s in load_config(None, ["data.train=/a"]).data.source_list] == [
        (["/a"], 1.0)
    ]


def test_missing_train_data_is_an_error():
    with pytest.raises(ValueError, match=r"data\.train"):
        load_config(None, [])


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    if "train" in raw.get("data", {}):  # a recipe for its own data (the demo, the corpora, the tests)
        cfg = load_config(recipe)
    else:  # a recipe for the user's data: it names none, and no eval sets either
        assert not raw.get("eval", {}).keys() & {"sets", "retrieval_sets", "linear_probe_train"}, raw["eval"]
        with pytest.raises(
            ValueError, match=r"data\.train \(or data\.sources\) must name at least one shard folder"
        ):
            load_config(recipe)
        cfg = load_config(recipe, ["data.train=/my/shards"])
    # What a run saves as its resolved config.yaml loads back to the same config, with no key lost.
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.slow
def test_own_data_recipe_scores_the_users_eval_sets_only(tmp_path, color_shards, color_eval_set):
    # The README's command for your own data, run where the demo's data may exist: only the set the user
    # names is evaluated, with no retrieval or probe sets of the demo's.
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "launch/train.py", "--config", "configs/small.yaml", f"data.train={color_shards}",
        f"eval.sets=[{color_eval_set}]", f"run.out_dir={run_dir}", "run.steps=2", "data.batch_size=16",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "eval.json").read_text())
    assert list(results) == [color_eval_set.name]
    assert results[color_eval_set.name]["kind"] == "classification"
    assert not any(key.startswith("linear_probe") for key in results[color_eval_set.name])


def test_cli_reports_bad_key_without_traceback(tmp_path):
    path = write(tmp_path, "data:\n  train: /x\n  batchsize: 3\n")
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown config key 'data.batchsize' (did you mean 'data.batch_size'?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(REPO / "configs" / "fashion_mnist.yaml", ["optim.lr=1e-4", "eval.sets=[]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
