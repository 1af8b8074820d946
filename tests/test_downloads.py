"""Downloads against a hostile HTTP server on 127.0.0.1: endless chunked bodies, trickled bytes,
transient errors, decompression bombs and redirects off the web. Each is bounded, and each ends as
the right kind of outcome (written, failed and worth retrying, or rejected)."""

from __future__ import annotations

import contextlib
import csv
import http.server
import itertools
import threading
import time
from collections import Counter

import httpx
import pytest

from clip_pipe.prep import EncodeConfig, Row
from clip_pipe.prep.dataset import build_dataset
from clip_pipe.prep.fetch import DownloadConfig, DownloadFailed, download, make_client
from clip_pipe.prep.images import Rejected
from tests.conftest import png_bomb
from tests.prep_helpers import image_bytes, noise

CHUNK = 64 << 10


class HostileServer:
    """/endless (chunked, no Content-Length, never ends), /trickle (a byte every 0.25 s, 200 in all),
    /flaky/K/N.png (503 for the first K requests, then an image), /bomb.png (a PNG claiming 9000x9000
    pixels), /to/SCHEME (a redirect to file:///etc/passwd, ftp://..., or a data: URL)."""

    def __init__(self):
        self.hits: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.bytes_sent: Counter = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_):
                pass

            def do_GET(self):
                server.hits[self.path] += 1
                server.times.setdefault(self.path, []).append(time.monotonic())
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                    server.respond(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def respond(self, h: http.server.BaseHTTPRequestHandler) -> None:
        parts = h.path.strip("/").split("/")
        if parts[0] == "endless":
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for _ in range(4096):  # 256 MiB at most: bounded even if the client never stops reading
                h.wfile.write(b"%x\r\n%s\r\n" % (CHUNK, bytes(CHUNK)))
                self.bytes_sent[h.path] += CHUNK
            h.wfile.write(b"0\r\n\r\n")
        elif parts[0] == "trickle":
            body = image_bytes(noise((20, 20)), "PNG")[:200]
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            for i in range(len(body)):
                h.wfile.write(body[i : i + 1])
                h.wfile.flush()
                self.bytes_sent[h.path] += 1
                time.sleep(0.25)
        elif parts[0] == "flaky":
            if self.hits[h.path] <= int(parts[1]):
                self.send(h, 503, b"busy, try later")
            else:
                self.send(h, 200, image_bytes(noise((24, 20), seed=int(parts[2].split(".")[0])), "PNG"))
        elif parts[0] == "bomb.png":
            self.send(h, 200, png_bomb(9000, 9000))
        elif parts[0] == "to":
            target = {
                "file": "file:///etc/passwd",
                "ftp": "ftp://127.0.0.1/image.png",
                "data": "data:image/png;base64,iVBORw0KGgo=",
            }[parts[1]]
            h.send_response(302)
            h.send_header("Location", target)
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            self.send(h, 404, b"no such thing")

    @staticmethod
    def send(h, status: int, body: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    with HostileServer() as s:
        yield s


def fetch(url: str, cfg: DownloadConfig) -> bytes:
    with make_client(cfg, 1) as client:
        return download(client, url, cfg)


def test_chunked_body_without_length_is_cut_at_the_size_cap(server):
    cfg = DownloadConfig(timeout=20, num_retries=0, max_bytes=1 << 20)
    start = time.monotonic()
    with pytest.raises(Rejected, match="over the limit of 1048576 bytes"):
        fetch(server.url + "/endless", cfg)
    assert time.monotonic() - start < 10
    time.sleep(0.5)  # let the server notice the closed connection
    # Read no further than the cap (plus what sockets buffer), nowhere near the 256 MiB on offer.
    assert server.bytes_sent["/endless"] < 32 << 20, server.bytes_sent


def test_a_byte_at_a_time_is_caught_by_the_deadline(server):
    # Each byte comes well within httpx's per-read timeout; only the whole-download deadline stops it.
    cfg = DownloadConfig(timeout=1.5, num_retries=1, backoff=0.1)
    start = time.monotonic()
    with pytest.raises(DownloadFailed, match=r"timed out after 1\.5 s"):
        fetch(server.url + "/trickle", cfg)
    elapsed = time.monotonic() - start
    assert server.hits["/trickle"] == 2, "a timeout is transient: retried num_retries times"
    assert elapsed < 2 * 1.5 + 0.1 + 3, f"{elapsed:.1f} s: the deadline did not hold"


def test_503_then_200_is_retried_with_backoff_and_written(server, tmp_path):
    cfg = DownloadConfig(timeout=5, num_retries=2, backoff=0.3)
    rows = [
        Row(0, "", "twice busy", url=server.url + "/flaky/2/1.png"),
        Row(1, "", "fine", url=server.url + "/flaky/0/2.png"),
    ]
    summary = build_dataset(
        rows, tmp_path / "out", EncodeConfig(image_size=16), download_cfg=cfg, num_threads=2
    )
    assert (summary.num_written, summary.num_failed) == (2, 0)
    assert server.hits["/flaky/2/1.png"] == 3 and server.hits["/flaky/0/2.png"] == 1
    times = server.times["/flaky/2/1.png"]
    waits = [b - a for a, b in itertools.pairwise(times)]
    # backoff, then twice the backoff (a little slack below for clock granularity).
    assert waits[0] >= 0.3 - 0.02 and waits[1] >= 0.6 - 0.02, waits

    # Retries exhausted: failed (so --retry-failed can try again later), not rejected.
    with pytest.raises(DownloadFailed, match="HTTP 503"):
        fetch(server.url + "/flaky/5/3.png", DownloadConfig(timeout=5, num_retries=1, backoff=0.0))
    assert server.hits["/flaky/5/3.png"] == 2


def test_decompression_bomb_over_http_is_rejected_from_its_header(server, tmp_path):
    rows = [
        Row(0, "", "a bomb", url=server.url + "/bomb.png"),
        Row(1, "", "fine", url=server.url + "/flaky/0/4.png"),
    ]
    summary = build_dataset(rows, tmp_path / "out", EncodeConfig(image_size=16), num_threads=2)
    assert (summary.num_written, summary.num_rejected) == (1, 1)
    with open(tmp_path / "out" / "rejected.csv", newline="") as f:
        (rejected,) = list(csv.DictReader(f))
    assert rejected["index"] == "0" and "decompression bomb: 9000x9000" in rejected["reason"], rejected


@pytest.mark.parametrize("scheme", ["file", "ftp", "data"])
def test_redirect_off_http_is_rejected_and_never_followed(server, scheme):
    cfg = DownloadConfig(timeout=5, num_retries=2, backoff=0.0)
    with pytest.raises(Rejected, match="invalid URL"):
        fetch(server.url + f"/to/{scheme}", cfg)
    assert server.hits[f"/to/{scheme}"] == 1, "not worth retrying"


def test_redirect_to_file_url_reads_no_local_file(server, tmp_path, monkeypatch):
    # Belt and braces: even a client that could open file:// URLs must not be asked to.
    opened = []
    real_send = httpx.Client.send

    def send(self, request, **kwargs):
        opened.append(str(request.url))
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", send)
    with pytest.raises(Rejected):
        fetch(server.url + "/to/file", DownloadConfig(timeout=5, num_retries=0))
    assert all(url.startswith(server.url) for url in opened), opened
