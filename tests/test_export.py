"""safetensors exports: the open_clip hub folder that open_clip's own `local-dir:` loader reads, and our
loaders reading safetensors and the older model.pt run directories alike."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import open_clip
import pytest
import safetensors.torch
import torch
import yaml
from conftest import COLORS, REPO, color_jpeg
from PIL import Image

from clip_pipe import ZeroShotClassifier
from clip_pipe.checkpoints import resolve_model_file
from clip_pipe.model import load_export, save_export

TEXTS = [f"a photo of a {c} square" for c in COLORS]


def images() -> list[Image.Image]:
    import io

    rng = random.Random(2)
    return [Image.open(io.BytesIO(color_jpeg(c, rng))) for c in COLORS]


def open_clip_embeddings(model, preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(image.convert("RGB")) for image in images()])
        return (
            model.encode_image(pixels, normalize=True),
            model.encode_text(tokenizer(TEXTS), normalize=True),
        )


def clip_pipe(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clip_pipe.cli", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture
def run_dir(tmp_path, color_model):
    """A run directory as training leaves it: the final model, its config, its eval results."""
    run = tmp_path / "runs" / "colors"
    run.mkdir(parents=True)
    for path in color_model.parent.iterdir():
        shutil.copy(path, run / path.name)
    config = {
        "model": {"name": "clip-pipe-test"},
        "optim": {"lr": 0.003},
        "run": {"name": "colors", "steps": 60},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    results = {
        "colors-eval": {"top1": 0.975, "top5": 1.0, "mean_per_class_recall": 0.97, "per_class_accuracy": {}}
    }
    (run / "zeroshot.json").write_text(json.dumps(results))
    return run


def test_hub_folder_loads_in_open_clip_with_identical_embeddings(run_dir, tmp_path):
    out = tmp_path / "hub"
    proc = clip_pipe("export", "--checkpoint", run_dir, "--format", "open_clip-hub", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]

    # open_clip alone, as its README documents for a local folder
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    image_features, text_features = open_clip_embeddings(model, preprocess, tokenizer)
    clf = ZeroShotClassifier.from_checkpoint(run_dir)
    torch.testing.assert_close(image_features, clf.embed_images(images()), rtol=0, atol=1e-6)
    torch.testing.assert_close(text_features, clf.embed_texts(TEXTS), rtol=0, atol=1e-6)
    # and the weights are the same tensors, bit for bit
    ours = safetensors.torch.load_file(run_dir / "model.safetensors")
    theirs = safetensors.torch.load_file(out / "open_clip_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert theirs["logit_scale"].shape == ()  # open_clip's layout

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n")
    assert f'create_model_and_transforms("local-dir:{out.name}")' in card
    assert "| colors-eval | 0.9700 | 0.9750 | 1.0000 |" in card  # mean_per_class_recall, top1, top5
    config = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config == yaml.safe_load((run_dir / "config.yaml").read_text())
    # Our own loaders read the hub folder too
    torch.testing.assert_close(
        ZeroShotClassifier.from_checkpoint(out).embed_texts(TEXTS), clf.embed_texts(TEXTS), rtol=0, atol=0
    )


def test_runs_export_safetensors_and_old_model_pt_runs_still_load(color_model, tmp_path):
    assert color_model.name == "model.safetensors"
    assert safetensors.torch.load_file(color_model)  # no pickle inside
    expected = ZeroShotClassifier.from_checkpoint(color_model).embed_texts(TEXTS)
    # A run directory from before: model.pt (a torch pickle) with its config
    old = tmp_path / "old_run"
    encoder = load_export(color_model)
    save_export(encoder.model, encoder.model_cfg, old, "model.pt")
    assert resolve_model_file(old) == old / "model.pt"
    torch.testing.assert_close(
        ZeroShotClassifier.from_checkpoint(old).embed_texts(TEXTS), expected, rtol=0, atol=0
    )
    # A run with both prefers the safetensors
    shutil.copy(color_model, old / "model.safetensors")
    assert resolve_model_file(old) == old / "model.safetensors"
    # And model.pretrained (open_clip's loader) starts from a safetensors file
    from clip_pipe.config import ModelConfig
    from clip_pipe.model import build_model

    started = build_model(ModelConfig(name="clip-pipe-test", pretrained=str(color_model)))
    for key, value in safetensors.torch.load_file(color_model).items():
        torch.testing.assert_close(
            started.model.state_dict()[key].reshape(value.shape), value, rtol=0, atol=0
        )


def test_state_dict_export_picks_the_format_from_the_name(color_model, tmp_path):
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        out = tmp_path / name.split(".")[1] / name
        proc = clip_pipe("export", "--checkpoint", color_model.parent, "--out", out)
        assert proc.returncode == 0, proc.stderr
        model = open_clip.create_model(f"local-dir:{out.parent}")
        state = model.state_dict()
        for key, value in safetensors.torch.load_file(color_model).items():
            assert torch.equal(state[key], value), key
    assert safetensors.torch.load_file(tmp_path / "safetensors" / "open_clip_model.safetensors")
    assert torch.load(tmp_path / "bin" / "open_clip_pytorch_model.bin", weights_only=True)


def test_truncated_safetensors_is_a_one_line_error(color_model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(color_model.parent / "open_clip_config.json", bad)
    (bad / "model.safetensors").write_bytes(color_model.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot load weights"):
        load_export(bad / "model.safetensors")
    proc = clip_pipe("export", "--checkpoint", bad, "--format", "open_clip-hub", tmp_path / "out")
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error: cannot load weights")
        and "Traceback" not in proc.stderr
    )
    proc = clip_pipe("export", "--checkpoint", color_model.parent)
    assert proc.returncode == 2 and "say where to write" in proc.stderr
