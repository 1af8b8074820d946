"""The `clip-pipe` command, run as a user runs it: classify, eval, export, and one-line user errors."""

from __future__ import annotations

import importlib.metadata
import json
import random
import subprocess
import sys

import open_clip
import pytest
import torch
from conftest import REPO, color_jpeg

from clip_pipe.cli import main
from tests.capabilities import missing

LABELS = "red,green,blue,yellow"


def clip_pipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clip_pipe.cli", *map(str, args)], cwd=REPO, capture_output=True, text=True
    )


@pytest.fixture
def squares(tmp_path) -> list:
    rng = random.Random(4)
    paths = []
    for name in ("red", "blue", "yellow"):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(color_jpeg(name, rng))
        paths.append(path)
    return paths


def test_classify_prints_a_table(color_model, squares):
    proc = clip_pipe("classify", "--checkpoint", color_model, "--labels", LABELS, "--top-k", "2", *squares)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["image", "#1", "#2"]
    assert [row.split()[:2] for row in rows] == [[str(p), p.stem] for p in squares]
    assert all(0.5 < float(row.split()[2]) <= 1 for row in rows)


def test_classify_json_reports_a_bad_image_and_classifies_the_rest(color_model, squares, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    template = "a photo of a {c} square"
    proc = clip_pipe("classify", "--checkpoint", color_model, "--labels", LABELS, "--template", template, "--json",
                     squares[0], bad, squares[1])  # fmt: skip
    assert proc.returncode == 1
    rows = json.loads(proc.stdout)
    assert [row["image"] for row in rows] == [str(squares[0]), str(bad), str(squares[1])]
    assert rows[1] == {"image": str(bad), "error": "not a recognised image file"}
    assert [rows[0]["labels"][0]["label"], rows[2]["labels"][0]["label"]] == ["red", "blue"]
    assert sorted(x["label"] for x in rows[0]["labels"]) == sorted(LABELS.split(","))
    assert proc.stderr.strip() == f"error: {bad}: not a recognised image file"


def test_user_error_is_one_line_without_traceback():
    proc = clip_pipe("classify", "--checkpoint", "no/such/run", "--labels", "a,b", "x.jpg")
    assert proc.returncode == 2
    assert proc.stderr == "error: checkpoint not found: no/such/run\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classify", "--checkpoint", "{model}", "--labels", "cat,cat", "x.jpg"], "error: duplicate labels"),
        (["classify", "--checkpoint", "{model}", "--labels", "cat", "--template", "a", "x"], "needs {c}"),
        (["export", "--checkpoint", "{model}", "--out", "{model}"], "is the checkpoint itself"),
        (["eval", "--checkpoint", "{model}", "--eval-set", "no/such/set"], "no/such/set: no such folder"),
    ],
)
def test_user_errors_in_process(color_model, capsys, args, message):
    assert main([a.replace("{model}", str(color_model)) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_eval_scores_an_eval_set(color_model, color_eval_set, tmp_path):
    out = tmp_path / "results.json"
    proc = clip_pipe("eval", "--checkpoint", color_model, "--eval-set", color_eval_set, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "top-1 100.00%" in proc.stdout
    results = json.loads(out.read_text())["eval"]
    assert results["num_samples"] == 40 and results["top1"] == 1.0


def test_export_loads_in_open_clip_by_name_and_from_its_folder(color_model, tmp_path):
    out = tmp_path / "exported" / "open_clip_pytorch_model.bin"  # the name open_clip's local-dir: looks for
    proc = clip_pipe("export", "--checkpoint", color_model.parent, "--out", out)
    assert proc.returncode == 0, proc.stderr
    raw = torch.load(out, weights_only=True)
    assert raw["logit_scale"].shape == ()
    images = torch.randn(2, 3, 16, 16)
    tokens = open_clip.get_tokenizer("clip-pipe-test")(["a red square", "a dog"])
    reference = open_clip.create_model("clip-pipe-test", pretrained=str(color_model)).eval()
    for model in (
        open_clip.create_model("clip-pipe-test", pretrained=str(out)),
        open_clip.create_model(f"local-dir:{out.parent}"),  # no registered name needed
    ):
        model.eval()
        assert model.logit_scale.shape == () and model.logit_scale == reference.logit_scale
        with torch.no_grad():
            torch.testing.assert_close(
                model.encode_image(images), reference.encode_image(images), rtol=0, atol=0
            )
            torch.testing.assert_close(
                model.encode_text(tokens), reference.encode_text(tokens), rtol=0, atol=0
            )


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["clip-pipe"] == "clip_pipe.cli:main"
    try:
        (entry_point,) = importlib.metadata.entry_points(group="console_scripts", name="clip-pipe")
    except ValueError:  # a failure under CI=true, whose set-up installs it; a skip elsewhere
        missing("the clip-pipe console script", "pip install -e . (scripts/setup.sh does)")
    assert entry_point.value == "clip_pipe.cli:main" and entry_point.load() is main
