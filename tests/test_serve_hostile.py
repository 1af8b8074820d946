"""The HTTP API under hostile input, over real HTTP to a live `clip-pipe serve` on 127.0.0.1.

- A Hypothesis fuzzer sends random multipart bodies (field names, filenames, part headers, content
  types, sizes, encodings, broken framing), random OpenAI-style JSON to /v1/embeddings (any JSON, odd
  fields, data URLs good and bad, deep nesting, huge numbers), any method to /v1/models, and random
  headers: never a 5xx, every error in the API's JSON shape (OpenAI's on its routes), and the server
  stays up.
- Slowloris clients (headers or bodies trickled a byte at a time) do not starve the others.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.conftest import COLORS, LiveServer, color_jpeg, png_bomb, truncated_jpeg

pytestmark = pytest.mark.slow
MAX_IMAGE_BYTES = 20_000
MODEL = "colors"


@pytest.fixture(scope="module")
def server(color_model):
    limits = ["--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-images", "4", "--max-labels", "50",
              "--max-texts", "8", "--served-model-name", MODEL]  # fmt: skip
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


def mostly(good: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """`good` three times in four: requests well-formed often enough to pass the early checks and reach
    the later ones, and the model. (st.one_of(good, good, good, other) would not: it drops repeats.)"""
    return st.sampled_from([good, good, good, other]).flatmap(lambda strategy: strategy)


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
def multipart_request(draw) -> tuple[str, str, dict, bytes]:
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
        mostly(st.just(f"multipart/form-data; boundary={boundary}"),
               st.sampled_from(["multipart/form-data", f'multipart/form-data; boundary="{boundary}"; charset=utf-16',
                                "application/json", "text/plain", "application/x-www-form-urlencoded", ""])
               | st.text(max_size=40))
    )  # fmt: skip
    headers = {"Content-Type": content_type}
    if (encoding := draw(ENCODINGS)) is not None:
        headers["Content-Encoding"] = encoding
    return "POST", path, headers, body


def data_url(data: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
INPUTS = mostly(
    st.sampled_from(["a photo of a red square", "blue", data_url(IMAGES[0]), data_url(IMAGES[1], "png")])
    | st.text(max_size=100),
    st.sampled_from(
        [data_url(image) for image in IMAGES[2:]]  # truncated, a pixel bomb, not an image, empty, too big
        + [
            "data:image/jpeg;base64,not base64!",
            "data:image/jpeg;base64,",
            "data:",
            "DATA:IMAGE/JPEG;BASE64," + base64.b64encode(IMAGES[0]).decode(),
            "data:text/plain;base64,aGk=",
            "http://127.0.0.1:1/a.jpg",  # never fetched
            "x" * 5000,  # over the label length
        ]
    ),
)


@st.composite
def embeddings_body(draw) -> bytes:
    kind = draw(st.sampled_from(["request"] * 7 + ["json", "raw", "deep", "number"]))
    if kind == "raw":
        return draw(st.binary(max_size=2000))
    if kind == "deep":  # nesting past Python's recursion limit
        return b"[" * draw(st.integers(1, 60_000))
    if kind == "number":  # past Python's limit of 4,300 digits on int("...")
        digits = b"9" * draw(st.integers(1, 6000))
        return b'{"model": "%s", "input": "x", "dimensions": %s}' % (MODEL.encode(), digits)
    if kind == "json":
        value = draw(JSON)
    else:
        value = {
            "input": draw(mostly(INPUTS | st.lists(INPUTS, max_size=5), JSON)),
            "model": draw(mostly(st.just(MODEL), st.sampled_from(["", "other", MODEL.upper()]) | JSON)),
        }
        optional = {
            "encoding_format": mostly(st.sampled_from(["float", "base64"]), st.just("Float") | JSON),
            "modality": mostly(st.sampled_from(["text", "image", None]), st.just("audio") | JSON),
            "dimensions": mostly(st.integers(0, 64), JSON),
            "user": JSON,
            "extra": JSON,
        }
        for key, values in optional.items():
            if draw(st.integers(0, 3)) == 0:
                value[key] = draw(values)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode(draw(mostly(st.just("utf-8"), st.sampled_from(["utf-16", "latin-1"]))), "replace")


@st.composite
def embeddings_request(draw) -> tuple[str, str, dict, bytes]:
    method = draw(mostly(st.just("POST"), st.sampled_from(["GET", "PUT"])))
    content_type = draw(
        mostly(
            st.just("application/json"),
            st.sampled_from(["application/json; charset=utf-16", "text/plain", ""]) | st.text(max_size=40),
        )
    )
    headers = {"Content-Type": content_type}
    if (encoding := draw(ENCODINGS)) is not None:
        headers["Content-Encoding"] = encoding
    return method, "/v1/embeddings", headers, draw(embeddings_body())


@st.composite
def models_request(draw) -> tuple[str, str, dict, bytes]:
    method = draw(st.sampled_from(["GET"] * 4 + ["POST", "DELETE", "HEAD", "OPTIONS"]))
    path = "/v1/models" + draw(st.sampled_from(["", "", "/", "/" + MODEL, "?limit=1", "?" + "a=b&" * 500]))
    headers = {
        "Accept": draw(st.sampled_from(["application/json", "*/*", "text/html"]) | st.text(max_size=30))
    }
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.text(max_size=30))
    return method, path, headers, draw(st.sampled_from([b""]) | st.binary(max_size=200))


OPENAI_ROUTES = ("/v1/embeddings", "/v1/models")


def safe_headers(headers: dict) -> dict:
    # A header value must be latin-1, without control characters or outer spaces, to go on the wire.
    return {
        k: "".join(c if " " <= c != "\x7f" else "?" for c in v).strip().encode("latin-1", "replace")
        for k, v in headers.items()
    }


def check_answer(method: str, response: httpx.Response) -> None:
    """Never a 5xx; every error in the API's JSON shape, OpenAI's on OpenAI's routes; the model list right."""
    status, route = response.status_code, response.request.url.path
    assert status < 500, (status, response.text)
    if method == "HEAD" or 300 <= status < 400:  # no body; /v1/models/ redirects to /v1/models
        return
    body = response.json()
    if status >= 400 and route in OPENAI_ROUTES:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    elif status >= 400:
        assert set(body) == {"error", "detail"} and isinstance(body["detail"], str), body
    elif route == "/v1/models":
        assert [m["id"] for m in body["data"]] == [MODEL], body


def send(client: httpx.Client, server: LiveServer, request: tuple[str, str, dict, bytes]) -> None:
    method, path, headers, body = request
    response = client.request(method, path, headers=safe_headers(headers), content=body)
    check_answer(method, response)
    event(f"{response.request.url.path} {response.status_code}")  # pytest --hypothesis-show-statistics
    assert server.process.poll() is None, "the server died"


FUZZ = settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@settings(FUZZ, max_examples=300)
@given(multipart_request())
def test_fuzzed_forms_never_get_a_5xx(client, server, request):
    send(client, server, request)


JSON_HEADERS = {"Content-Type": "application/json"}


@settings(FUZZ, max_examples=200)
@given(embeddings_request())
@example(("POST", "/v1/embeddings", JSON_HEADERS, b"[" * 50_000))  # a RecursionError in json.loads
@example(("POST", "/v1/embeddings", JSON_HEADERS, b'{"model": "colors", "input": "x", "dimensions": 1%s}' % (b"0" * 5000)))  # fmt: skip
def test_fuzzed_openai_embeddings_never_get_a_5xx(client, server, request):
    send(client, server, request)


@settings(FUZZ, max_examples=50)
@given(models_request())
@example(("POST", "/v1/models", {}, b""))
def test_fuzzed_model_listings_never_get_a_5xx(client, server, request):
    send(client, server, request)


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
