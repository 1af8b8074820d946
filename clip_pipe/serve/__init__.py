"""The zero-shot HTTP API (FastAPI):

    POST /v1/classify     multipart: images (files, repeatable), labels (repeatable), templates, top_k
    POST /v1/embed        multipart: images (files) or texts (repeatable fields)
    POST /v1/embeddings   OpenAI-compatible JSON: texts, and images as base64 data URLs
    GET  /v1/models       the served model (OpenAI-compatible)
    GET  /healthz         liveness and model facts;  GET /metrics  Prometheus;  OpenAPI at /docs

app.py     create_app, serve          routes.py   the /v1/ routes
forms.py   parsing and image decoding  schemas.py  pydantic models
batcher.py micro-batching, bounded queue (429)   guard.py  token and body size per route
metrics.py Prometheus metrics, one registry per app
"""

from clip_pipe.serve.app import create_app, serve
from clip_pipe.serve.batcher import Batcher, Job, Overloaded

__all__ = ["Batcher", "Job", "Overloaded", "create_app", "serve"]
