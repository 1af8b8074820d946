"""The distributed InfoNCE: clip-pipe's tiled loss against open_clip's ClipLoss (local loss, gather with grad).

Two real gloo ranks, one thread each, fp32, forward + backward, W = 2.

- Memory: a fresh pair of processes per (loss, B_local); each process warms up on a small batch, resets
  its peak RSS (writing 5 to /proc/self/clear_refs), and reports how far the peak (VmHWM) rises above
  the RSS before one forward + backward at B_local (the larger of the two ranks). The rise
  includes everything the loss allocates: gathered features, logits, gradients, gloo buffers.
  Safety: no process may grow past --cap-gib. A run is skipped when the loss's measured growth law
  predicts more (ClipLoss ~ B_local², ours ~ B_local), and RLIMIT_AS is set to the process's address space
  plus the cap, so a wrong prediction ends in an allocation error, not a machine out of memory.
- Time: where both fit, a pair of processes times both losses on the same features, alternating
  A B A B after one warm-up each; medians and the median of the pairwise ratios with their range.
  Where ClipLoss does not fit, ours is timed on its own (its memory run's single step).
- Largest B_local each loss fits in a budget: from the growth law fitted to its measured peaks.
- The demo's size (B_local = 128, dim 64) is timed the same way, to choose the default.

    python -m bench.loss [--sizes 8192 16384 32768 --dim 512 --repeats 3 --cap-gib 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench.common import machine_description
from clip_pipe.distributed import free_port
from clip_pipe.losses import TiledClipLoss
from clip_pipe.losses.tiled import DEFAULT_TILE_SIZE

WORLD = 2
OURS, THEIRS = "clip-pipe tiled", "open_clip ClipLoss"
GIB = 2**30


def make_loss(name: str, rank: int, tile_size: int):
    if name == OURS:
        return TiledClipLoss(rank, WORLD, tile_size=tile_size)
    # Imported here: a process that measures ours alone then spends no time importing open_clip and torchvision.
    from open_clip.loss import ClipLoss as OpenClipLoss

    return OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)


def features(batch: int, dim: int, rank: int):
    g = torch.Generator().manual_seed(rank)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_(True)
    return image, text, torch.tensor(14.0)


def step(loss_fn, image, text, scale) -> float:
    loss = loss_fn(image, text, scale)
    loss.backward()
    image.grad = text.grad = None
    return loss.detach().item()


def _status_bytes(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) * 1024


def _init(rank: int, port: int, cap_bytes: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    resource.setrlimit(resource.RLIMIT_AS, (_status_bytes("VmSize") + cap_bytes, resource.RLIM_INFINITY))


def memory_worker(rank: int, port: int, name: str, batch: int, dim: int, tile: int, cap: int, out: str):
    _init(rank, port, cap)
    loss_fn = make_loss(name, rank, tile)
    step(loss_fn, *features(64, dim, rank))  # kernels, thread pools, gloo buffers: not the loss's growth
    image, text, scale = features(batch, dim, rank)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    step(loss_fn, image, text, scale)
    seconds = time.perf_counter() - start
    rises = [None] * WORLD
    dist.all_gather_object(rises, _status_bytes("VmHWM") - before)
    if rank == 0:
        Path(out).write_text(json.dumps({"peak_rise_bytes": max(rises), "seconds": seconds}))
    _exit()


def time_worker(rank: int, port: int, batch: int, dim: int, tile: int, repeats: int, cap: int, out: str):
    _init(rank, port, cap)
    losses = {name: make_loss(name, rank, tile) for name in (OURS, THEIRS)}
    image, text, scale = features(batch, dim, rank)
    values = {name: step(fn, image, text, scale) for name, fn in losses.items()}  # and the warm-up
    assert abs(values[OURS] - values[THEIRS]) < 1e-4 * abs(values[THEIRS]), values
    times = {name: [] for name in losses}
    for _ in range(repeats):
        for name, fn in losses.items():
            dist.barrier()
            start = time.perf_counter()
            step(fn, image, text, scale)
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    _exit()


def _exit() -> None:
    """Ends a worker once both ranks have their results. A worker that returned normally sometimes
    aborted in the C++ teardown that follows ("terminate called without an active exception", SIGABRT:
    about one run in three of the loss workers, at any memory cap), failing a run whose figures were
    already written; skipping the teardown avoids it."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, timeout: float = 3600) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/out.json"
        context = mp.start_processes(
            fn, args=(free_port(), *args, out), nprocs=WORLD, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise RuntimeError(f"{fn.__name__}{args} still running after {timeout} s")
        return json.loads(Path(out).read_text())


def predicted_bytes(name: str, batch: int, peaks: dict[int, int]) -> float | None:
    """The peak rise at `batch` by the loss's growth law, from its largest measured batch(es)."""
    if not peaks:
        return None
    sizes = sorted(peaks)
    if name == THEIRS:  # dominated by its (B, W·B) logits and softmaxes
        return peaks[sizes[-1]] * (batch / sizes[-1]) ** 2
    if len(sizes) == 1:
        return peaks[sizes[0]] * batch / sizes[0]
    (b0, b1), (p0, p1) = sizes[-2:], (peaks[sizes[-2]], peaks[sizes[-1]])
    return p1 + (p1 - p0) / (b1 - b0) * (batch - b1)


def largest_batch(name: str, budget: float, peaks: dict[int, int]) -> int:
    """Largest B_local whose predicted peak rise fits in `budget` bytes."""
    # RSS moves in pages: a smaller rise (small batches) reads as 0, so count at least one page.
    sizes, page = sorted(peaks), os.sysconf("SC_PAGE_SIZE")
    if name == THEIRS:
        return int(sizes[-1] * math.sqrt(budget / max(peaks[sizes[-1]], page)))
    if len(sizes) == 1:  # proportional, as predicted_bytes assumes from one size
        return int(sizes[0] * budget / max(peaks[sizes[0]], page))
    (b0, b1), (p0, p1) = sizes[-2:], (peaks[sizes[-2]], peaks[sizes[-1]])
    slope = max(p1 - p0, page) / (b1 - b0)
    return int(b1 + (budget - p1) / slope)


def summarise(times: dict) -> dict:
    ratios = [a / b for a, b in zip(times[OURS], times[THEIRS], strict=True)]
    return {
        "ours_s": statistics.median(times[OURS]),
        "theirs_s": statistics.median(times[THEIRS]),
        "time_ratio": statistics.median(ratios),
        "time_ratio_range": [min(ratios), max(ratios)],
        "num_pairs": len(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768], help="B_local")
    parser.add_argument("--calibrate", type=int, nargs="+", default=[4096], help="smaller B_local first")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE_SIZE)
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs where both losses fit")
    parser.add_argument(
        "--demo-repeats", type=int, default=100, help="timed pairs at B_local 128, dim 64 (0: skip)"
    )
    parser.add_argument("--cap-gib", type=float, default=8.0, help="most any one process may grow")
    args = parser.parse_args()
    cap = int(args.cap_gib * GIB)

    rows = []
    if args.demo_repeats:
        demo = spawn(time_worker, 128, 64, args.tile, args.demo_repeats, cap)
        rows.append({"B_local": 128, "dim": 64, **summarise(demo)})
        print(json.dumps(rows[-1]), flush=True)

    peaks = {OURS: {}, THEIRS: {}}
    for batch in sorted(set(args.calibrate + args.sizes)):
        row = {"B_local": batch, "dim": args.dim}
        for name in (OURS, THEIRS):
            need = predicted_bytes(name, batch, peaks[name])
            if need is not None and need > 0.9 * cap:
                row[name] = f"does not fit: needs ~{need / GIB:.1f} GiB > {args.cap_gib:g} GiB cap"
                row["memory_ratio_to_predicted"] = peaks[OURS][batch] / need
                continue
            result = spawn(memory_worker, name, batch, args.dim, args.tile, cap)
            peaks[name][batch] = result["peak_rise_bytes"]
            row[name] = {"peak_rise_mib": result["peak_rise_bytes"] / 2**20, "one_step_s": result["seconds"]}
        if batch in args.sizes and batch in peaks[THEIRS]:
            row.update(summarise(spawn(time_worker, batch, args.dim, args.tile, args.repeats, cap)))
        if batch in peaks[THEIRS]:
            row["memory_ratio"] = peaks[OURS][batch] / peaks[THEIRS][batch]
        rows.append(row)
        print(json.dumps(row), flush=True)

    budgets = {f"{args.cap_gib:g} GiB cap": cap}
    largest_theirs = max(peaks[THEIRS])
    budgets[f"ClipLoss's peak at B_local {largest_theirs}"] = peaks[THEIRS][largest_theirs]
    fits = {
        label: {name: largest_batch(name, budget, peaks[name]) for name in (OURS, THEIRS)}
        for label, budget in budgets.items()
    }
    print(
        json.dumps(
            {
                "machine": machine_description(),
                "date": time.strftime("%Y-%m-%d"),
                "setting": f"{WORLD} gloo ranks, 1 thread each, fp32, forward+backward, tile {args.tile}",
                "rows": rows,
                "largest_B_local_in_budget (extrapolated from the measured peaks)": fits,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
