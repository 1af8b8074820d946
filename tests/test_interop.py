"""open_clip interop both ways: our exports load in open_clip; open_clip weights load into our trainer."""

from __future__ import annotations

import open_clip
import torch

from clip_pipe.config import ModelConfig
from clip_pipe.losses import ClipLoss
from clip_pipe.model import build_model, save_export


def embeddings(model, images, tokens):
    model.eval()
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def test_round_trip_ours_open_clip_ours_gives_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    ours = build_model(ModelConfig(name="clip-pipe-test"))
    with torch.no_grad():
        ours.model.logit_scale.fill_(3.0)  # not the init value, so a dropped logit_scale would show
    images, tokens = torch.randn(3, 3, 16, 16), ours.tokenizer(["a red square", "a dog", "green"])
    expected = embeddings(ours.model, images, tokens)

    theirs = open_clip.create_model(
        "clip-pipe-test", pretrained=str(save_export(ours.model, ours.model_cfg, tmp_path))
    )
    for a, b in zip(embeddings(theirs, images, tokens), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # An open_clip user saves the model their way (0-dim logit_scale) ...
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    # ... and we start training from it (logit_scale back to shape (1,), for DeepSpeed).
    back = build_model(ModelConfig(name="clip-pipe-test", pretrained=str(tmp_path / "theirs.pt")))
    assert back.model.logit_scale.shape == (1,) and back.model.logit_scale.item() == 3.0
    for a, b in zip(embeddings(back.model, images, tokens), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_open_clip_train_checkpoint_fine_tunes(tmp_path):
    """open_clip_train's epoch_N.pt: state dict under "state_dict", "module." prefixes, optimizer state."""
    torch.manual_seed(1)
    theirs = open_clip.create_model("clip-pipe-test")
    state = {f"module.{k}": v for k, v in theirs.state_dict().items()}
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": state, "optimizer": {"state": {}}}, tmp_path / "e3.pt"
    )
    encoder = build_model(ModelConfig(name="clip-pipe-test", pretrained=str(tmp_path / "e3.pt")))
    model = encoder.model.train()
    images, tokens = torch.randn(4, 3, 16, 16), encoder.tokenizer(["red", "green", "blue", "yellow"])
    for a, b in zip(embeddings(model, images, tokens), embeddings(theirs, images, tokens), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    image_features, text_features = embeddings(model, images, tokens)
    assert (image_features @ text_features.T).argmax(dim=1).tolist() != [0, 1, 2, 3], "must start untrained"
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = ClipLoss()(*model(images, tokens))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Learning, not drift: the loss falls tenfold (the temperature alone cannot do that) and every
    # image now retrieves its own caption, which needs both towers to train.
    assert losses[-1] < 0.1 * losses[0], losses
    image_features, text_features = embeddings(model, images, tokens)
    assert (image_features @ text_features.T).argmax(dim=1).tolist() == [0, 1, 2, 3]
