"""The zero-shot HTTP API: FastAPI app factory, request limits, bearer auth and a micro-batcher.

    POST /v1/classify   multipart: images (files, repeatable), labels (repeatable), templates, top_k
    POST /v1/embed      multipart: images (files) or texts (repeatable fields)
    GET  /healthz       liveness and model facts; OpenAPI at /docs and /openapi.json

Every request's images are decoded in a thread pool, then queued for the model. One worker thread owns
the model: it takes whatever is queued (up to `max_batch` images, waiting at most `max_wait_ms` for
more) and encodes it in one forward pass, so under concurrent load the CPU works on batches rather than
on one image at a time. Bad input is a 4xx JSON error `{"error": code, "detail": message}`, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from clip_pipe.classifier import (
    DEFAULT_TEMPLATES,
    ImageError,
    ImageTooLarge,
    NotAnImage,
    ZeroShotClassifier,
    check_labels,
    open_image,
)
from clip_pipe.limits import FORM_SLACK_BYTES, ServeLimits

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class BodyTooLarge(Exception):
    pass


def error_response(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------------
# Micro-batching


@dataclass
class Job:
    """One request's work: images (pixels) or texts to encode, then `finish(features)` for its answer."""

    pixels: torch.Tensor | None
    texts: list[str] | None
    finish: Callable[[torch.Tensor], Any]
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]

    @property
    def size(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.texts)


class Batcher:
    """Collects queued jobs into batches and runs them on the model in one worker thread."""

    def __init__(self, clf: ZeroShotClassifier, max_batch: int, max_wait_ms: float):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.clf, self.max_batch, self.max_wait_s = clf, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-pipe-model")
        self.num_batches = self.num_items = 0

    async def submit(self, job: Job) -> Any:
        job.future = asyncio.get_running_loop().create_future()
        await self.queue.put(job)
        return await job.future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        carried: Job | None = None
        while True:
            batch = [carried or await self.queue.get()]
            carried = None
            size = batch[0].size
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                try:  # what is already queued joins at once; then wait a little for latecomers
                    job = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    if (timeout := deadline - loop.time()) <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), timeout)
                    except TimeoutError:
                        break
                if size + job.size > self.max_batch:  # would overflow: it starts the next batch
                    carried = job
                    break
                batch.append(job)
                size += job.size
            self.num_batches += 1
            self.num_items += size
            results = await loop.run_in_executor(self.executor, self.process, batch)
            for job, result in zip(batch, results, strict=True):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def process(self, batch: list[Job]) -> list[Any]:
        """In the model thread: one forward pass for all images, one for all texts, then each answer."""
        features: dict[int, torch.Tensor] = {}
        try:
            for kind, encode in (("pixels", self.clf.encode_pixels), ("texts", self.clf.embed_texts)):
                jobs = [job for job in batch if getattr(job, kind) is not None]
                if not jobs:
                    continue
                if kind == "pixels":
                    encoded = encode(torch.cat([job.pixels for job in jobs]))  # (sum N, D)
                else:
                    encoded = encode([text for job in jobs for text in job.texts])  # (sum N, D)
                for job, part in zip(jobs, encoded.split([job.size for job in jobs]), strict=True):
                    features[id(job)] = part
        except Exception as e:  # a model failure fails every request of the batch, not the server
            log.exception("batch of %d jobs failed", len(batch))
            return [e] * len(batch)
        results = []
        for job in batch:
            try:
                results.append(job.finish(features[id(job)]))
            except Exception as e:
                results.append(e)
        return results


# ---------------------------------------------------------------------------------------------------
# Auth and body size, checked before the body is read


class Guard:
    """ASGI middleware: bearer token (if set) and request size for every /v1/ route."""

    def __init__(self, app, token: str | None, max_request_bytes: int):
        self.app, self.max_request_bytes = app, max_request_bytes
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            # Constant-time comparison, so the response time says nothing about how much of a guess was right.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                detail = "missing bearer token" if not given else "wrong bearer token"
                response = error_response(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        # Only multipart bodies carry images; anything else (a urlencoded form of texts) stays small.
        is_multipart = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        max_bytes = self.max_request_bytes if is_multipart else FORM_SLACK_BYTES
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            detail = f"request body is {int(declared)} bytes, over the limit of {max_bytes}"
            return await error_response(413, "request_too_large", detail)(scope, receive, send)

        num_bytes = 0

        async def counting_receive():  # a chunked body declares no length: count as it arrives
            nonlocal num_bytes
            message = await receive()
            num_bytes += len(message.get("body", b""))
            if num_bytes > max_bytes:
                raise BodyTooLarge
            return message

        return await self.app(scope, counting_receive, send)


# ---------------------------------------------------------------------------------------------------
# Request parsing


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


def decode(clf: ZeroShotClassifier, images: list[tuple[str, bytes]], limits: ServeLimits) -> torch.Tensor:
    """In a pool thread: validate, decode and preprocess every image of a request, (N, 3, H, W)."""
    pixels = []
    for name, data in images:
        try:
            pixels.append(clf.preprocess(open_image(data, limits.max_image_bytes, limits.max_image_pixels)))
        except ImageTooLarge as e:
            raise ApiError(413, "image_too_large", f"{name}: {e}") from None
        except NotAnImage as e:
            raise ApiError(415, "not_an_image", f"{name}: {e}") from None
        except ImageError as e:
            raise ApiError(422, "bad_image", f"{name}: {e}") from None
    return torch.stack(pixels)


# ---------------------------------------------------------------------------------------------------
# Responses (for the OpenAPI docs)


class RankedLabel(BaseModel):
    label: str
    probability: float


class ImageResult(BaseModel):
    filename: str
    labels: list[RankedLabel]


class ClassifyResponse(BaseModel):
    results: list[ImageResult]


class EmbedResponse(BaseModel):
    dim: int
    embeddings: list[list[float]]


def multipart_body(properties: dict, required: list[str]) -> dict:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
STRINGS = {"type": "array", "items": {"type": "string"}}


def create_app(
    clf: ZeroShotClassifier,
    limits: ServeLimits | None = None,
    token: str | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 2.0,
) -> FastAPI:
    limits = limits or ServeLimits()
    batcher = Batcher(clf, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=True)

    app = FastAPI(title="clip-pipe zero-shot API", version="1", lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(Guard, token=token, max_request_bytes=limits.max_request_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e.status, e.code, e.detail)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {
            "status": "ok",
            "embed_dim": clf.embed_dim,
            "max_batch": batcher.max_batch,
            "num_batches": batcher.num_batches,
            "num_items": batcher.num_items,
            "limits": {**vars(limits), "max_request_bytes": limits.max_request_bytes},
        }

    @app.post(
        "/v1/classify",
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
        pixels = await asyncio.to_thread(decode, clf, images, limits)
        k = int(top_k) if top_k is not None else None
        ranked = await batcher.submit(Job(pixels, None, lambda f: clf.rank(f, labels, templates, k)))
        return {
            "results": [
                {"filename": name, "labels": [p._asdict() for p in predictions]}
                for (name, _), predictions in zip(images, ranked, strict=True)
            ]
        }

    @app.post(
        "/v1/embed",
        dependencies=[Depends(close_form)],
        response_model=EmbedResponse,
        openapi_extra=multipart_body({"images": FILES, "texts": STRINGS}, []),
        summary="L2-normalised embeddings of images or of texts",
    )
    async def embed(request: Request):
        """Send either `images` (files) or `texts` (repeatable fields), not both."""
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
        if texts:
            job = Job(None, texts, lambda f: f.tolist())
        else:
            job = Job(await asyncio.to_thread(decode, clf, images, limits), None, lambda f: f.tolist())
        return {"dim": clf.embed_dim, "embeddings": await batcher.submit(job)}

    return app


def serve(
    clf: ZeroShotClassifier,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    limits: ServeLimits | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 2.0,
) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving on %s without a token: anyone who can reach this port can use the model", host)
    app = create_app(clf, limits, token, max_batch, max_wait_ms)
    log.info("limits: %s", json.dumps(vars(limits or ServeLimits())))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
