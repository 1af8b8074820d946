"""The HTTP API under hostile input, over real HTTP to a live `clip-pipe serve` on 127.0.0.1.

- A Hypothesis fuzzer sends random multipart bodies (field names, filenames, part headers, content
  types, sizes, encodings, broken framing) and random headers: never a 5xx, and the server stays up.
- Slowloris clients (headers or bodies trickled a byte at a time) do not starve the others.
"""

from __future__ import annotations

import random
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import COLORS, LiveServer, color_jpeg, png_bomb, truncated_jpeg

pytestmark = pytest.mark.slow
MAX_IMAGE_BYTES = 20_000


@pytest.fixture(scope="module")
def server(color_model):
    limits = ["--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-images", "4", "--max-labels", "50"]
    with LiveServer(color_model, *limits) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


RNG = random.Random(0)
IMAGES = [
    color_jpeg("red", RNG),
    color_jpeg("blue", RNG, size=64),
    truncated_jpeg(),
    png_bomb(20000, 20000),
    b"GIF89a not really",
    b"",
    bytes(range(256)) * 100,  # over MAX_IMAGE_BYTES
]
NAMES = st.sampled_from(["images", "labels", "templates", "top_k", "texts"] * 2) | st.text(max_size=20)
TEXT_VALUES = st.sampled_from(
    ["red", "a photo of a {c} square", "{c}", "{}", "{0}", "{c} {c}", "3", "-1", "0", "%s"]
) | st.text(max_size=300)
ENCODINGS = st.sampled_from([None, "gzip", "deflate", "br", "identity", "x-garbage"])


@st.composite
def part(draw) -> bytes:
    name = draw(NAMES)
    disposition = f'form-data; name="{name}"'
    if draw(st.booleans()):
        filename = draw(
            st.sampled_from(["a.jpg", "", "../../etc/passwd", "x\u00e9.png"]) | st.text(max_size=30)
        )
        disposition += f'; filename="{filename}"'
    headers = [f"Content-Disposition: {disposition}"]
    if draw(st.booleans()):
        headers.append("Content-Type: " + draw(st.sampled_from(["image/jpeg", "text/plain; charset=latin-1",
                                                                "application/octet-stream", "", "x/y; a=b"])))  # fmt: skip
    if draw(st.booleans()):
        headers.append(
            "Content-Transfer-Encoding: " + draw(st.sampled_from(["base64", "8bit", "quoted-printable"]))
        )
    if draw(st.booleans()):
        value = draw(st.sampled_from(IMAGES))
    else:
        value = draw(TEXT_VALUES).encode(draw(st.sampled_from(["utf-8", "utf-16", "latin-1"])), "replace")
    header_bytes = "\r\n".join(headers).encode("utf-8", "surrogatepass")
    return header_bytes + b"\r\n\r\n" + value


@st.composite
def request(draw) -> tuple[str, dict, bytes]:
    path = draw(st.sampled_from(["/v1/classify", "/v1/embed", "/v1/classify?top_k=2", "/v1/nothing"]))
    # Mostly well-formed framing and a matching content type, so that requests get past the form
    # parser often enough to reach the handlers' own checks; the rest is broken on purpose.
    boundary = draw(
        st.sampled_from(["b0undary", "x" * 70, "----WebKitFormBoundary7MA4YWxkTrZu0gW"])
        | st.text(min_size=1, max_size=20)
    )
    parts = draw(st.lists(part(), max_size=8))
    framing = draw(st.sampled_from(["good"] * 4 + ["no_end", "bad_boundary", "lf_only", "raw"]))
    b = boundary.encode("utf-8", "surrogatepass")
    if framing == "raw":
        body = draw(st.binary(max_size=2000))
    else:
        sep = b"\n" if framing == "lf_only" else b"\r\n"
        marker = b"--" + (b"other" if framing == "bad_boundary" else b)
        body = b"".join(marker + sep + p + sep for p in parts)
        body += b"" if framing == "no_end" else marker + b"--" + sep
    content_type = draw(
        st.sampled_from([f"multipart/form-data; boundary={boundary}"] * 6 + ["multipart/form-data",
                         f'multipart/form-data; boundary="{boundary}"; charset=utf-16', "application/json",
                         "text/plain", "application/x-www-form-urlencoded", ""])
        | st.text(max_size=40)
    )  # fmt: skip
    headers = {"Content-Type": content_type}
    if (encoding := draw(ENCODINGS)) is not None:
        headers["Content-Encoding"] = encoding
    return path, headers, body


def safe_headers(headers: dict) -> dict:
    # A header value must be latin-1, without control characters or outer spaces, to go on the wire.
    return {
        k: "".join(c if " " <= c != "\x7f" else "?" for c in v).strip().encode("latin-1", "replace")
        for k, v in headers.items()
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])  # fmt: skip
@given(request())
def test_fuzzed_requests_never_get_a_5xx(client, server, req):
    path, headers, body = req
    response = client.post(path, headers=safe_headers(headers), content=body)
    assert response.status_code < 500, (response.status_code, response.text, headers, body[:300])
    assert server.process.poll() is None, "the server died"


def test_server_is_still_up_and_right_after_the_fuzzing(client, server):
    files = [("images", ("r.jpg", color_jpeg("red", random.Random(1)), "image/jpeg"))]
    response = client.post("/v1/classify", files=files, data={"labels": list(COLORS)})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["labels"][0]["label"] == "red"
    assert client.get("/healthz").status_code == 200


def slow_client(url: str, kind: str) -> socket.socket:
    """Opens a connection and starts a request it will send a byte at a time (or never finish)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    if kind == "headers":
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # the headers never end
    else:  # the headers end; the promised body never comes
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 60000\r\n\r\n--b\r\n"
        )
    return sock


def test_slowloris_clients_do_not_starve_the_others(server):
    num_slow, num_rounds = 200, 5
    slow = [slow_client(server.url, "headers" if i % 2 else "body") for i in range(num_slow)]
    try:
        files = [("images", ("b.jpg", color_jpeg("blue", random.Random(2)), "image/jpeg"))]
        latencies = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(num_rounds):
                for sock in slow:  # keep every slow client alive: one more byte each
                    sock.sendall(b"X")
                start = time.monotonic()
                response = client.post("/v1/classify", files=files, data={"labels": list(COLORS)})
                latencies.append(time.monotonic() - start)
                assert response.status_code == 200, response.text
                assert response.json()["results"][0]["labels"][0]["label"] == "blue"
        assert max(latencies) < 10, latencies
    finally:
        for sock in slow:
            sock.close()
