#!/usr/bin/env bash
# Install torch into the venv whose python is $1, without pulling a CUDA build onto a machine
# that has no GPU, and with the CUDA build where `nvidia-smi` sees one.
#   TORCH_SPEC     the requirement (default torch==2.13.0)
#   TORCH_CPU_INDEX where CPU builds come from when no local wheel has one
set -euo pipefail
py=$1
spec=${TORCH_SPEC:-torch==2.13.0}
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if "$py" -c "import torch" 2>/dev/null; then
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install-torch: GPU found, installing the CUDA build of $spec"
    exec "$py" -m pip install -q "$spec"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A CPU wheel reachable without an index (pip's find-links, e.g. a wheel cache) wins.
if "$py" -m pip download -q --no-deps --no-index -d "$tmp" "$spec" 2>/dev/null \
        && ls "$tmp"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    echo "install-torch: no GPU, installing the local CPU wheel $(basename "$tmp"/torch-*.whl)"
    exec "$py" -m pip install -q "$tmp"/torch-*.whl
fi
echo "install-torch: no GPU, installing the CPU build of $spec from $cpu_index"
exec "$py" -m pip install -q "$spec" --index-url "$cpu_index" --extra-index-url https://pypi.org/simple
