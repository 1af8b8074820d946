"""The FastAPI app: lifespan (the batcher's task), middleware, error handlers, /healthz and /metrics.

Middleware, outermost first: `RequestMetrics` (every request counted, refused ones too), then `Guard`
(token and body size, before the body is read). Bad input is a 4xx JSON error
`{"error": code, "detail": message}` (OpenAI's shape on OpenAI's routes), never a 500; a full queue is
a 429 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from clip_pipe.classifier import ZeroShotClassifier
from clip_pipe.limits import FORM_SLACK_BYTES, ServeLimits
from clip_pipe.serve.batcher import Batcher, Overloaded
from clip_pipe.serve.forms import IMAGE_ERRORS, ApiError, base64_budget
from clip_pipe.serve.guard import Guard, error_body
from clip_pipe.serve.metrics import RequestMetrics, ServeMetrics
from clip_pipe.serve.routes import Served, router

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "clip-pipe"


def error_response(request: Request, status: int, code: str, detail: str, headers=None) -> JSONResponse:
    body = error_body(request.url.path, status, code, detail)
    return JSONResponse(body, status_code=status, headers=headers)


def body_limits(limits: ServeLimits):
    """Per route: only bodies that can carry images get the images' allowance."""
    json_images = limits.max_images * base64_budget(limits.max_image_bytes) + FORM_SLACK_BYTES

    def max_body_bytes(path: str, content_type: bytes) -> int:
        if path == "/v1/embeddings":  # JSON, images as base64 data URLs (4/3 of their bytes)
            return json_images
        if content_type.startswith(b"multipart/form-data"):
            return limits.max_request_bytes
        return FORM_SLACK_BYTES  # a urlencoded form carries only texts and labels

    return max_body_bytes


def create_app(
    clf: ZeroShotClassifier,
    limits: ServeLimits | None = None,
    token: str | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 2.0,
    max_queue: int = 256,
    model_name: str = DEFAULT_MODEL_NAME,
) -> FastAPI:
    """`max_queue`: images and texts admitted and not yet encoded; past it, requests get a 429."""
    limits = limits or ServeLimits()
    batcher = Batcher(clf, max_batch, max_wait_ms, max_queue)
    metrics = ServeMetrics(max_batch, lambda: batcher.num_queued)
    batcher.on_batch = metrics.batch_size.observe

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        # uvicorn gets here after the requests in flight are answered (SIGTERM: graceful shutdown).
        task.cancel()
        batcher.executor.shutdown(wait=True)

    app = FastAPI(title="clip-pipe zero-shot API", version="1", lifespan=lifespan)
    app.state.served = Served(clf, limits, batcher, metrics, model_name, int(time.time()))
    app.include_router(router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        if e.code in IMAGE_ERRORS:
            metrics.images_rejected.labels(e.code).inc()
        return error_response(request, e.status, e.code, e.detail, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        # Starlette's own refusals (no such route, a method the route does not take), in the API's shape
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "bad_request")
        return error_response(request, e.status_code, code, str(e.detail), e.headers)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, e: Overloaded):
        return error_response(request, 429, "overloaded", str(e), {"Retry-After": str(e.retry_after_s)})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {
            "status": "ok",
            "model": model_name,
            "embed_dim": clf.embed_dim,
            "max_batch": batcher.max_batch,
            "max_queue": batcher.max_queue,
            "num_batches": batcher.num_batches,
            "num_items": batcher.num_items,
            "num_queued": batcher.num_queued,
            "limits": {**vars(limits), "max_request_bytes": limits.max_request_bytes},
        }

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Guard, token=token, max_body_bytes=body_limits(limits))
    paths = {"/healthz", "/metrics"} | {route.path for route in router.routes}
    app.add_middleware(RequestMetrics, metrics=metrics, paths=paths)
    return app


def serve(
    clf: ZeroShotClassifier,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    limits: ServeLimits | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 2.0,
    max_queue: int = 256,
    model_name: str = DEFAULT_MODEL_NAME,
    shutdown_timeout_s: int = 30,
) -> None:
    """Serve until SIGTERM or SIGINT. Then uvicorn stops listening at once, lets the requests in flight
    finish (for at most `shutdown_timeout_s`), closes idle connections, and returns."""
    import uvicorn
    from prometheus_client import disable_created_metrics

    # The process is the server's alone: leave out the `*_created` series, which only double the output.
    disable_created_metrics()
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving on %s without a token: anyone who can reach this port can use the model", host)
    app = create_app(clf, limits, token, max_batch, max_wait_ms, max_queue, model_name)
    log.info("limits: %s", json.dumps(vars(limits or ServeLimits())))
    uvicorn.run(
        app, host=host, port=port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=shutdown_timeout_s,
    )  # fmt: skip
