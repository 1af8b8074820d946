"""Load test of the HTTP API: micro-batching against one request at a time, interleaved.

    python -m bench.serve_load [--route embeddings|classify] [--input image|text] [--model clip-pipe-tiny-28]
                               [--clients 16] [--requests 500] [--rounds 3]

Each round starts `clip-pipe serve` twice on 127.0.0.1, once with micro-batching (--max-batch 32) and once
one request at a time (--max-batch 1), alternating which goes first. Both serve the same randomly
initialised model (throughput does not depend on the weights). `--clients` concurrent clients each send
`--requests` requests after a warm-up: `embeddings` (the default) is OpenAI's POST /v1/embeddings with one
input, a 96x96 JPEG as a base64 data URL or a short text; `classify` is one image with `--num-labels`
labels. Reported per variant: requests/s over the whole load, p50 and p99 latency, errors (must be 0),
and the mean batch size the server formed; then the ratio batched / one-at-a-time per round, median and
spread.

`--infinity EXE` adds a third variant: infinity (`infinity_emb v2`, torch engine, CPU, --batch-size 32,
offline) serving the same weights, written as a transformers CLIPModel folder by `bench.hf_clip` (which
checks that folder's embeddings equal ours). Before timing, one request to each server must give the same
embedding (to 1e-3: transformers' image processor resizes with PIL, ours with torchvision). infinity needs its own venv (it pins other numpy, transformers and uvicorn versions
than ours), e.g. `python -m venv infinity-venv && infinity-venv/bin/pip install "infinity-emb[all]" aiohttp`,
then `--infinity infinity-venv/bin/infinity_emb`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from bench.common import machine_description
from clip_pipe.config import ModelConfig
from clip_pipe.distributed import free_port
from clip_pipe.model import build_model, save_export

VARIANTS = {"batched": 32, "one-at-a-time": 1}


def test_image(size: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 50).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


MODEL_NAME = "bench"


def request_for(args, image: bytes, labels: list[str]) -> dict:
    """The keyword arguments of one request's `httpx.AsyncClient.post`."""
    if args.route == "classify":
        return {
            "url": "/v1/classify",
            "files": [("images", ("x.jpg", image, "image/jpeg"))],
            "data": {"labels": labels},
        }
    if args.input == "image":  # "modality": infinity reads a data URL as text without it; ours either way
        item = "data:image/jpeg;base64," + base64.b64encode(image).decode()
        body = {"model": MODEL_NAME, "input": [item], "modality": "image"}
    else:
        body = {"model": MODEL_NAME, "input": ["a photo of a small grey square on a white table"]}
    return {"url": "/v1/embeddings", "json": body}


def wait_until_up(process: subprocess.Popen, url: str, path: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s  # generous: other jobs may share the machine
    while True:
        assert process.poll() is None, "server exited"
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server not up in {timeout_s} s"
        time.sleep(0.2)


def start_ours(checkpoint: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "clip_pipe.cli", "serve", "--checkpoint", str(checkpoint)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--max-batch", str(max_batch), "--served-model-name", MODEL_NAME],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(process, url, "/healthz")
    return process, url


def start_infinity(executable: str, hf_dir: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    """infinity_emb v2 serving `hf_dir` (the same weights as transformers CLIPModel), offline, on the CPU."""
    port = free_port()
    command = [
        executable, "v2", "--model-id", str(hf_dir), "--served-model-name", MODEL_NAME, "--host", "127.0.0.1",
        "--port", str(port), "--engine", "torch", "--device", "cpu", "--batch-size", str(max_batch),
        "--url-prefix", "/v1", "--no-bettertransformer", "--no-model-warmup",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(process, url, "/health")
    return process, url


async def load(url: str, num_clients: int, num_requests: int, request: dict) -> dict:
    latencies, errors = [], []

    async def client(http: httpx.AsyncClient):
        for _ in range(num_requests):
            start = time.perf_counter()
            try:
                response = await http.post(**request)
                if response.status_code != 200:
                    errors.append(response.status_code)
                    continue
            except httpx.HTTPError as e:
                errors.append(type(e).__name__)
                continue
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=num_clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(num_clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "throughput": len(latencies) / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0,
        "num_errors": len(errors),
        "num_ok": len(latencies),
        "wall_s": wall,
    }


def run_variant(server: tuple[subprocess.Popen, str], args, request: dict, healthz: bool) -> dict:
    process, url = server
    try:
        asyncio.run(load(url, args.clients, args.warmup, request))
        before = httpx.get(f"{url}/healthz").json() if healthz else None
        result = asyncio.run(load(url, args.clients, args.requests, request))
        result["mean_batch"] = float("nan")  # infinity does not report it
        if healthz:
            after = httpx.get(f"{url}/healthz").json()
            num_batches = after["num_batches"] - before["num_batches"]
            result["mean_batch"] = (after["num_items"] - before["num_items"]) / max(1, num_batches)
        return result
    finally:
        process.terminate()
        process.wait(timeout=60)


def same_embeddings(
    ours: tuple[subprocess.Popen, str], theirs: tuple[subprocess.Popen, str], request
) -> float:
    """Max difference between the two servers' answers to `request`: they must serve the same model."""
    vectors = []
    for process, url in (ours, theirs):
        try:
            response = httpx.post(f"{url}{request['url']}", json=request["json"], timeout=120)
            response.raise_for_status()
            vectors.append(torch.tensor(response.json()["data"][0]["embedding"]))
        finally:
            process.terminate()
            process.wait(timeout=60)
    return float((vectors[0] - vectors[1]).abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--route", choices=["embeddings", "classify"], default="embeddings")
    parser.add_argument("--input", choices=["image", "text"], default="image", help="for --route embeddings")
    parser.add_argument("--model", default="clip-pipe-tiny-28")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=500, help="per client")
    parser.add_argument("--warmup", type=int, default=10, help="requests per client before timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-labels", type=int, default=10)
    parser.add_argument(
        "--infinity",
        metavar="EXE",
        help="also serve the same weights with infinity (path to its infinity_emb, e.g. from a separate venv)",
    )
    args = parser.parse_args()
    if args.infinity and args.route != "embeddings":
        parser.error("--infinity compares POST /v1/embeddings only")

    labels = [f"label number {i}" for i in range(args.num_labels)]
    request = request_for(args, test_image(), labels)
    variants = {**VARIANTS, "infinity": 32} if args.infinity else VARIANTS
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        encoder = build_model(ModelConfig(name=args.model))
        checkpoint = save_export(encoder.model, encoder.model_cfg, Path(tmp))

        def start(name: str):
            if name == "infinity":
                return start_infinity(args.infinity, Path(tmp) / "hf", variants[name])
            return start_ours(checkpoint, variants[name])

        if args.infinity:
            from bench.hf_clip import convert

            convert(checkpoint, Path(tmp) / "hf")  # fails unless its embeddings equal ours
            difference = same_embeddings(start("batched"), start("infinity"), request)
            print(f"same request, both servers: embeddings differ by at most {difference:.1e}", flush=True)
            # Images: transformers' processor resizes with PIL, ours with torchvision (see bench.hf_clip).
            assert difference < 1e-3, "infinity does not serve the same model"
        for round_index in range(args.rounds):
            order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
            for name in order:
                r = run_variant(start(name), args, request, healthz=name != "infinity")
                results[name].append(r)
                print(
                    f"round {round_index} {name:14s} {r['throughput']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                    f"p99 {r['p99_ms']:6.1f} ms  errors {r['num_errors']}  mean batch {r['mean_batch']:.1f}",
                    flush=True,
                )

    def ratios(a: str, b: str) -> list[float]:
        return [x["throughput"] / y["throughput"] for x, y in zip(results[a], results[b], strict=True)]

    print()
    print(f"machine: {machine_description()}; torch {torch.__version__}; model {args.model}")
    what = (
        f"POST /v1/classify, 1 image of 96x96 JPEG, {args.num_labels} labels"
        if args.route == "classify"
        else f"POST /v1/embeddings, 1 {'96x96 JPEG as a data URL' if args.input == 'image' else 'text'}"
    )
    print(
        f"load: {args.clients} clients x {args.requests} requests ({what}), {args.rounds} rounds, interleaved"
    )
    print("| server | requests/s | p50 ms | p99 ms | errors | mean batch |")
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        print(
            f"| {name} ({'--batch-size' if name == 'infinity' else '--max-batch'} {variants[name]}) | {statistics.median(r['throughput'] for r in rs):.1f} | "
            f"{statistics.median(r['p50_ms'] for r in rs):.1f} | {statistics.median(r['p99_ms'] for r in rs):.1f} | "
            f"{sum(r['num_errors'] for r in rs)} | {statistics.median(r['mean_batch'] for r in rs):.1f} |"
        )
    pairs = [("batched", "one-at-a-time", "batching speed-up")]
    if args.infinity:
        pairs.append(("batched", "infinity", "clip-pipe vs infinity"))
    for a, b, title in pairs:
        r = ratios(a, b)
        print(
            f"{title} (requests/s, {a} / {b}): median {statistics.median(r):.2f}x, "
            f"spread {min(r):.2f}x - {max(r):.2f}x over {len(r)} rounds"
        )
    return 1 if any(r["num_errors"] for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
