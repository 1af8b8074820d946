"""The /v1/ routes: zero-shot classify, embed (multipart), and OpenAI-compatible embeddings and models.

Each route validates and counts its input, is admitted to the batcher's queue (429 when full), and only
then decodes images, in a thread pool, before the model thread encodes them in a batch.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

import torch
from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from clip_pipe.classifier import DEFAULT_TEMPLATES, ZeroShotClassifier, check_labels
from clip_pipe.limits import ServeLimits
from clip_pipe.serve.batcher import Batcher, Job, Ticket
from clip_pipe.serve.forms import (
    ApiError,
    check_data_url,
    close_form,
    decode,
    is_data_url,
    read_form,
    read_images,
    read_json,
    text_fields,
)
from clip_pipe.serve.metrics import ServeMetrics
from clip_pipe.serve.schemas import (
    FILES,
    STRINGS,
    ClassifyResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedResponse,
    ModelList,
    json_body,
    multipart_body,
)


@dataclass
class Served:
    """What the routes serve, kept in `app.state.served`."""

    clf: ZeroShotClassifier
    limits: ServeLimits
    batcher: Batcher
    metrics: ServeMetrics
    model_name: str
    created: int


def served(request: Request) -> Served:
    return request.app.state.served


router = APIRouter(prefix="/v1")


async def encode_images(s: Served, images: list[tuple[str, bytes | str]], finish, ticket: Ticket) -> list:
    """Decode in a pool thread, then encode in the batcher. `ticket`: the batcher admitted them."""
    pixels = await asyncio.to_thread(decode, s.clf, images, s.limits, s.metrics)
    return await s.batcher.submit(Job(pixels, None, finish), ticket)


@router.post(
    "/classify",
    dependencies=[Depends(close_form)],
    response_model=ClassifyResponse,
    openapi_extra=multipart_body(
        {"images": FILES, "labels": STRINGS, "templates": STRINGS, "top_k": {"type": "integer"}},
        ["images", "labels"],
    ),
    summary="Rank the given labels for each image",
)
async def classify(request: Request):
    """One `labels` field per label. `templates` (optional, repeatable) are prompts with `{c}` where
    the label goes; a label's embedding is the mean over them. `top_k` keeps the k best labels."""
    s = served(request)
    limits = s.limits
    form = await read_form(
        request,
        {"images", "labels", "templates", "top_k"},
        max_files=limits.max_images + 1,
        max_fields=limits.max_labels + limits.max_templates + 2,
        limits_hint=f"at most {limits.max_labels} labels, {limits.max_templates} templates, "
        f"{limits.max_images} images",
    )
    labels = text_fields(form, "labels", limits.max_labels, limits.max_label_chars)
    templates = text_fields(form, "templates", limits.max_templates, limits.max_label_chars) or None
    top_k = form.get("top_k")
    if top_k is not None and (not isinstance(top_k, str) or not top_k.isdigit() or int(top_k) < 1):
        raise ApiError(422, "bad_top_k", f"top_k must be a positive integer, got {top_k!r}")
    try:
        check_labels(labels, templates or DEFAULT_TEMPLATES)
    except ValueError as e:
        raise ApiError(422, "bad_labels", str(e)) from None
    images = await read_images(form, limits, required=True)
    k = int(top_k) if top_k is not None else None
    with s.batcher.admit(len(images)) as ticket:
        ranked = await encode_images(s, images, lambda f: s.clf.rank(f, labels, templates, k), ticket)
    return {
        "results": [
            {"filename": name, "labels": [p._asdict() for p in predictions]}
            for (name, _), predictions in zip(images, ranked, strict=True)
        ]
    }


@router.post(
    "/embed",
    dependencies=[Depends(close_form)],
    response_model=EmbedResponse,
    openapi_extra=multipart_body({"images": FILES, "texts": STRINGS}, []),
    summary="L2-normalised embeddings of images or of texts",
)
async def embed(request: Request):
    """Send either `images` (files) or `texts` (repeatable fields), not both."""
    s = served(request)
    limits = s.limits
    form = await read_form(
        request,
        {"images", "texts"},
        max_files=limits.max_images + 1,
        max_fields=limits.max_texts + 1,
        limits_hint=f"at most {limits.max_texts} texts or {limits.max_images} images",
    )
    texts = text_fields(form, "texts", limits.max_texts, limits.max_label_chars)
    images = await read_images(form, limits, required=False)
    if bool(texts) == bool(images):
        raise ApiError(422, "images_or_texts", "send either images or texts (one kind per request)")
    with s.batcher.admit(len(texts) + len(images)) as ticket:
        if texts:
            embeddings = await s.batcher.submit(Job(None, texts, lambda f: f.tolist()), ticket)
        else:
            embeddings = await encode_images(s, images, lambda f: f.tolist(), ticket)
    return {"dim": s.clf.embed_dim, "embeddings": embeddings}


def one_line(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors(include_url=False)
    )


def num_tokens(clf: ZeroShotClassifier, texts: list[str]) -> int:
    """Tokens the text tower reads (truncated to its context, padding not counted), for `usage`."""
    if not texts:
        return 0
    pad_id = getattr(getattr(clf.tokenizer, "tokenizer", None), "pad_token_id", None) or 0
    return int((clf.tokenizer(texts) != pad_id).sum())


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # as OpenAI: little-endian float32 bytes
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post(
    "/embeddings",
    response_model=EmbeddingsResponse,
    openapi_extra=json_body(EmbeddingsRequest),
    summary="OpenAI-compatible embeddings of texts and images",
)
async def embeddings(request: Request):
    """As OpenAI's `POST /v1/embeddings`. Images are base64 data URLs (`data:image/jpeg;base64,...`),
    or every input is one with `"modality": "image"` (as infinity). This server fetches no URLs."""
    s = served(request)
    limits = s.limits
    try:
        req = EmbeddingsRequest.model_validate(await read_json(request))
    except ValidationError as e:
        raise ApiError(422, "bad_request", one_line(e)) from None
    if req.model != s.model_name:
        raise ApiError(
            404,
            "model_not_found",
            f"model {req.model!r} is not served here; GET /v1/models lists {s.model_name!r}",
        )
    if req.dimensions is not None and req.dimensions != s.clf.embed_dim:
        raise ApiError(
            422,
            "bad_dimensions",
            f"this model's embeddings have {s.clf.embed_dim} dimensions, not {req.dimensions}",
        )
    inputs = [req.input] if isinstance(req.input, str) else req.input
    if not inputs:
        raise ApiError(422, "empty_input", "input must hold at least one text or image")
    is_image = [req.modality == "image" or (req.modality is None and is_data_url(x)) for x in inputs]
    images = [(f"input[{i}]", x) for i, (x, image) in enumerate(zip(inputs, is_image, strict=True)) if image]
    texts = [x for x, image in zip(inputs, is_image, strict=True) if not image]
    if len(images) > limits.max_images:
        raise ApiError(422, "too_many_images", f"{len(images)} images, over the limit of {limits.max_images}")
    if len(texts) > limits.max_texts:
        raise ApiError(422, "too_many_texts", f"{len(texts)} texts, over the limit of {limits.max_texts}")
    if long := [i for i, x in enumerate(inputs) if not is_image[i] and len(x) > limits.max_label_chars]:
        raise ApiError(
            422,
            "texts_too_long",
            f"input[{long[0]}] is {len(inputs[long[0]])} characters, over {limits.max_label_chars}",
        )
    for name, url in images:
        check_data_url(name, url, limits.max_image_bytes)

    # Texts and images are two jobs, admitted together, and in one batch when the queue allows.
    keep = lambda f: f  # noqa: E731
    with s.batcher.admit(len(inputs)) as ticket:
        parts = await asyncio.gather(
            encode_images(s, images, keep, ticket) if images else asyncio.sleep(0, []),
            s.batcher.submit(Job(None, texts, keep), ticket) if texts else asyncio.sleep(0, []),
        )
    image_vectors, text_vectors = iter(parts[0]), iter(parts[1])
    ordered = [next(image_vectors) if image else next(text_vectors) for image in is_image]
    prompt_tokens = num_tokens(s.clf, texts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
            for i, v in enumerate(ordered)
        ],
        "model": s.model_name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI-compatible)")
async def models(request: Request):
    s = served(request)
    return {
        "object": "list",
        "data": [{"id": s.model_name, "object": "model", "created": s.created, "owned_by": "clip-pipe"}],
    }
