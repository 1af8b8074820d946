"""OpenAI-compatible embeddings, /v1/models, Prometheus /metrics, back-pressure and graceful shutdown,
against a live `clip-pipe serve` on 127.0.0.1, with the official `openai` client and prometheus_client's
own text parser."""

from __future__ import annotations

import asyncio
import base64
import random
import signal
import struct
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import LiveServer, color_jpeg, truncated_jpeg
from prometheus_client.parser import text_string_to_metric_families

from clip_pipe import ZeroShotClassifier

TOKEN = "openai-test-token"
MODEL = "colors"
MAX_IMAGE_BYTES = 50_000


@pytest.fixture(scope="module")
def server(color_model):
    limits = ["--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-images", "4", "--max-texts", "8"]
    with LiveServer(
        color_model, *limits, "--served-model-name", MODEL, env={"CLIP_PIPE_TOKEN": TOKEN}
    ) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def clf(color_model):
    return ZeroShotClassifier.from_checkpoint(color_model)


def data_url(data: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def squares(*names: str) -> list[bytes]:
    rng = random.Random(5)
    return [color_jpeg(name, rng) for name in names]


def as_tensor(response) -> torch.Tensor:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return torch.stack([vector(d.embedding) for d in response.data])


def vector(embedding: list[float] | str) -> torch.Tensor:
    """A float list, or (asked for explicitly) base64 of little-endian float32, as OpenAI sends it."""
    if isinstance(embedding, str):
        return torch.frombuffer(bytearray(base64.b64decode(embedding)), dtype=torch.float32)
    return torch.tensor(embedding)


def test_openai_client_gets_the_librarys_embeddings(client, clf):
    texts = ["a photo of a red square", "a dog", "a photo of a blue square"]
    expected = clf.embed_texts(texts)
    for encoding in ("float", "base64", openai.omit):  # the client asks for base64 unless told
        response = client.embeddings.create(model=MODEL, input=texts, encoding_format=encoding)
        assert response.model == MODEL and response.object == "list"
        torch.testing.assert_close(as_tensor(response), expected, rtol=0, atol=1e-5)
    assert response.usage.prompt_tokens == int((clf.tokenizer(texts) != 0).sum()) > 0
    one = client.embeddings.create(model=MODEL, input="a dog")  # a single string
    torch.testing.assert_close(as_tensor(one), clf.embed_texts(["a dog"]), rtol=0, atol=1e-5)

    images = squares("red", "green")
    expected = clf.embed_images(images)
    response = client.embeddings.create(model=MODEL, input=[data_url(x) for x in images])
    torch.testing.assert_close(as_tensor(response), expected, rtol=0, atol=1e-5)
    # infinity's way: every input is an image
    response = client.embeddings.create(
        model=MODEL, input=[data_url(x) for x in images], extra_body={"modality": "image"}
    )
    torch.testing.assert_close(as_tensor(response), expected, rtol=0, atol=1e-5)
    # Texts and images mixed keep their order
    response = client.embeddings.create(model=MODEL, input=["a dog", data_url(images[1]), "a cat"])
    mixed = as_tensor(response)
    torch.testing.assert_close(mixed[[0, 2]], clf.embed_texts(["a dog", "a cat"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], expected[1], rtol=0, atol=1e-5)


def test_base64_encoding_is_little_endian_float32(http, clf):
    body = {"model": MODEL, "input": ["a dog"], "encoding_format": "base64"}
    encoded = http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    assert len(raw) == 4 * clf.embed_dim
    little_endian = [struct.unpack("<f", raw[i : i + 4])[0] for i in range(0, len(raw), 4)]
    torch.testing.assert_close(torch.tensor(little_endian), clf.embed_texts(["a dog"])[0], rtol=0, atol=1e-6)


def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].object == "model"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_openai_client_sees_4xx_errors(client):
    with pytest.raises(openai.NotFoundError, match="'text-embedding-3-small' is not served here"):
        client.embeddings.create(model="text-embedding-3-small", input="a dog")
    with pytest.raises(openai.APIStatusError, match=r"415 - input\[0\]: not a recognised image file"):
        client.embeddings.create(model=MODEL, input=[data_url(b"not an image at all")])


def openai_error(response: httpx.Response) -> str:
    """The code of an error in OpenAI's shape, which OpenAI's clients read."""
    error = response.json()["error"]
    assert error["message"] and error["type"], error
    return error["code"]


def test_malformed_embeddings_requests_are_4xx_json(http):
    image = data_url(squares("red")[0])
    cases = [
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422, "bad_json"),
        ({"content": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}, 422, "bad_json"),
        ({"content": b"[" * 50_000, "headers": {"Content-Type": "application/json"}}, 422, "bad_json"),  # too deep
        ({"content": b'{"model": "x", "dimensions": 1%s}' % (b"0" * 5000), "headers": {"Content-Type": "application/json"}}, 422, "bad_json"),  # over Python's 4,300 digits
        ({"content": b"input=x", "headers": {"Content-Type": "text/plain"}}, 415, "not_json"),
        ({"json": ["a", "b"]}, 422, "bad_request"),
        ({"content": b"null", "headers": {"Content-Type": "application/json"}}, 422, "bad_request"),
        ({"json": {"model": MODEL}}, 422, "bad_request"),
        ({"json": {"input": "a dog"}}, 422, "bad_request"),
        ({"json": {"model": MODEL, "input": [[1, 2, 3]]}}, 422, "bad_request"),  # token ids
        ({"json": {"model": MODEL, "input": [1, 2]}}, 422, "bad_request"),
        ({"json": {"model": MODEL, "input": "x", "encoding_format": "int8"}}, 422, "bad_request"),
        ({"json": {"model": MODEL, "input": "x", "modality": "audio"}}, 422, "bad_request"),
        ({"json": {"model": MODEL, "input": "x", "temperature": 1}}, 422, "bad_request"),
        ({"json": {"model": 3, "input": "x"}}, 422, "bad_request"),
        ({"json": {"model": "other", "input": "x"}}, 404, "model_not_found"),
        ({"json": {"model": MODEL, "input": []}}, 422, "empty_input"),
        ({"json": {"model": MODEL, "input": "x", "dimensions": 3}}, 422, "bad_dimensions"),
        ({"json": {"model": MODEL, "input": ["t"] * 9}}, 422, "too_many_texts"),
        ({"json": {"model": MODEL, "input": [image] * 5}}, 422, "too_many_images"),
        ({"json": {"model": MODEL, "input": "x" * 201}}, 422, "texts_too_long"),
        ({"json": {"model": MODEL, "input": "https://example.com/a.jpg", "modality": "image"}}, 422, "urls_not_fetched"),
        ({"json": {"model": MODEL, "input": "a dog", "modality": "image"}}, 422, "bad_data_url"),
        ({"json": {"model": MODEL, "input": "data:text/plain,hello"}}, 422, "bad_data_url"),
        ({"json": {"model": MODEL, "input": "data:image/png;base64,@@@@"}}, 422, "bad_base64"),
        ({"json": {"model": MODEL, "input": data_url(b"text, not pixels")}}, 415, "not_an_image"),
        ({"json": {"model": MODEL, "input": data_url(truncated_jpeg())}}, 422, "bad_image"),
        ({"json": {"model": MODEL, "input": data_url(b"x" * (MAX_IMAGE_BYTES + 1))}}, 413, "image_too_large"),
        ({"json": {"model": MODEL, "input": "data:image/png;base64," + "A" * 80_000}}, 413, "image_too_large"),
    ]  # fmt: skip
    for kwargs, status, code in cases:
        response = http.post("/v1/embeddings", **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert openai_error(response) == code, (kwargs, response.text)
    # A method the route does not take: OpenAI's shape too, and the methods it does take.
    wrong = http.get("/v1/embeddings")
    assert wrong.status_code == 405 and openai_error(wrong) == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"
    # The body limit is per route: JSON with 4 images of 50 kB fits, 5 MB does not.
    ok = http.post("/v1/embeddings", json={"model": MODEL, "input": [image] * 4})
    assert ok.status_code == 200, ok.text
    huge = http.post("/v1/embeddings", json={"model": MODEL, "input": ["x" * 1_000_000] * 5})
    assert huge.status_code == 413 and openai_error(huge) == "request_too_large"


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics, parsed by prometheus_client: {(name, sorted labels): value}."""
    text = httpx.get(f"{server.url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_metrics_count_requests_batches_and_images(server, http):
    before = scrape(server)
    for _ in range(3):
        assert http.post("/v1/embeddings", json={"model": MODEL, "input": "a dog"}).status_code == 200
    images = [data_url(x) for x in squares("red", "blue")]
    assert http.post("/v1/embeddings", json={"model": MODEL, "input": images}).status_code == 200
    bad = {"model": MODEL, "input": [images[0], data_url(b"not an image")]}
    assert http.post("/v1/embeddings", json=bad).status_code == 415
    assert httpx.post(f"{server.url}/v1/embeddings", json={}).status_code == 401  # refused by the guard
    assert http.get("/no/such/path").status_code == 404
    after = scrape(server)

    route = "/v1/embeddings"
    assert delta(before, after, "clip_pipe_requests_total", route=route, status="200") == 4
    assert delta(before, after, "clip_pipe_requests_total", route=route, status="415") == 1
    assert delta(before, after, "clip_pipe_requests_total", route=route, status="401") == 1
    assert delta(before, after, "clip_pipe_requests_total", route="other", status="404") == 1
    assert delta(before, after, "clip_pipe_request_seconds_count", route=route, status="200") == 4
    assert delta(before, after, "clip_pipe_request_seconds_bucket", route=route, status="200", le="+Inf") == 4
    assert delta(before, after, "clip_pipe_batch_size_count") == 4  # one request at a time
    assert delta(before, after, "clip_pipe_batch_size_sum") == 3 + 2
    assert delta(before, after, "clip_pipe_images_decoded_total") == 3  # 2, then 1 before the bad one
    assert delta(before, after, "clip_pipe_images_rejected_total", reason="not_an_image") == 1
    assert after[("clip_pipe_queue_depth", ())] == 0


def test_each_app_has_its_own_registry(clf):
    from clip_pipe.serve import create_app

    first, second = create_app(clf), create_app(clf)  # a shared default registry would raise here
    assert first.state.served.metrics.registry is not second.state.served.metrics.registry


def test_a_flood_gets_429_with_retry_after_and_decodes_nothing_it_refuses(color_model):
    """A bounded client floods a server whose queue holds 8 items: the overflow is refused at once."""
    # A batch waits 300 ms to fill, so requests pile up in the queue while the flood arrives.
    args = ["--max-queue", "8", "--max-batch", "64", "--max-wait-ms", "300", "--served-model-name", MODEL]
    image = data_url(squares("yellow")[0])
    body = {"model": MODEL, "input": [image] * 4}
    num_requests, num_clients = 48, 16

    async def flood(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=num_clients)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
            return await asyncio.gather(
                *(http.post("/v1/embeddings", json=body) for _ in range(num_requests))
            )

    with LiveServer(color_model, *args) as server:
        before = scrape(server)
        responses = asyncio.run(flood(server.url))
        after = scrape(server)
        assert httpx.get(f"{server.url}/healthz").json()["num_queued"] == 0
    statuses = [r.status_code for r in responses]
    num_ok, num_refused = statuses.count(200), statuses.count(429)
    assert num_ok + num_refused == num_requests, statuses
    assert num_ok >= 2 and num_refused >= num_requests // 2, statuses
    for r in responses:
        if r.status_code == 429:
            assert openai_error(r) == "overloaded" and int(r.headers["retry-after"]) >= 1
    # Refused requests decoded no image: only the accepted ones' images were decoded.
    assert delta(before, after, "clip_pipe_images_decoded_total") == 4 * num_ok
    assert (
        delta(before, after, "clip_pipe_requests_total", route="/v1/embeddings", status="429") == num_refused
    )
    assert delta(before, after, "clip_pipe_batch_size_sum") == 4 * num_ok


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(color_model, clf):
    # A batch waits up to 3 s to fill: the first request is still in flight when SIGTERM arrives.
    args = ["--max-batch", "64", "--max-wait-ms", "3000", "--served-model-name", MODEL]
    with LiveServer(color_model, *args) as server:
        result = {}

        def in_flight():
            body = {"model": MODEL, "input": ["a photo of a green square"]}
            result["response"] = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60)

        thread = threading.Thread(target=in_flight)
        thread.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/healthz").json()["num_queued"] == 0:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # uvicorn notices the signal within 0.1 s and stops listening
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "late"}, timeout=5)
        assert server.process.poll() is None, "the server must still be finishing the request in flight"
        thread.join(timeout=30)
        response = result["response"]
        assert response.status_code == 200, response.text
        vector = torch.tensor(response.json()["data"][0]["embedding"])
        torch.testing.assert_close(
            vector, clf.embed_texts(["a photo of a green square"])[0], rtol=0, atol=1e-5
        )
        # It exits by itself (uvicorn re-raises the SIGTERM it caught once it is done).
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.process.stdout.read()


def test_openapi_documents_the_json_body(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["required"]) == {"input", "model"}
    assert set(body["properties"]) == {"input", "model", "encoding_format", "modality", "dimensions", "user"}
    assert all(field["description"] for field in body["properties"].values())  # each field documented
    assert body["additionalProperties"] is False  # as the route refuses unknown fields
    assert {path: list(methods) for path, methods in spec["paths"].items()} == {
        "/v1/classify": ["post"], "/v1/embed": ["post"], "/v1/embeddings": ["post"], "/v1/models": ["get"],
        "/healthz": ["get"],
    }  # fmt: skip
    # The answers' shapes too, as OpenAI's clients and the docs page read them.
    for path, method, schema in [
        ("/v1/embeddings", "post", "EmbeddingsResponse"),
        ("/v1/models", "get", "ModelList"),
    ]:
        answer = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert answer == {"$ref": f"#/components/schemas/{schema}"}, path
