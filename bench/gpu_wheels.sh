#!/usr/bin/env bash
# Run HERE (with network to PyPI), before bench/gpu.sh: the lent GPU machine reaches no registry, and its
# image has torch but not open_clip, webdataset or DeepSpeed. Downloads them (for the machine's Python 3.12)
# into .gpu-wheels/, which .git/info/exclude keeps out of git and the device call carries (`carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu-wheels/' .git/info/exclude 2>/dev/null || echo '/.gpu-wheels/' >> "$(git rev-parse --git-common-dir)/info/exclude"
PIP=${PIP:-.venv/bin/pip}
target=(--dest .gpu-wheels --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_28_x86_64 --implementation cp)
# Pure-Python or binary wheels, no dependencies: torch, numpy and friends are on the machine already.
"$PIP" download -q --no-deps --only-binary=:all: "${target[@]}" open_clip_torch webdataset braceexpand ftfy \
    wcwidth hjson pydantic pydantic-core annotated-types typing-inspection python-multipart
# DeepSpeed ships as a source archive; it builds there against the machine's own torch (no ops compiled).
"$PIP" download -q --no-deps --no-binary=:all: --dest .gpu-wheels deepspeed
du -sh .gpu-wheels
