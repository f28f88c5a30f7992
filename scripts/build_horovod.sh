#!/usr/bin/env bash
# Build Horovod from its sdist against the torch already in a virtual environment.
#
# Usage: scripts/build_horovod.sh PYTHON VERSION     (e.g. .venv/bin/python 0.28.1)
#
# Horovod 0.28.1 (the last release) is an sdist whose CMake forces C++14, while torch 2.x
# headers need C++17; CXXFLAGS cannot fix it because CMake appends -std=c++14 last. We patch
# CMAKE_CXX_STANDARD to 17 (the fix merged upstream after 0.28.1) and build with Gloo only,
# without build isolation so the extension compiles against the venv's own torch.
# Idempotent: does nothing when `import horovod.torch` already works. About 150 s on 2 cores.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 PYTHON VERSION" >&2
    exit 2
fi
PY=$1
VERSION=$2

if "$PY" -c 'import horovod.torch' 2>/dev/null; then
    echo "horovod.torch already importable with $PY; nothing to do"
    exit 0
fi
"$PY" -c 'import torch' || { echo "error: torch must be installed in $PY's environment first" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Build dependencies must be in the venv because the build runs without isolation.
"$PY" -m pip install -q setuptools wheel cloudpickle psutil pyyaml packaging cffi

"$PY" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "horovod==$VERSION"
SDIST=$(ls "$WORK"/horovod-"$VERSION".tar.gz)
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/horovod-$VERSION"

for cmake_file in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
    if ! grep -q 'set(CMAKE_CXX_STANDARD 14)' "$cmake_file"; then
        echo "error: expected 'set(CMAKE_CXX_STANDARD 14)' in $cmake_file; the sdist changed" >&2
        exit 1
    fi
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$cmake_file"
done

JOBS=$(nproc 2>/dev/null || echo 2)
HOROVOD_WITH_PYTORCH=1 \
HOROVOD_WITHOUT_TENSORFLOW=1 \
HOROVOD_WITHOUT_MXNET=1 \
HOROVOD_WITH_GLOO=1 \
HOROVOD_WITHOUT_MPI=1 \
HOROVOD_CPU_OPERATIONS=GLOO \
MAKEFLAGS="-j$JOBS" \
    "$PY" -m pip install --no-build-isolation --no-cache-dir "$SRC"

"$PY" -c 'import horovod, horovod.torch as hvd; print("horovod", horovod.__version__, "built with gloo:", hvd.gloo_built())'
