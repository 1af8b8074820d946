"""bf16 on a CPU without bf16 instructions is emulated and slow: training says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clip_pipe.engine import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
WARNING = "run.precision=bf16 on a CPU without bf16 instructions"


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_native_bf16_needs_the_instructions_and_kernels_that_use_them():
    import torch

    flags = cpu_flags()
    hardware = bool({"avx512_bf16", "amx_bf16"} & flags)
    kernels = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert cpu_has_native_bf16({}) is (hardware and kernels)
    # oneDNN capped below its bf16 ISA emulates bf16 on any CPU.
    assert cpu_has_native_bf16({"ONEDNN_MAX_CPU_ISA": "AVX2"}) is False
    assert cpu_has_native_bf16({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}) is False
    assert cpu_has_native_bf16({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}) is (hardware and kernels)


def _train(tmp_path: Path, shards: Path, eval_set: Path, precision: str, env: dict) -> str:
    run_dir = tmp_path / precision
    command = [
        sys.executable, "launch/train.py", "--config", "configs/tiny_test.yaml", f"data.train={shards}",
        f"eval.sets=[{eval_set}]", f"run.out_dir={run_dir}", f"run.precision={precision}", "run.steps=1",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_emulated_bf16_warns_once_at_start_up(tmp_path, color_shards, color_eval_set):
    import os

    emulated = {**os.environ, **AVX2_ONLY}
    log = _train(tmp_path, color_shards, color_eval_set, "bf16", emulated)
    assert log.count(WARNING) == 1, log
    assert WARNING not in _train(tmp_path, color_shards, color_eval_set, "fp32", emulated)
