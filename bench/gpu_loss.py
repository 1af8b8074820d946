"""The tiled InfoNCE against open_clip's ClipLoss on one CUDA device: peak memory and time at large batches.

One process (W = 1), so B_local = B_global. For each batch size, each loss runs forward + backward on the same
bf16-towers-style fp32 features (D = 512) after a warm-up; peak memory is `torch.cuda.max_memory_allocated`
above the features, time the median of CUDA-event timings. A loss that runs out of memory is reported as such.

    python -m bench.gpu_loss [--sizes 32768 65536 131072 262144] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss

from clip_pipe.losses import TiledClipLoss

GIB = 2**30


def measure(name: str, batch: int, dim: int, repeats: int) -> dict:
    loss_fn = TiledClipLoss() if name == "clip-pipe tiled" else OpenClipLoss()
    g = torch.Generator(device="cuda").manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, device="cuda", generator=g), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(batch, dim, device="cuda", generator=g), dim=-1).requires_grad_(True)
    scale = torch.tensor(14.0, device="cuda", requires_grad=True)
    times = []
    try:
        for i in range(repeats + 1):
            torch.cuda.synchronize()
            if i == 1:  # the warm-up ran; measure from here
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = loss_fn(image, text, scale)
            loss.backward()
            end.record()
            torch.cuda.synchronize()
            if i:
                times.append(start.elapsed_time(end) / 1000)
            image.grad = text.grad = scale.grad = None
    except torch.OutOfMemoryError:
        return {"loss": name, "batch": batch, "oom": True}
    finally:
        del image, text
        torch.cuda.empty_cache()
    peak = (torch.cuda.max_memory_allocated() - base) / GIB
    return {"loss": name, "batch": batch, "peak_gib": peak, "seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[32768, 65536, 131072, 262144])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # both losses in plain fp32
    rows = []
    for batch in args.sizes:
        for name in ("clip-pipe tiled", "open_clip ClipLoss"):
            rows.append(measure(name, batch, args.dim, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, D = {args.dim}, fp32, forward + backward, one device")
    print(f"{'B':>8}  {'loss':<20} {'peak GiB':>9} {'s':>8}")
    for r in rows:
        peak = "OOM" if r.get("oom") else f"{r['peak_gib']:.2f}"
        secs = "" if r.get("oom") else f"{r['seconds']:.3f}"
        print(f"{r['batch']:>8}  {r['loss']:<20} {peak:>9} {secs:>8}")


if __name__ == "__main__":
    main()
