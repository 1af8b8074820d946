"""What every benchmark table records about the machine it ran on."""

import os
import platform
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

# The CPU flags that change which kernels torch, oneDNN and MKL run (and whether bf16 is native).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# Caps that make a CPU run as an older one (scripts/emulate_cpu.sh).
KERNEL_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine_description() -> str:
    """'2 cores, AMD EPYC (avx2 avx512f avx512_bf16)', plus any kernel caps in force, e.g.
    '; emulating: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2'."""
    model, flags = platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model == platform.machine():
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    num_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = (
        f"{num_cores} cores, {model} ({' '.join(f for f in KERNEL_FLAGS if f in flags) or 'no AVX2'})"
    )
    caps = [f"{name}={os.environ[name]}" for name in KERNEL_CAPS if name in os.environ]
    return description + (f"; emulating: {' '.join(caps)}" if caps else "")


def normalised_on_cpu(batches: Iterable[dict], augment) -> Iterator[dict]:
    """clip-pipe's batches as a CPU rank takes them: the loader hands on uint8 images, which the rank
    normalises into a reused float tensor (clip_pipe/train.py's `_model_input`). Timing this iterator
    counts that work, as open_clip's batches, normalised in its loader, count theirs."""
    out = None
    for batch in batches:
        images = batch["images"]
        if out is None or out.shape != images.shape:
            out = torch.empty(images.shape, dtype=torch.float32)
        augment.normalize(images, out)
        yield batch
