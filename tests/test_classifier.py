"""ZeroShotClassifier: meaningful rankings, the three image input kinds, the label cache, safe decoding."""

from __future__ import annotations

import io
import random
import shutil

import pytest
import torch
from conftest import COLORS, color_jpeg, png_bomb, truncated_jpeg
from PIL import Image

from clip_pipe import ZeroShotClassifier
from clip_pipe.classifier import BadImage, ImageTooLarge, NotAnImage, open_image

LABELS = list(COLORS)
TEMPLATES = ["a photo of a {c} square"]


def held_out_squares(num: int = 40, seed: int = 123) -> tuple[list[bytes], list[str]]:
    rng = random.Random(seed)
    truth = [LABELS[i % len(LABELS)] for i in range(num)]
    return [color_jpeg(c, rng) for c in truth], truth


@pytest.fixture(scope="module")
def clf(color_model) -> ZeroShotClassifier:
    return ZeroShotClassifier.from_checkpoint(color_model)


def test_classifies_held_out_colour_squares(clf):
    images, truth = held_out_squares()
    ranked = clf.classify(images, LABELS, TEMPLATES)
    assert [r[0].label for r in ranked] == truth
    for predictions in ranked:
        assert sorted(p.label for p in predictions) == sorted(LABELS)
        probabilities = [p.probability for p in predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
    top2 = clf.classify(images[:3], LABELS, TEMPLATES, top_k=2)
    assert [[p.label for p in r] for r in top2] == [[p.label for p in r[:2]] for r in ranked[:3]]


def test_rankings_equal_softmax_of_independent_embeddings(clf):
    """The probabilities are softmax(logit_scale · cosine) against the mean prompt embedding."""
    images, _ = held_out_squares(8, seed=7)
    labels, templates = ["red", "blue", "a dog"], ["a photo of a {c} square", "a {c} thing"]
    image_features = clf.embed_images(images)  # (8, D)
    prompts = clf.embed_texts([t.replace("{c}", label) for label in labels for t in templates])
    per_label = torch.nn.functional.normalize(prompts.view(len(labels), len(templates), -1).mean(1), dim=-1)
    expected = (clf.model.logit_scale.exp().item() * image_features @ per_label.T).softmax(-1)  # (8, 3)
    for row, predictions in zip(expected, clf.classify(images, labels, templates), strict=True):
        assert [p.label for p in predictions] == [labels[i] for i in row.argsort(descending=True)]
        got = {p.label: p.probability for p in predictions}
        torch.testing.assert_close(torch.tensor([got[label] for label in labels]), row)
    # Embeddings are unit vectors, and what the model itself computes.
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(prompts.norm(dim=-1), torch.ones(len(prompts)))
    with torch.no_grad():
        tokens = clf.tokenizer(["a red square"])
        torch.testing.assert_close(
            clf.embed_texts(["a red square"]), clf.model.encode_text(tokens, normalize=True)
        )


def test_pil_path_and_bytes_give_the_same_embedding(clf, tmp_path):
    data = color_jpeg("green", random.Random(0))
    path = tmp_path / "green.jpg"
    path.write_bytes(data)
    embeddings = clf.embed_images([data, path, str(path), Image.open(io.BytesIO(data))])
    for row in embeddings[1:]:
        torch.testing.assert_close(row, embeddings[0], rtol=0, atol=0)


def test_repeated_label_sets_are_encoded_once(color_model, monkeypatch):
    clf = ZeroShotClassifier.from_checkpoint(color_model, cache_size=2)
    num_calls = 0
    encode_text = clf.model.encode_text

    def counting_encode_text(*args, **kwargs):
        nonlocal num_calls
        num_calls += 1
        return encode_text(*args, **kwargs)

    monkeypatch.setattr(clf.model, "encode_text", counting_encode_text)
    image = [color_jpeg("red", random.Random(1))]
    first = clf.classify(image, LABELS, TEMPLATES)
    assert num_calls == 1
    assert clf.classify(image, list(LABELS), list(TEMPLATES)) == first  # equal lists hit the cache
    assert num_calls == 1
    clf.classify(image, LABELS)  # other templates: another entry
    clf.classify(image, LABELS[:2], TEMPLATES)  # other labels: another entry, evicting the first
    assert num_calls == 3
    clf.classify(image, LABELS, TEMPLATES)
    assert num_calls == 4


def test_from_checkpoint_takes_a_run_dir_a_checkpoint_dir_or_a_file(color_model, tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    for name in ("model.safetensors", "open_clip_config.json"):
        shutil.copy(color_model.parent / name, step / name)
    (run / "checkpoints" / "latest").write_text("step_00000010\n")
    image = [color_jpeg("blue", random.Random(2))]
    expected = ZeroShotClassifier.from_checkpoint(color_model).embed_images(image)
    # A run without a final model: its latest checkpoint
    for source in (run, step, step / "model.safetensors"):
        torch.testing.assert_close(ZeroShotClassifier.from_checkpoint(source).embed_images(image), expected)
    with pytest.raises(ValueError, match=r"holds no model\.safetensors"):
        ZeroShotClassifier.from_checkpoint(tmp_path)


def test_untrusted_images_are_refused_with_the_reason():
    with pytest.raises(BadImage, match="cannot decode image"):
        open_image(truncated_jpeg())
    with pytest.raises(NotAnImage):
        open_image(b"name,caption\ncat.jpg,a cat\n")
    with pytest.raises(ImageTooLarge, match="over the limit of 100 bytes"):
        open_image(color_jpeg("red", random.Random(0), size=64), max_bytes=100)
    # Header-only bombs: refused from the header, by our limit and by PIL's own.
    with pytest.raises(ImageTooLarge, match="5000x4000 = 20000000 pixels, over the limit of 1000000"):
        open_image(png_bomb(5000, 4000), max_pixels=1_000_000)
    with pytest.raises(ImageTooLarge, match="decompression bomb"):  # PIL's limit holds whatever ours is
        open_image(png_bomb(12_000, 12_000), max_pixels=10**12)
    # A real image under the limits decodes to RGB, with alpha flattened onto white.
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buffer, "PNG")
    image = open_image(buffer.getvalue())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("labels", "templates", "match"),
    [
        ([], None, "at least one label"),
        ("cat,dog", None, "list of strings"),
        (["cat", "cat", "dog"], None, "duplicate labels: \\['cat'\\]"),
        (["cat", " "], None, "must not be empty"),
        (["cat"], ["a photo"], "needs \\{c\\}"),
        (["cat"], [], "must not be empty"),
    ],
)
def test_bad_label_sets_are_value_errors(clf, labels, templates, match):
    with pytest.raises(ValueError, match=match):
        clf.classify([color_jpeg("red", random.Random(0))], labels, templates)
