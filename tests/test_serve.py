"""The HTTP API against a live server on 127.0.0.1: answers, limits, auth, and the micro-batcher."""

from __future__ import annotations

import asyncio
import io
import random

import httpx
import pytest
import torch
from conftest import COLORS, LiveServer, color_jpeg, png_bomb, truncated_jpeg
from PIL import Image

from clip_pipe import ZeroShotClassifier
from clip_pipe.serve import Batcher, Job

TOKEN = "s3cret-token"
LABELS = list(COLORS)
MAX_IMAGE_BYTES = 50_000


@pytest.fixture(scope="module")
def server(color_model):
    limits = ["--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", "1000000", "--max-images", "4"]
    with LiveServer(color_model, *limits, "--max-labels", "100", env={"CLIP_PIPE_TOKEN": TOKEN}) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def clf(color_model):
    return ZeroShotClassifier.from_checkpoint(color_model)


def squares(*names: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    rng = random.Random(9)
    return [("images", (f"{name}.jpg", color_jpeg(name, rng), "image/jpeg")) for name in names]


def fields(labels=LABELS, templates=("a photo of a {c} square",), **extra) -> dict:
    return {"labels": list(labels), "templates": list(templates), **extra}


def assert_error(response: httpx.Response, status: int, code: str, detail: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and detail in body["detail"], body


def test_classify_ranks_labels_for_each_image(client):
    response = client.post("/v1/classify", files=squares("red", "blue", "yellow"), data=fields())
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["red.jpg", "blue.jpg", "yellow.jpg"]
    assert [r["labels"][0]["label"] for r in results] == ["red", "blue", "yellow"]
    for r in results:
        assert len(r["labels"]) == 4 and sum(x["probability"] for x in r["labels"]) == pytest.approx(
            1, abs=1e-5
        )
    top = client.post("/v1/classify", files=squares("green"), data=fields(top_k="2")).json()["results"]
    assert len(top[0]["labels"]) == 2 and top[0]["labels"][0]["label"] == "green"


def test_embed_images_and_texts_match_the_library(client, clf):
    files = squares("red", "green")
    response = client.post("/v1/embed", files=files)
    assert response.status_code == 200, response.text
    assert response.json()["dim"] == clf.embed_dim
    expected = clf.embed_images([data for _, (_, data, _) in files])
    torch.testing.assert_close(torch.tensor(response.json()["embeddings"]), expected, rtol=0, atol=1e-5)
    texts = ["a photo of a red square", "a dog"]
    response = client.post("/v1/embed", data={"texts": texts})
    assert response.status_code == 200, response.text
    torch.testing.assert_close(
        torch.tensor(response.json()["embeddings"]), clf.embed_texts(texts), rtol=0, atol=1e-5
    )
    assert_error(client.post("/v1/embed", files=files, data={"texts": texts}), 422, "images_or_texts")


def test_health_and_openapi_need_no_token(server):
    health = httpx.get(f"{server.url}/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["limits"]["max_image_bytes"] == MAX_IMAGE_BYTES
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["images", "labels"]
    assert "/v1/embed" in spec["paths"]
    assert "swagger" in httpx.get(f"{server.url}/docs").text.lower()


def test_missing_or_wrong_token_is_401(server):
    files, data = squares("red"), fields()
    missing = httpx.post(f"{server.url}/v1/classify", files=files, data=data)
    assert_error(missing, 401, "unauthorized", "missing bearer token")
    assert missing.headers["www-authenticate"] == "Bearer"
    for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN):
        response = httpx.post(
            f"{server.url}/v1/classify", files=files, data=data, headers={"Authorization": header}
        )
        assert_error(response, 401, "unauthorized")


def noise_png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 100).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("filename", "data", "status", "code", "detail"),
    [
        ("cut.jpg", truncated_jpeg(), 422, "bad_image", "cut.jpg: cannot decode image"),
        ("notes.jpg", b"this is text, not an image\n" * 20, 415, "not_an_image", "not a recognised image"),
        ("big.png", noise_png(200), 413, "image_too_large", f"over the limit of {MAX_IMAGE_BYTES} bytes"),
        ("bomb.png", png_bomb(30_000, 30_000), 413, "image_too_large", "decompression bomb"),
        ("tall.png", png_bomb(2000, 1000), 413, "image_too_large", "over the limit of 1000000"),
        ("empty.jpg", b"", 415, "not_an_image", ""),
    ],
    ids=["truncated-jpeg", "text", "over-size-limit", "pixel-bomb", "over-pixel-limit", "empty"],
)
def test_bad_images_are_4xx_with_the_reason(client, filename, data, status, code, detail):
    files = [*squares("red"), ("images", (filename, data, "image/jpeg"))]
    assert_error(client.post("/v1/classify", files=files, data=fields()), status, code, detail)
    assert_error(client.post("/v1/embed", files=files), status, code, detail)


def test_label_and_request_limits_are_422(client):
    one = squares("red")
    assert_error(
        client.post("/v1/classify", files=one, data={"labels": []}), 422, "bad_labels", "at least one"
    )
    many = [f"label {i}" for i in range(10_000)]
    assert_error(
        client.post("/v1/classify", files=one, data={"labels": many}), 422, "bad_form", "at most 100 labels"
    )
    assert_error(
        client.post("/v1/classify", files=one, data={"labels": [f"l{i}" for i in range(101)]}),
        422, "too_many_labels", "101 labels, over the limit of 100",
    )  # fmt: skip
    long = fields(labels=["cat", "x" * 201])
    assert_error(client.post("/v1/classify", files=one, data=long), 422, "labels_too_long", "201 characters")
    dup = fields(labels=["cat", "cat"])
    assert_error(client.post("/v1/classify", files=one, data=dup), 422, "bad_labels", "duplicate")
    no_c = fields(templates=["a photo"])
    assert_error(client.post("/v1/classify", files=one, data=no_c), 422, "bad_labels", "{c}")
    assert_error(client.post("/v1/classify", data=fields()), 422, "no_images")
    assert_error(
        client.post("/v1/classify", files=squares(*LABELS, "red"), data=fields()),
        422, "too_many_images", "5 images, over the limit of 4",
    )  # fmt: skip
    path_not_file = [("images", (None, "red.jpg"))]  # curl -F images=red.jpg, without the @
    assert_error(
        client.post("/v1/classify", files=path_not_file, data=fields()), 422, "bad_images", "file uploads"
    )
    assert_error(
        client.post("/v1/classify", files=one, data=fields(image="x")), 422, "unknown_field", "'image'"
    )
    assert_error(client.post("/v1/classify", files=one, data=fields(top_k="0")), 422, "bad_top_k")
    assert_error(client.post("/v1/classify", json={"labels": LABELS}), 415, "not_a_form")


def test_oversized_request_body_is_413(client):
    part = b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n\r\n'
    body = part + b"x" * (4 * MAX_IMAGE_BYTES + 2**20) + b"\r\n--b--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    assert_error(client.post("/v1/classify", content=body, headers=headers), 413, "request_too_large")

    def chunks():  # no Content-Length: counted as it streams in
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    assert_error(client.post("/v1/classify", content=chunks(), headers=headers), 413, "request_too_large")
    # A form without files carries no images, so it gets 1 MiB, not the images' allowance.
    texts = {"texts": ["x" * 100] * 11_000}
    assert_error(client.post("/v1/embed", data=texts), 413, "request_too_large", "over the limit of 1048576")


def test_batcher_merges_queued_requests_and_answers_each_exactly(clf):
    """12 requests of 1-3 images queued at once, max batch 8: fewer forward passes, same answers."""
    rng = random.Random(3)
    requests = [[color_jpeg(rng.choice(LABELS), rng) for _ in range(1 + i % 3)] for i in range(12)]
    expected = [clf.classify(images, LABELS) for images in requests]

    async def main():
        batcher = Batcher(clf, max_batch=8, max_wait_ms=0)
        jobs = [Job(clf.pixels(images), None, lambda f: clf.rank(f, LABELS)) for images in requests]
        results = asyncio.gather(*(batcher.submit(job) for job in jobs))
        task = asyncio.create_task(batcher.run())
        try:
            return await results, batcher
        finally:
            task.cancel()
            batcher.executor.shutdown()

    results, batcher = asyncio.run(main())
    # Sizes 1,2,3,1,2,3,...: packed in order without splitting a request, 7 + 8 + 6 + 3 images.
    assert batcher.num_items == 24 and batcher.num_batches == 4
    for got, want in zip(results, expected, strict=True):
        assert [[p.label for p in r] for r in got] == [[p.label for p in r] for r in want]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(
                [p.probability for p in g], [p.probability for p in w], rtol=0, atol=1e-5
            )
