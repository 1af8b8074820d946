"""Limits on untrusted input to the zero-shot API (kept free of heavy imports, for the CLI's --help)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000x5000; PIL's own bomb limit is about 89M
FORM_SLACK_BYTES = 2**20  # room for the label and template fields beside the images
TOKEN_ENV = "CLIP_PIPE_TOKEN"


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits. Anything over them is refused with a 4xx before the model sees it."""

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    """Bytes of one uploaded image (413)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Width x height of one image, read from its header before decoding (413)."""
    max_images: int = 16
    """Images per request (422)."""
    max_labels: int = 1000
    """Labels per classify request (422)."""
    max_label_chars: int = 200
    """Characters of one label, template or text (422)."""
    max_templates: int = 32
    """Templates per classify request (422)."""
    max_texts: int = 256
    """Texts per embed request (422)."""

    def __post_init__(self):
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"limit {name} must be at least 1, got {value}")

    @property
    def max_request_bytes(self) -> int:
        """The whole body (413), checked from Content-Length and while it streams in."""
        return self.max_images * self.max_image_bytes + FORM_SLACK_BYTES
