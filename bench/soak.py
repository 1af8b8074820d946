"""Soak of the HTTP zero-shot API: many concurrent clients, valid and hostile requests mixed, for a while.

    python -m bench.soak [--clients 64] [--seconds 60] [--warmup 5] [--invalid-frac 0.4] [--slowloris 32] [--out FILE]

Starts `clip-pipe serve` on 127.0.0.1 with a model taught coloured squares in-process (a second; the
`train_color_export` the tests use), so every valid answer can be checked: a valid request is one image
of a known colour, and it must come back 200 with that colour ranked first. Invalid requests (truncated
or bomb images, bad forms, wrong content types, oversize bodies, random bytes) must come back 4xx, never
5xx. `--slowloris` extra connections trickle their requests a byte every second the whole time.
Reported: requests served per kind, errors on valid requests (must be 0), any 5xx (must be 0), latency
of valid requests, and the server's resident memory at the start (after warm-up) and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import machine_description
from clip_pipe.distributed import free_port
from tests.conftest import COLORS, color_jpeg, png_bomb, train_color_export, truncated_jpeg

LABELS = list(COLORS)
MAX_IMAGE_BYTES = 50_000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(checkpoint: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "clip_pipe.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
         "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-images", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, "server exited"
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server not up in 120 s"
        time.sleep(0.2)


def invalid_request(rng: random.Random) -> dict:
    """httpx.post keyword arguments for one request the server must refuse with a 4xx."""
    image = ("images", ("x.jpg", color_jpeg("red", rng), "image/jpeg"))
    return rng.choice([
        {"files": [("images", ("t.jpg", truncated_jpeg(), "image/jpeg"))], "data": {"labels": LABELS}},
        {"files": [("images", ("b.png", png_bomb(30000, 30000), "image/png"))], "data": {"labels": LABELS}},
        {"files": [image], "data": {}},  # no labels
        {"files": [image], "data": {"labels": ["red", "red"]}},  # duplicate labels
        {"files": [image] * 5, "data": {"labels": LABELS}},  # over --max-images
        {"files": [("images", ("big.jpg", bytes(MAX_IMAGE_BYTES + 1), "image/jpeg"))], "data": {"labels": LABELS}},
        {"content": rng.randbytes(rng.randrange(1, 4000)), "headers": {"Content-Type": "multipart/form-data; boundary=z"}},
        {"content": b'{"labels": ["red"]}', "headers": {"Content-Type": "application/json"}},
        {"files": [image], "data": {"labels": LABELS, "top_k": "-3"}},
    ])  # fmt: skip


async def client_loop(client: httpx.AsyncClient, seed: int, stop_at: float, invalid_frac: float, stats: dict):
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        if rng.random() < invalid_frac:
            response = await client.post("/v1/classify", **invalid_request(rng))
            kind = "invalid"
            ok = 400 <= response.status_code < 500
        else:
            color = rng.choice(LABELS)
            files = [("images", (f"{color}.jpg", color_jpeg(color, rng), "image/jpeg"))]
            start = time.monotonic()
            response = await client.post("/v1/classify", files=files, data={"labels": LABELS})
            stats["latency"].append(time.monotonic() - start)
            kind = "valid"
            ok = response.status_code == 200 and response.json()["results"][0]["labels"][0]["label"] == color
        stats[kind] += 1
        stats[f"{kind}_errors"] += not ok
        stats["5xx"] += response.status_code >= 500


async def slowloris(url: str, stop_at: float, num: int) -> int:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for i in range(num):
        sock = socket.create_connection((host, int(port)))
        sock.setblocking(False)
        sock.send(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                  b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n")  # fmt: skip
        socks.append(sock)
    num_bytes = 0
    while time.monotonic() < stop_at:
        for sock in socks:
            # The server may close a connection that idles too long: that is its right.
            with contextlib.suppress(OSError):
                num_bytes += sock.send(b"X")
        await asyncio.sleep(1)
    for sock in socks:
        sock.close()
    return num_bytes


async def soak(url: str, pid: int, args) -> dict:
    stats = {"valid": 0, "invalid": 0, "valid_errors": 0, "invalid_errors": 0, "5xx": 0, "latency": []}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await client_loop(
            client, -1, time.monotonic() + args.warmup, args.invalid_frac, dict(stats, latency=[])
        )  # warm-up
        rss = [rss_mib(pid)]
        stop_at = time.monotonic() + args.seconds

        async def sample_rss():
            while time.monotonic() < stop_at:
                await asyncio.sleep(min(5, max(0, stop_at - time.monotonic())))  # no later than the stop
                rss.append(rss_mib(pid))

        start = time.monotonic()
        await asyncio.gather(
            *(client_loop(client, seed, stop_at, args.invalid_frac, stats) for seed in range(args.clients)),
            slowloris(url, stop_at, args.slowloris), sample_rss(),
        )  # fmt: skip
        elapsed = time.monotonic() - start
    rss.append(rss_mib(pid))
    latency = sorted(stats.pop("latency"))
    return {
        **stats, "seconds": round(elapsed, 1), "requests_per_s": round((stats["valid"] + stats["invalid"]) / elapsed, 1),
        "valid_p50_ms": round(1000 * statistics.median(latency), 1),
        "valid_p99_ms": round(1000 * latency[int(0.99 * (len(latency) - 1))], 1),
        "rss_start_mib": round(rss[0], 1), "rss_end_mib": round(rss[-1], 1), "rss_max_mib": round(max(rss), 1),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=5, help="seconds of one client before the soak")
    parser.add_argument("--invalid-frac", type=float, default=0.4)
    parser.add_argument("--slowloris", type=int, default=32)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = train_color_export(Path(folder))
        process, url = start_server(checkpoint)
        try:
            result = asyncio.run(soak(url, process.pid, args))
            result["server_alive"] = process.poll() is None
        finally:
            process.terminate()
            process.wait(timeout=30)
    result.update(clients=args.clients, slowloris=args.slowloris, machine=machine_description())
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    failed = result["valid_errors"] or result["invalid_errors"] or result["5xx"] or not result["server_alive"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
