"""Prometheus metrics of one app, served at GET /metrics in the text exposition format.

Each app gets its own `CollectorRegistry`, so several apps in one process (tests) never share counts.
`RequestMetrics` is plain ASGI (no FastAPI): it counts every request, including the ones the guard
refuses before any handler runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServeMetrics:
    def __init__(self, max_batch: int, num_queued: Callable[[], float]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "clip_pipe_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "clip_pipe_request_seconds", "Time to answer a request, by route and status",
            ["route", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        batch_buckets = sorted({2**i for i in range(max_batch.bit_length())} | {max_batch})
        self.batch_size = Histogram(
            "clip_pipe_batch_size", "Images or texts per forward pass", buckets=batch_buckets, registry=r
        )
        self.queue_depth = Gauge(
            "clip_pipe_queue_depth", "Images and texts admitted and not yet in a forward pass", registry=r
        )
        self.queue_depth.set_function(num_queued)
        self.images_decoded = Counter("clip_pipe_images_decoded", "Images decoded", registry=r)
        self.images_rejected = Counter(
            "clip_pipe_images_rejected", "Images refused, by error code", ["reason"], registry=r
        )


class RequestMetrics:
    """ASGI middleware: count and time each HTTP request by its route template and status.

    Paths that match no route are counted as `route="other"`, so a scan of random URLs cannot grow
    the number of time series.
    """

    def __init__(self, app, metrics: ServeMetrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route, str(status)).observe(time.perf_counter() - start)
