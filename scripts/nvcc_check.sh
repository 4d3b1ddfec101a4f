#!/usr/bin/env bash
# Compile-check the CUDA sources where no GPU runs them (CI, CPU machines), so broken CUDA code cannot land.
#   1. every csrc/cuda/*.cu compiled by nvcc for $CUDA_ARCH (plain CUDA: no torch headers) and linked together;
#   2. where $PY has torch, the torch-facing CUDA C++ (csrc/cuda/*.cpp, csrc/bindings.cpp with CAPRL_WITH_CUDA)
#      syntax-checked against torch's and the CUDA runtime's headers.
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE: CPU wheels of torch lack the generated c10/cuda/impl/cuda_cmake_macros.h (it only
# matters for Windows DLL exports). The CUDA include directory is the one nvcc itself uses (asked with -dryrun: nvcc
# may be a wrapper script outside the toolkit).
# C++ standard: the one torch builds extensions with (`python -m caprl_core._build --cxx-std`; c++20 for torch 2.13
# and 2.14, whose headers need it), for both steps, so this checks what the JIT build compiles; c++17 (the oldest
# torch 2.x used, and enough for the torch-free .cu files) when $PY has no torch. Never a fixed c++17: torch 2.14's
# headers do not compile under it.
# nvcc flags: the real build's (`python -m caprl_core._build --nvcc-flags`: csrc/cuda/nvcc.flags, e.g. -O3
# --use_fast_math, after the flags torch's builder adds to every .cu compile, e.g. -D__CUDA_NO_HALF_OPERATORS__);
# without torch, csrc/cuda/nvcc.flags alone. One source for both, so this check compiles what the JIT build compiles.
# Usage: scripts/nvcc_check.sh   (env: NVCC=nvcc CUDA_ARCH=sm_90 PY=.venv/bin/python CXX=c++ REQUIRE_NVCC=0)
set -euo pipefail
NVCC=${NVCC:-nvcc} CUDA_ARCH=${CUDA_ARCH:-sm_90} PY=${PY:-.venv/bin/python} CXX=${CXX:-c++}
cd "$(dirname "$0")/.."

if ! command -v "$NVCC" >/dev/null 2>&1; then
  if [ "${REQUIRE_NVCC:-0}" = "1" ]; then echo "nvcc-check: $NVCC not found and REQUIRE_NVCC=1" >&2; exit 1; fi
  echo "nvcc-check: skipped ($NVCC not found)"; exit 0
fi

have_torch=0
if "$PY" -c "import torch" >/dev/null 2>&1; then have_torch=1; fi
cxx_std=c++17
read -r -a nvcc_flags <csrc/cuda/nvcc.flags
if [ "$have_torch" = 1 ]; then
  cxx_std=$("$PY" -m caprl_core._build --cxx-std)
  read -r -a nvcc_flags <<<"$("$PY" -m caprl_core._build --nvcc-flags)"
fi

tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for f in csrc/cuda/*.cu; do
  echo "nvcc -arch=$CUDA_ARCH -std=$cxx_std ${nvcc_flags[*]} $f"
  "$NVCC" -arch="$CUDA_ARCH" -std="$cxx_std" "${nvcc_flags[@]}" -Xcompiler -fPIC -Icsrc -c "$f" -o "$tmp/$(basename "$f").o"
done
"$NVCC" -arch="$CUDA_ARCH" -shared "$tmp"/*.o -o "$tmp/libcheck.so"
echo "nvcc-check: CUDA kernels ok"

if [ "$have_torch" = 0 ]; then
  echo "nvcc-check: torch-facing syntax check skipped ($PY has no torch)"; exit 0
fi
cuda_inc=$("$NVCC" -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)
read -r -a torch_inc <<<"$("$PY" -c "from torch.utils.cpp_extension import include_paths as p; import sysconfig
print(' '.join('-isystem ' + d for d in [*p(), sysconfig.get_paths()['include']]))")"
for f in csrc/cuda/*.cpp csrc/bindings.cpp; do
  echo "$CXX -std=$cxx_std -fsyntax-only -DCAPRL_WITH_CUDA $f"
  "$CXX" -std="$cxx_std" -fsyntax-only -DCAPRL_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Icsrc \
    -isystem "$cuda_inc" "${torch_inc[@]}" "$f"
done
echo "nvcc-check: torch-facing CUDA C++ ok"
