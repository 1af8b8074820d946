"""Real servers on loopback for the remote-data tests, started by fixtures in the test process.

- S3: moto's server app (the one `moto_server` and `ThreadedMotoServer` run, which s3fs's own tests use).
- HTTP: werkzeug's `send_file`, which answers Range requests with 206 as nginx does.

Both run under werkzeug's threaded server behind `FaultMiddleware`, which injects faults per path
(an HTTP status some number of times, a body cut or stalled after some bytes, latency) and logs every
request with its Range and the number in flight. `LoopbackServer.stop` also shuts down the open
connections, as a crash does, and `start` brings the server back on the same port with its data.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.utils import safe_join, send_file
from werkzeug.wrappers import Request, Response


@dataclass
class Rule:
    status: int | None = None
    """Answer with this status instead of the file."""
    times: int | None = None
    """Apply this many times, then pass (None: always)."""
    cut_after: int | None = None
    """Close the connection after this many bytes of the body."""
    stall_after: int | None = None
    """Send this many bytes of the body, then nothing (until the test ends)."""
    get_only: bool = True
    """Leave HEAD requests alone."""


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    start: float
    end: float | None = None
    status: int | None = None


@dataclass
class Faults:
    """What the middleware does, per path suffix, and what it saw. Thread-safe."""

    rules: dict[str, Rule] = field(default_factory=dict)
    latency_s: float = 0.0
    """Added before every answer, as a cloud store's time to first byte."""
    bytes_per_s: float = 0.0
    """Caps each response's body (0: no cap), as an object store caps one connection."""
    log: list[Logged] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    release: threading.Event = field(default_factory=threading.Event)  # ends every stall
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, suffix: str, **rule) -> None:
        with self.lock:
            self.rules[suffix] = Rule(**rule)

    def reset(self) -> None:
        with self.lock:
            self.rules.clear()
            self.log.clear()
            self.latency_s, self.max_in_flight = 0.0, self.in_flight

    def gets(self, suffix: str = "") -> list[Logged]:
        with self.lock:
            return [r for r in self.log if r.method == "GET" and r.path.endswith(suffix)]

    def _rule(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for suffix, rule in self.rules.items():
                if path.endswith(suffix) and (method == "GET" or not rule.get_only):
                    if rule.times is None:
                        return rule
                    if rule.times > 0:
                        rule.times -= 1
                        return rule
        return None


class FaultMiddleware:
    def __init__(self, app: Callable, faults: Faults):
        self.app, self.faults = app, faults

    def __call__(self, environ, start_response):
        faults = self.faults
        entry = Logged(
            environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("HTTP_RANGE"), time.monotonic()
        )
        with faults.lock:
            faults.log.append(entry)
            faults.in_flight += 1
            faults.max_in_flight = max(faults.max_in_flight, faults.in_flight)

        def done() -> None:
            with faults.lock:
                if entry.end is None:
                    entry.end = time.monotonic()
                    faults.in_flight -= 1

        def start(status, headers, exc_info=None):
            entry.status = int(status.split()[0])
            return start_response(status, headers, exc_info)

        if faults.latency_s:
            time.sleep(faults.latency_s)
        rule = faults._rule(entry.method, entry.path)
        if rule is not None and rule.status is not None:
            done()
            return Response(f"injected {rule.status}\n", status=rule.status)(environ, start)
        body = self.app(environ, start)
        if faults.bytes_per_s:
            body = self._throttled(body, faults.bytes_per_s)
        if rule is None or (rule.cut_after is None and rule.stall_after is None):
            return _Closing(body, done)
        return _Closing(self._faulty(body, rule), done)

    @staticmethod
    def _throttled(body: Iterable[bytes], bytes_per_s: float):
        start, sent = time.monotonic(), 0
        for data in body:
            for i in range(0, len(data), 65536):
                piece = data[i : i + 65536]
                yield piece
                sent += len(piece)
                time.sleep(max(0.0, start + sent / bytes_per_s - time.monotonic()))

    def _faulty(self, body: Iterable[bytes], rule: Rule):
        limit = rule.cut_after if rule.cut_after is not None else rule.stall_after
        sent = 0
        for data in body:
            if sent + len(data) >= limit:
                yield data[: limit - sent]
                if rule.stall_after is not None:
                    self.faults.release.wait(600)
                raise ConnectionAbortedError("injected: connection cut mid-body")
            sent += len(data)
            yield data


class _Closing:
    """A WSGI body that calls `done` when the server closes it."""

    def __init__(self, body, done):
        self.body, self.done = body, done

    def __iter__(self):
        return iter(self.body)

    def close(self):
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.done()


def static_app(root: Path) -> Callable:
    """Files under `root`, with HEAD, Range (206) and 404, as a plain static server answers."""

    def app(environ, start_response):
        request = Request(environ)
        path = safe_join(str(root), request.path.lstrip("/"))
        if path is None or not os.path.isfile(path):
            return Response("not found\n", status=404)(environ, start_response)
        response = send_file(path, environ, mimetype="application/octet-stream", conditional=True)
        return response(environ, start_response)

    return app


def moto_app() -> Callable:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return DomainDispatcherApplication(create_backend_app)


class _TrackingHandler(WSGIRequestHandler):
    """Keeps its connection in the server's set, so that `stop` can cut it."""

    def setup(self):
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self):
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_request(self, *args, **kwargs):  # quiet
        pass


def _moto_handler() -> type:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class MotoTrackingHandler(_TrackingHandler, MotoRequestHandler):
        pass

    return MotoTrackingHandler


class LoopbackServer:
    """A threaded werkzeug server on 127.0.0.1 that can be killed and brought back on the same port."""

    def __init__(self, app: Callable, faults: Faults, handler=_TrackingHandler):
        self.app, self.faults, self.handler = FaultMiddleware(app, faults), faults, handler
        self.port = 0
        self.server = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackServer:
        server = make_server("127.0.0.1", self.port, self.app, threaded=True, request_handler=self.handler)
        server.connections, server.connections_lock = set(), threading.Lock()
        self.server, self.port = server, server.server_address[1]
        self.thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        return self

    def stop(self) -> None:
        """As a crash: no new connections, and the open ones are cut."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        with self.server.connections_lock:
            for connection in list(self.server.connections):
                with contextlib.suppress(OSError):  # already closed
                    connection.shutdown(socket.SHUT_RDWR)
        self.thread.join()
        self.server = None


def upload(s3_client, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())


# --------------------------------------------------------------------------------- data and fixtures


def write_img2dataset_shards(
    folder: Path, shard_sizes: list[int], seed: int = 0, image: Callable | None = None
) -> Path:
    """Shards as img2dataset (and DataComp's download) writes them: `00000.tar` holding `K.jpg` (or .png,
    .webp), `K.txt` and `K.json` per sample, with `00000_stats.json` and `00000.parquet` beside it; no
    sizes.json. `image(index, rng) -> (ext, bytes, caption)` makes a sample (default: coloured squares)."""
    import io
    import json
    import random

    import pandas as pd
    import webdataset as wds
    from PIL import Image

    from tests.conftest import COLORS

    def square(index: int, rng: random.Random) -> tuple[str, bytes, str]:
        color = rng.choice(list(COLORS))
        ext = ("jpg", "png", "webp")[index % 3]
        pixel = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLORS[color])
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), pixel).save(buffer, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
        return ext, buffer.getvalue(), f"a photo of a {color} square"

    image = image or square
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    index = 0
    for shard, num_samples in enumerate(shard_sizes):
        rows = []
        with wds.TarWriter(str(folder / f"{shard:05d}.tar"), mtime=0) as writer:
            for i in range(num_samples):
                key = f"{shard:05d}{i:04d}"
                ext, data, caption = image(index, rng)
                meta = {"url": f"https://example.com/{key}.{ext}", "caption": caption, "key": key,
                        "status": "success", "error_message": None, "width": 16, "height": 16}  # fmt: skip
                writer.write({"__key__": key, ext: data, "txt": caption, "json": json.dumps(meta)})
                rows.append(meta)
                index += 1
        failed = rng.randint(0, 3)  # img2dataset's stats count the failed downloads too
        stats = {"count": num_samples + failed, "successes": num_samples, "failed_to_download": failed,
                 "failed_to_resize": 0, "status_dict": {"success": num_samples}}  # fmt: skip
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        pd.DataFrame(rows).to_parquet(folder / f"{shard:05d}.parquet")
    return folder


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3:
    server: LoopbackServer
    faults: Faults
    bucket: str
    client: object

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def upload(self, folder: Path, prefix: str) -> str:
        upload(self.client, self.bucket, folder, prefix)
        return self.url(prefix + "/")


_bucket_numbers = iter(range(10**6))


def s3_session_server():
    """moto on loopback for the whole session; AWS_ENDPOINT_URL and fake credentials point every client
    (ours, boto3, subprocesses) at it."""
    faults = Faults()
    server = LoopbackServer(moto_app(), faults, handler=_moto_handler()).start()
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=server.url)
    try:
        yield server
    finally:
        faults.release.set()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def s3_for_test(server: LoopbackServer):
    """A fresh bucket on the session's server (started again if a test stopped it), faults cleared."""
    import boto3

    if server.server is None:
        server.start()
    server.faults.reset()
    server.faults.release = threading.Event()
    client = boto3.client("s3", endpoint_url=server.url)
    bucket = f"test-bucket-{next(_bucket_numbers):06d}"
    client.create_bucket(Bucket=bucket)
    try:
        yield S3(server, server.faults, bucket, client)
    finally:
        server.faults.release.set()
        server.faults.reset()


@dataclass
class Http:
    server: LoopbackServer
    faults: Faults
    root: Path

    def url(self, path: str = "") -> str:
        return f"{self.server.url}/{path}"


def http_for_test(root: Path):
    faults = Faults()
    root.mkdir(parents=True, exist_ok=True)
    server = LoopbackServer(static_app(root), faults).start()
    try:
        yield Http(server, faults, root)
    finally:
        faults.release.set()
        server.stop()


# ------------------------------------------------------------------------------ reading as the loader


def epoch_blocks(
    shards: list, reader, num_streams: int = 1, epoch: int = 0, block_size: int = 8, seed: int = 0
):
    """One epoch of a source's shards read as the loader reads them, without decoding: `num_streams`
    streams of the elastic order (order.py), each through its own `TarBlocks` on the one `reader` (a
    loader slot's), taking turns block by block. Yields (samples, num_lost) per block.

    Each stream announces its next shards as the loader's do, except the next epoch's, which this
    epoch's reader would fetch ahead and never read (and a test counting requests would see)."""
    import bisect

    from clip_pipe.data.order import SourceOrder
    from clip_pipe.data.stream import TarBlocks

    order = SourceOrder([s.num_samples for s in shards], num_streams, block_size, seed, 0)
    unreadable: dict[int, int] = {}  # shared by the source's streams, as in ImageTextStream
    streams = [TarBlocks(shards, reader, unreadable) for _ in range(num_streams)]

    def upcoming(j: int, block: int) -> list[int]:
        segments, counts = order.stream_range(j, epoch)
        k = bisect.bisect_right(counts, block * block_size) - 1
        return order.upcoming_shards(j, epoch, block, 4)[: len(segments) - k]

    for j, read_block in enumerate(streams):  # as ImageTextStream does before its first piece
        read_block.hint(upcoming(j, 0))
    try:
        for block in range(max(order.num_blocks(j, epoch) for j in range(num_streams))):
            for j, read_block in enumerate(streams):
                if block < order.num_blocks(j, epoch):
                    yield read_block(order.block_segments(j, epoch, block), upcoming(j, block))
    finally:
        for read_block in streams:
            read_block.close()


def read_epoch(shards: list, reader, **kwargs) -> tuple[list[str], int]:
    """(the keys an epoch gives out, sorted; the samples it lost), read as `epoch_blocks` reads."""
    keys, num_lost = [], 0
    for samples, lost in epoch_blocks(shards, reader, **kwargs):
        keys += [s["__key__"] for s in samples]
        num_lost += lost
    return sorted(keys), num_lost
