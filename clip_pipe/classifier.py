"""Zero-shot classification against labels chosen at query time, and embeddings for retrieval.

    clf = ZeroShotClassifier.from_checkpoint("runs/NAME")            # run dir, checkpoint dir or model file
    clf.classify(["cat.jpg"], ["cat", "dog", "car"])                 # per image: labels ranked, with probabilities
    clf.embed_images([...]), clf.embed_texts([...])                  # L2-normalised (N, D)

Images may be PIL images, paths or bytes. Paths and bytes are untrusted input: they are size-checked,
their pixel count is checked from the header before any pixel is decoded (decompression bombs), and
truncated files are rejected rather than padded with grey.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image, ImageFile, ImageOps

from clip_pipe.checkpoints import resolve_model_file
from clip_pipe.eval.embed import classifier_weights, encode_texts
from clip_pipe.limits import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from clip_pipe.losses import MAX_LOGIT_SCALE
from clip_pipe.model import DualEncoder, load_export
from clip_pipe.prep.images import to_rgb

ImageInput = Image.Image | str | Path | bytes
DEFAULT_TEMPLATES = ("{c}",)


class ImageError(ValueError):
    """An input that cannot be used as an image; the message says why."""


class ImageTooLarge(ImageError):
    """Over the byte or pixel limit (HTTP 413)."""


class NotAnImage(ImageError):
    """Not a format PIL recognises (HTTP 415)."""


class BadImage(ImageError):
    """A recognised format whose data is truncated or malformed (HTTP 422)."""


class Prediction(NamedTuple):
    label: str
    probability: float


def open_image(
    source: ImageInput,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode an untrusted image fully into RGB, or raise an `ImageError` saying why not."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such file")
        if (size := path.stat().st_size) > max_bytes:
            raise ImageTooLarge(f"{path}: {size} bytes, over the limit of {max_bytes} bytes")
        source = path.read_bytes()
    if not isinstance(source, bytes):
        raise TypeError(f"an image is a PIL image, a path or bytes, not {type(source).__name__}")
    if len(source) > max_bytes:
        raise ImageTooLarge(f"image is {len(source)} bytes, over the limit of {max_bytes} bytes")
    # A global that some libraries flip on; it would let truncated files through as half-grey images.
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(source))
        except Image.UnidentifiedImageError:
            raise NotAnImage("not a recognised image file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLarge(f"decompression bomb: {e}") from None
        except Exception as e:  # a known format whose header is cut short or malformed
            raise BadImage(f"cannot read image header: {type(e).__name__}: {e}") from None
        # Image.open has read only the header: no pixel is decoded before this check.
        if (num_pixels := image.width * image.height) > max_pixels:
            raise ImageTooLarge(
                f"image is {image.width}x{image.height} = {num_pixels} pixels, over the limit of {max_pixels}"
            )
        try:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
        # PIL's decoders raise many types (OSError, SyntaxError, ValueError ...) on malformed data.
        except Exception as e:
            raise BadImage(f"cannot decode image: {type(e).__name__}: {e}") from None


def check_labels(labels: Sequence[str], templates: Sequence[str]) -> None:
    if isinstance(labels, str):
        raise ValueError("labels must be a list of strings, not one string")
    if not labels:
        raise ValueError("give at least one label")
    if empty := [i for i, label in enumerate(labels) if not label.strip()]:
        raise ValueError(f"labels must not be empty (positions {empty})")
    if duplicates := sorted(label for label, n in Counter(labels).items() if n > 1):
        raise ValueError(f"duplicate labels: {duplicates}")
    if not templates:
        raise ValueError("templates, when given, must not be empty")
    if bad := [t for t in templates if "{c}" not in t]:
        raise ValueError(f"every template needs {{c}} where the label goes: {bad}")


class ZeroShotClassifier:
    """A trained dual encoder, wrapped for classification against arbitrary labels.

    Label embeddings (the mean of each label's prompts, normalised) are cached per (labels, templates),
    so a service answering the same label set over and over encodes it once.
    """

    def __init__(
        self,
        encoder: DualEncoder,
        device: str | torch.device = "cpu",
        cache_size: int = 64,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.device = torch.device(device)
        self.model = encoder.model.to(self.device).eval()
        self.model_cfg = encoder.model_cfg
        self.preprocess = encoder.preprocess_val
        self.tokenizer = encoder.tokenizer
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self.logit_scale = float(self.model.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))
        # A sigmoid-trained (SigLIP) model carries a bias; its probabilities are per label, not a softmax.
        bias = getattr(self.model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach())
        self.embed_dim = int(self.model_cfg["embed_dim"])
        self._label_weights = functools.lru_cache(maxsize=cache_size)(self._compute_label_weights)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs):
        """`path`: a run directory, a checkpoint directory, or a model file with its config beside it."""
        return cls(load_export(resolve_model_file(path)), device=device, **kwargs)

    def load_image(self, source: ImageInput) -> Image.Image:
        return open_image(source, self.max_image_bytes, self.max_image_pixels)

    def pixels(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Decoded and preprocessed images, (N, 3, H, W), ready for `encode_pixels`."""
        return torch.stack([self.preprocess(self.load_image(image)) for image in images])

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device), normalize=True).float().cpu()  # (N, D)

    def embed_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """L2-normalised image embeddings, (N, D)."""
        return self.encode_pixels(self.pixels(images))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, (N, D)."""
        return encode_texts(self.model, self.tokenizer, list(texts), self.device).cpu()

    def label_weights(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """One unit vector per label, (D, C); cached."""
        templates = DEFAULT_TEMPLATES if templates is None else templates
        check_labels(labels, templates)
        return self._label_weights(tuple(labels), tuple(templates))

    def _compute_label_weights(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        return classifier_weights(
            self.model, self.tokenizer, list(labels), list(templates), self.device
        ).cpu()

    def rank(
        self,
        image_features: torch.Tensor,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> list[list[Prediction]]:
        """Labels ranked for each row of `image_features`, with softmax(logit_scale · cosine) probabilities,
        or, for a model trained with the sigmoid loss, sigmoid(logit_scale · cosine + logit_bias): the
        probability that each label matches, as that model was trained to give it (they need not sum to 1)."""
        weights = self.label_weights(labels, templates)  # (D, C)
        logits = self.logit_scale * image_features @ weights  # (N, C)
        probs = logits.softmax(dim=-1) if self.logit_bias is None else (logits + self.logit_bias).sigmoid()
        top = probs.topk(min(top_k or len(labels), len(labels)), dim=-1)
        return [
            [Prediction(labels[i], p) for p, i in zip(values.tolist(), indices.tolist(), strict=True)]
            for values, indices in zip(top.values, top.indices, strict=True)
        ]

    def classify(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> list[list[Prediction]]:
        """For each image, `labels` (or the `top_k` best) ranked by probability.

        `templates` are prompts with `{c}` where the label goes, such as "a photo of a {c}."; a label's
        embedding is the mean over its prompts. Without templates, each label is encoded as written.
        """
        if isinstance(images, ImageInput):
            raise ValueError("images must be a list (of PIL images, paths or bytes)")
        self.label_weights(labels, templates)  # a bad label set fails before any image is decoded
        return self.rank(self.embed_images(images), labels, templates, top_k)
