"""The GPUs the planner knows: dense bf16 peak, memory, and the bandwidths a step's collectives see.

Peaks are the vendors' dense (no sparsity) bf16 tensor-core figures; memory is what `nvidia-smi`
reports as total; `nvlink_gb_s` is one direction of one GPU's NVLink (what a ring collective inside
a node runs at, at best); `network_gb_s` is one GPU's share of the inter-node fabric in the usual
rail-per-GPU build (A100: HDR InfiniBand 200 Gb/s, H100/H200/B200: NDR 400 Gb/s). Every figure can
be overridden (`Setup.gpu_flops`, `gpu_memory_gib`, `network_gb_s`), since clusters differ.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    memory_gib: float
    nvlink_gb_s: float  # per GPU, one direction (GB = 1e9 bytes)
    network_gb_s: float  # per GPU, between nodes
    gpus_per_node: int = 8


GPUS = {
    g.name: g
    for g in (
        Gpu("A100-40GB", 312e12, 40.0, 300, 25),
        Gpu("A100-80GB", 312e12, 80.0, 300, 25),
        Gpu("A800-80GB", 312e12, 80.0, 200, 25),
        Gpu("H100-SXM", 989e12, 79.65, 450, 50),
        Gpu("H100-PCIe", 756e12, 79.65, 64, 50),  # no NVLink: PCIe 5.0 x16 inside the node
        Gpu("H200", 989e12, 140.4, 450, 50),
        Gpu("B200", 2250e12, 179.1, 900, 50),
    )
}


# nvidia-smi's names (`--query-gpu=name`), most specific first: "NVIDIA H100 80GB HBM3" -> H100-SXM.
_DEVICE_NAMES = (
    ("H200", "H200"), ("H100 PCIe", "H100-PCIe"), ("H100", "H100-SXM"), ("B200", "B200"),
    ("A800", "A800-80GB"), ("A100-SXM4-80GB", "A100-80GB"), ("A100 80GB", "A100-80GB"),
    ("A100-PCIE-80GB", "A100-80GB"), ("A100", "A100-40GB"),
)  # fmt: skip


def gpu(name: str) -> Gpu:
    """The table's entry for `name`: a key of the table (case-insensitive), or the name nvidia-smi
    reports (`nvidia-smi --query-gpu=name --format=csv,noheader`)."""
    for key, value in GPUS.items():
        if key.lower() == name.lower():
            return value
    for fragment, key in _DEVICE_NAMES:
        if fragment.lower() in name.lower():
            return GPUS[key]
    raise ValueError(
        f"unknown GPU {name!r}: known are {', '.join(GPUS)} "
        "(or give --gpu-flops and --gpu-memory-gib for another)"
    )


def link_gb_s(g: Gpu, num_gpus: int) -> float:
    """The bandwidth a ring over `num_gpus` GPUs runs at: NVLink inside one node, else the network."""
    return g.nvlink_gb_s if num_gpus <= g.gpus_per_node else g.network_gb_s
