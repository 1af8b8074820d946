"""Models: open_clip by name, Hugging Face text towers, and exports open_clip itself loads."""

from __future__ import annotations

import open_clip
import pytest
import torch

from clip_pipe.config import ModelConfig
from clip_pipe.model import build_model, export_state_dict, load_export, save_export

WORDS = ["a", "photo", "of", "the", "red", "green", "blue", "yellow", "square", "thing", "cat", "dog"]


def tiny_hf_text_model(folder) -> str:
    """A randomly initialised 1-layer BERT with its own WordPiece vocabulary, built locally."""
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    ).save_pretrained(folder)  # fmt: skip
    return str(folder)


def embed(encoder, images, captions):
    with torch.no_grad():
        model = encoder.model.eval()
        return model.encode_image(images, normalize=True), model.encode_text(
            encoder.tokenizer(captions), normalize=True
        )


def test_training_model_has_1d_logit_scale_and_export_restores_0d():
    encoder = build_model(ModelConfig(name="clip-pipe-test"))
    # DeepSpeed cannot broadcast 0-dim parameters.
    assert all(p.ndim >= 1 for p in encoder.model.parameters())
    exported = export_state_dict(encoder.model)
    assert exported["logit_scale"].shape == ()
    assert all(t.dtype == torch.float32 for t in exported.values())


def test_export_loads_in_open_clip_with_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    ours = build_model(ModelConfig(name="clip-pipe-test"))
    path = save_export(ours.model, ours.model_cfg, tmp_path)
    theirs = open_clip.create_model("clip-pipe-test", pretrained=str(path))
    assert theirs.logit_scale.shape == ()
    images, captions = torch.randn(3, 3, 16, 16), ["a red square", "a dog", "green"]
    tokens = open_clip.get_tokenizer("clip-pipe-test")(captions)
    with torch.no_grad():
        theirs.eval()
        expected = theirs.encode_image(images, normalize=True), theirs.encode_text(tokens, normalize=True)
    for a, b in zip(embed(ours, images, captions), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and back: our loader rebuilds the same model from the exported folder.
    for a, b in zip(embed(load_export(path), images, captions), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'ViT-Nope'"):
        build_model(ModelConfig(name="ViT-Nope"))


def test_hf_text_tower_selected_by_config(tmp_path):
    hf_dir = tiny_hf_text_model(tmp_path / "bert")
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(name="clip-pipe-test", hf_text_model=hf_dir, context_length=12))
    assert type(encoder.model).__name__ == "CustomTextCLIP"
    assert type(encoder.model.text.transformer).__name__ == "BertModel"
    tokens = encoder.tokenizer(["a photo of the red square", "a dog"])
    assert tokens.shape == (2, 12)
    image_features, text_features, _scale = encoder.model(torch.randn(2, 3, 16, 16), tokens)
    assert text_features.shape == image_features.shape == (2, 32)
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(2))
    # The tower trains: gradients reach BERT's embeddings.
    text_features.sum().backward()
    assert encoder.model.text.transformer.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # Export and reload keep the tower's weights.
    path = save_export(encoder.model, encoder.model_cfg, tmp_path / "export")
    images, captions = torch.randn(2, 3, 16, 16), ["a red square", "a cat"]
    for a, b in zip(
        embed(encoder, images, captions), embed(load_export(path), images, captions), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    encoder = build_model(ModelConfig(name="clip-pipe-test"))
    path = save_export(encoder.model, encoder.model_cfg, tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot load weights"):
        load_export(path)
