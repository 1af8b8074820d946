"""Data prep throughput against img2dataset, and peak memory against input size.

    python -m bench.prep --rounds 3                  # images/s, ours vs img2dataset, same 10k URLs
    python -m bench.prep --memory 250000 1000000 4000000   # peak RSS vs rows in the caption table
    python -m bench.prep --smoke                     # both, on tiny inputs, in seconds: does it still run?

Throughput: 10k JPEGs of varied sizes (Tux Paint photos, re-cropped and rescaled; synthetic pictures
if the package is absent) are served on 127.0.0.1 by nginx, one worker process (`apt-get install
nginx-light`; without it by `python -m http.server`, which is single-threaded and then limits both
tools). Both tools download the same URL list with the same processes and threads, resize the shorter
side to 224 keeping the aspect ratio, and write JPEG quality 95 into 1000-row WebDataset shards. Runs
alternate A B A B; each figure is the wall clock of the whole command (start-up included), as images
written per second.

img2dataset is found on PATH or at $IMG2DATASET. It pins webdataset<0.3, so give it its own venv:
`python -m venv img2dataset-venv && img2dataset-venv/bin/pip install img2dataset`, then
`IMG2DATASET=img2dataset-venv/bin/img2dataset`. Under `--smoke` without it, only our side runs (it says so).

Memory: caption tables of N rows (paths + captions) go through the whole pipeline (streamed table
reading, shard tasks, worker processes, per-shard stats, finalize with rejected.csv), with every row
rejected by the caption-length filter, so no image is decoded: it measures what grows with the number
of rows, not image work. Peak RSS is the sum over the process tree, sampled every 50 ms.
"""

import argparse
import contextlib
import csv
import io
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

import psutil
from PIL import Image, ImageDraw

from bench.common import machine_description
from clip_pipe.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
IMG2DATASET_INSTALL = (
    "python -m venv img2dataset-venv && img2dataset-venv/bin/pip install img2dataset, "
    "then IMG2DATASET=img2dataset-venv/bin/img2dataset"
)
TUXPAINT = Path("/usr/share/tuxpaint/stamps")


def make_image(args: tuple[int, list[str], str]) -> None:
    """Image `i`: a random crop of a Tux Paint photo on a coloured background, 256-1200 px."""
    i, sources, folder = args
    rng = random.Random(i)
    short = rng.randint(256, 900)
    size = (round(short * rng.uniform(1.0, 1.6)), short)
    if rng.random() < 0.4:
        size = size[::-1]
    background = tuple(rng.randint(0, 255) for _ in range(3))
    canvas = Image.new("RGB", size, background)
    if sources:
        stamp = Image.open(rng.choice(sources)).convert("RGBA")
        scale = min(size[0] / stamp.width, size[1] / stamp.height) * rng.uniform(0.6, 1.0)
        stamp = stamp.resize((max(1, int(stamp.width * scale)), max(1, int(stamp.height * scale))))
        canvas.paste(
            stamp, (rng.randint(0, size[0] - stamp.width), rng.randint(0, size[1] - stamp.height)), stamp
        )
    else:
        draw = ImageDraw.Draw(canvas)
        for _ in range(30):
            box = (
                sorted(rng.randrange(size[0]) for _ in range(2)),
                sorted(rng.randrange(size[1]) for _ in range(2)),
            )
            fill = tuple(rng.randint(0, 255) for _ in range(3))
            draw.ellipse([box[0][0], box[1][0], box[0][1], box[1][1]], fill=fill)
    canvas.save(Path(folder) / f"{i:05d}.jpg", quality=rng.randint(85, 95))


def make_images(folder: Path, num_images: int) -> None:
    if len(list(folder.glob("*.jpg"))) == num_images:
        return
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p) for p in TUXPAINT.rglob("*.png")) if TUXPAINT.is_dir() else []
    with Pool(os.cpu_count()) as pool:
        pool.map(make_image, [(i, sources, str(folder)) for i in range(num_images)], chunksize=50)


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict | None = None) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS of the process tree in bytes, stdout, CPU seconds of the tree). The CPU
    time counts every process of the command that its parent waited for (pool workers are)."""
    cpu_before = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    handle, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(handle))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{command[:3]} failed:\n{stderr[-3000:]}")
    return wall, peak, stdout, children_cpu() - cpu_before


def count_samples(folder: Path) -> int:
    num = 0
    for path in folder.glob("*.tar"):
        with tarfile.open(path) as tar:
            num += sum(m.name.endswith(".jpg") for m in tar)
    return num


NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ image/jpeg jpg; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


@contextlib.contextmanager
def static_server(root: Path, work: Path) -> Iterator[tuple[int, str]]:
    """Serve `root` on 127.0.0.1 with nginx (one worker process, compiled, so the server is not what
    limits either tool), or `python -m http.server` if nginx is not installed. Yields (port, name)."""
    port = free_port()
    nginx = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")  # not on users' PATH
    with tempfile.TemporaryDirectory(dir=work, prefix="server-") as tmp:
        if nginx:
            conf = Path(tmp) / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, root=root.resolve()))
            version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
            command, name = [nginx, "-e", f"{tmp}/error.log", "-c", str(conf)], version.split()[-1]
        else:
            print("nginx not found (apt-get install nginx-light): serving with python -m http.server, which is "
                  "single-threaded and limits both tools", flush=True)  # fmt: skip
            command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(root)]  # fmt: skip
            name = "python -m http.server"
        log = Path(tmp) / "server.log"  # a file, not a pipe: http.server logs every request to stderr
        with open(log, "wb") as f:
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=f)
        try:
            wait_for_port(port, server, log)
            yield port, name
        finally:
            server.terminate()  # nginx: fast shutdown of the master and its worker
            server.wait()


def wait_for_port(port: int, server: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the HTTP server exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the HTTP server did not listen on port {port} within {timeout} s")


def find_img2dataset() -> str | None:
    """$IMG2DATASET if set (it must exist), else img2dataset on PATH, else None."""
    path = os.environ.get("IMG2DATASET")
    if path:
        if not shutil.which(path):
            raise SystemExit(f"IMG2DATASET={path}: no such executable (install: {IMG2DATASET_INSTALL})")
        return path
    return shutil.which("img2dataset")


def img2dataset_version(executable: str) -> str:
    python = Path(executable).with_name("python")  # its venv's own interpreter knows its version
    if not python.exists():
        return "(version unknown)"
    code = "import importlib.metadata as m; print(m.version('img2dataset'))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


def throughput(args) -> None:
    img2dataset = find_img2dataset()
    if img2dataset is None:
        if not args.smoke:
            raise SystemExit(
                f"img2dataset not found on PATH or at $IMG2DATASET; install: {IMG2DATASET_INSTALL}"
            )
        print(f"img2dataset not found on PATH or at $IMG2DATASET, so its side is skipped; install: "
              f"{IMG2DATASET_INSTALL}", flush=True)  # fmt: skip
    tools = ("clip-pipe", "img2dataset") if img2dataset else ("clip-pipe",)
    work = Path(args.work)
    images = work / "images"
    make_images(images, args.num_images)
    with static_server(images, work) as (port, server_name):
        urls = work / "urls.csv"
        with open(urls, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            for i in range(args.num_images):
                writer.writerow([f"http://127.0.0.1:{port}/{i:05d}.jpg", f"picture number {i}"])
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        ours = [
            sys.executable, str(REPO / "data_prep" / "make_shards.py"), "--captions", str(urls), "--url-col", "url",
            "--workers", str(args.processes), "--threads", str(args.threads), "--image-size", "224",
            "--jpeg-quality", "95", "--shard-size", "1000", "--retries", "0", "--timeout", "10",
        ]  # fmt: skip
        theirs = [
            str(img2dataset), "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
            "--caption_col", "caption", "--output_format", "webdataset", "--processes_count", str(args.processes),
            "--thread_count", str(args.threads), "--image_size", "224", "--resize_mode", "keep_ratio",
            "--resize_only_if_bigger", "False", "--encode_quality", "95", "--encode_format", "jpg",
            "--number_sample_per_shard", "1000", "--timeout", "10", "--retries", "0", "--extract_exif", "False",
            "--enable_wandb", "False", "--distributor", "multiprocessing",
        ]  # fmt: skip
        results = {name: [] for name in tools}
        for round_ in range(args.rounds):
            for name in tools if round_ % 2 == 0 else tools[::-1]:
                out = Path(tempfile.mkdtemp(dir=work, prefix=f"{name}-"))
                command = (
                    [*ours, "--out", str(out)]
                    if name == "clip-pipe"
                    else [*theirs, "--output_folder", str(out)]
                )
                wall, peak, _, cpu = timed(command, env)
                num = count_samples(out)
                results[name].append((num / wall, wall, peak, num, cpu))
                print(f"round {round_} {name}: {num} images in {wall:.1f} s = {num / wall:.0f} img/s, "
                      f"{cpu:.1f} CPU s, peak RSS {peak / 2**20:.0f} MiB", flush=True)  # fmt: skip
                subprocess.run(["rm", "-rf", str(out)], check=True)
    reference = f"img2dataset {img2dataset_version(img2dataset)}" if img2dataset else "no img2dataset"
    print(f"\n{machine_description()}; {args.num_images} images served by {server_name}; {args.processes} "
          f"processes x {args.threads} threads; {reference}")  # fmt: skip
    print(
        "| tool | images/s (median) | wall s (median) | CPU s (median) | peak RSS (median) | images written |"
    )
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r[0] for r in rows):.0f} | {statistics.median(r[1] for r in rows):.1f} "
              f"| {statistics.median(r[4] for r in rows):.1f} | {statistics.median(r[2] for r in rows) / 2**20:.0f} MiB "
              f"| {rows[0][3]} |")  # fmt: skip
    if img2dataset:
        ratios = [a[0] / b[0] for a, b in zip(results["clip-pipe"], results["img2dataset"], strict=True)]
        cpu_ratios = [b[4] / a[4] for a, b in zip(results["clip-pipe"], results["img2dataset"], strict=True)]
        print(f"| ratio (ours / img2dataset) | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} pairs | | "
              f"{statistics.median(cpu_ratios):.2f}x less ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}) | | |")  # fmt: skip


def memory(args) -> None:
    work = Path(args.work)
    images = work / "mem_images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (i * 30, 100, 200)).save(buffer, "JPEG")
        (images / f"{i}.jpg").write_bytes(buffer.getvalue())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    table = []
    for num_rows in args.memory:
        path = work / f"captions_{num_rows}.csv"
        if not path.exists():
            with open(path, "w") as f:
                f.write("image,caption\n")
                f.writelines(f"{i % 8}.jpg,a short caption for row {i}\n" for i in range(num_rows))
        out = Path(tempfile.mkdtemp(dir=work, prefix="mem-"))
        command = [
            sys.executable, str(REPO / "data_prep" / "make_shards.py"), "--captions", str(path), "--images",
            str(images), "--out", str(out), "--workers", str(args.processes), "--shard-size", "10000",
            "--min-caption-chars", "1000",
        ]  # fmt: skip
        wall, peak, stdout, _ = timed(command, env)
        assert f"{num_rows} rows = 0 written" in stdout, stdout[:300]
        table.append((num_rows, path.stat().st_size, wall, peak))
        print(f"{num_rows} rows: {wall:.1f} s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
        subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"\n{machine_description()}; {args.processes} worker processes; all rows rejected (no image work)")
    print("| rows | table size | wall s | rows/s | peak RSS, all processes |")
    print("|---|---|---|---|---|")
    for num_rows, size, wall, peak in table:
        print(
            f"| {num_rows:,} | {size / 2**20:.0f} MiB | {wall:.1f} | {num_rows / wall:,.0f} | {peak / 2**20:.0f} MiB |"
        )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work",
        default=Path(tempfile.gettempdir()) / "clip-pipe-bench-prep",
        help="images, tables and outputs",
    )
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (A B, then B A, ...)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument(
        "--memory", type=int, nargs="*", help="measure peak RSS for these table sizes instead"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="both measurements on tiny inputs, to check that the script runs"
    )
    args = parser.parse_args()
    if args.smoke:
        args.num_images, args.rounds, args.processes, args.threads = 24, 1, 1, 4
        throughput(args)
        args.memory = [100, 200]
        memory(args)
    elif args.memory:
        memory(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
