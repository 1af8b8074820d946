#!/usr/bin/env bash
# Run a command with torch's CPU kernels limited to an older instruction set, as on a CPU that lacks
# the newer ones: `scripts/emulate_cpu.sh avx2 scripts/test.sh -m numerics`.
#   avx2     AVX2 kernels, no AVX-512, no bf16 instructions (bf16 is emulated)
#   default  no vector extensions beyond what every x86-64 CPU has
# torch picks its own kernels from ATEN_CPU_CAPABILITY, but oneDNN and MKL dispatch on the CPU
# themselves, so all three are capped: ATEN_CPU_CAPABILITY alone leaves matmuls on AVX-512.
set -euo pipefail
isa=${1:?usage: scripts/emulate_cpu.sh avx2|default COMMAND [ARGS...]}
shift
case "$isa" in
    avx2) export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ;;
    default) export ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 ;;
    *) echo "scripts/emulate_cpu.sh: unknown instruction set '$isa' (avx2 or default)" >&2; exit 2 ;;
esac
exec "$@"
