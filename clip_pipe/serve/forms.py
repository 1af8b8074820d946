"""Request parsing: multipart forms, JSON bodies, base64 data URLs, and image decoding.

Every failure is an `ApiError` (a 4xx with a code and a one-line reason), never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

import torch
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from clip_pipe.classifier import ImageError, ImageTooLarge, NotAnImage, ZeroShotClassifier, open_image
from clip_pipe.limits import ServeLimits
from clip_pipe.serve.guard import BodyTooLarge
from clip_pipe.serve.metrics import ServeMetrics

# The errors that refuse an image (counted in clip_pipe_images_rejected by the app's error handler).
IMAGE_ERRORS = frozenset(
    {
        "image_too_large",
        "not_an_image",
        "bad_image",
        "bad_images",
        "bad_base64",
        "bad_data_url",
        "urls_not_fetched",
    }
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


async def read_form(request: Request, allowed: set[str], max_files: int, max_fields: int, limits_hint: str):
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(415, "not_a_form", "send multipart/form-data (curl -F ...)")
    try:
        form = await request.form(max_files=max_files, max_fields=max_fields)
    except BodyTooLarge:
        raise ApiError(413, "request_too_large", "request body over the size limit") from None
    # Too many fields or files, or a malformed body (Starlette re-raises these as an HTTP 400).
    except (MultiPartException, HTTPException) as e:
        message = str(e.detail if isinstance(e, HTTPException) else e.message)
        raise ApiError(422, "bad_form", f"{message} ({limits_hint})") from None
    if unknown := sorted(set(form.keys()) - allowed):
        raise ApiError(
            422, "unknown_field", f"unknown form fields {unknown}; expected some of {sorted(allowed)}"
        )
    return form


async def close_form(request: Request):
    """Uploads spool to temporary files; close them once the request is answered."""
    yield
    await request.close()


async def read_json(request: Request):
    """The body as JSON (any value; the caller validates its shape)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("application/json"):
        raise ApiError(
            415, "not_json", f"send a JSON body (Content-Type: application/json), not {content_type!r}"
        )
    try:
        body = await request.body()
    except BodyTooLarge:
        raise ApiError(413, "request_too_large", "request body over the size limit") from None
    try:
        return json.loads(body)
    except RecursionError:  # nested past Python's recursion limit (about 1,000 levels)
        raise ApiError(422, "bad_json", "the body's JSON is nested too deeply") from None
    except ValueError as e:  # not JSON (JSONDecodeError, UnicodeDecodeError), or a number over 4,300 digits
        raise ApiError(422, "bad_json", f"the body is not JSON this server reads: {e}") from None


def text_fields(form, name: str, max_count: int, max_chars: int) -> list[str]:
    values = form.getlist(name)
    if len(values) > max_count:
        raise ApiError(422, f"too_many_{name}", f"{len(values)} {name}, over the limit of {max_count}")
    for value in values:
        if not isinstance(value, str):
            raise ApiError(422, f"bad_{name}", f"{name} are form fields, not file uploads")
        if len(value) > max_chars:
            raise ApiError(
                422, f"{name}_too_long", f"one of the {name} is {len(value)} characters, over {max_chars}"
            )
    return values


async def read_images(form, limits: ServeLimits, required: bool) -> list[tuple[str, bytes]]:
    uploads = form.getlist("images")
    if required and not uploads:
        raise ApiError(422, "no_images", "send at least one image (form field 'images', a file upload)")
    if len(uploads) > limits.max_images:
        raise ApiError(
            422, "too_many_images", f"{len(uploads)} images, over the limit of {limits.max_images}"
        )
    images = []
    for i, upload in enumerate(uploads):
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "bad_images", "images must be file uploads (curl -F images=@file.jpg)")
        data = await upload.read(limits.max_image_bytes + 1)
        name = upload.filename or f"images[{i}]"
        if len(data) > limits.max_image_bytes:
            raise ApiError(
                413, "image_too_large", f"{name}: over the limit of {limits.max_image_bytes} bytes"
            )
        images.append((name, data))
    return images


DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w.+-]+=[\w.+-]+)*;base64,", re.I)


def is_data_url(text: str) -> bool:
    return text[:5].lower() == "data:"


def base64_budget(max_bytes: int) -> int:
    """Characters of base64 that `max_bytes` bytes take, plus room for a data URL's header."""
    return 4 * -(-max_bytes // 3) + 256


def check_data_url(name: str, url: str, max_bytes: int) -> None:
    """Cheap checks before admission: the form of the URL and its length, nothing decoded yet."""
    if url.startswith(("http://", "https://")):
        raise ApiError(
            422, "urls_not_fetched", f"{name}: this server fetches no URLs; send a base64 data URL"
        )
    if not DATA_URL.match(url):
        raise ApiError(422, "bad_data_url", f"{name}: expected data:image/...;base64,<data>")
    if len(url) > base64_budget(max_bytes):
        raise ApiError(413, "image_too_large", f"{name}: over the limit of {max_bytes} bytes")


def data_url_bytes(name: str, url: str) -> bytes:
    try:
        return base64.b64decode(url[DATA_URL.match(url).end() :], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "bad_base64", f"{name}: the data URL's base64 is malformed: {e}") from None


def decode(
    clf: ZeroShotClassifier, images: list[tuple[str, bytes | str]], limits: ServeLimits, metrics: ServeMetrics
) -> torch.Tensor:
    """In a pool thread: validate, decode and preprocess every image of a request, (N, 3, H, W).

    An image is bytes, or a data URL (str) that `check_data_url` has passed.
    """
    pixels = []
    for name, data in images:
        if isinstance(data, str):
            data = data_url_bytes(name, data)
        try:
            image = open_image(data, limits.max_image_bytes, limits.max_image_pixels)
        except ImageTooLarge as e:
            raise ApiError(413, "image_too_large", f"{name}: {e}") from None
        except NotAnImage as e:
            raise ApiError(415, "not_an_image", f"{name}: {e}") from None
        except ImageError as e:
            raise ApiError(422, "bad_image", f"{name}: {e}") from None
        metrics.images_decoded.inc()
        pixels.append(clf.preprocess(image))
    return torch.stack(pixels)
