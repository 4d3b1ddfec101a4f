#!/usr/bin/env bash
# The packaging check (`make wheel-check`, .ci/run's last pass): what a user gets from `pip install caprl-core`.
#   1. build the wheel, and check that it holds every file the package needs at run time: the shipped miniature
#      world, the C++ and CUDA sources with their nvcc flags, the Triton kernels (each listed from the checkout);
#   2. install it with the lock into a clean venv outside the repository (torch from TORCH_SPEC);
#   3. from an unrelated directory: 2 training steps of the default run, then the default eval of the checkpoint.
# PY: the python that builds the wheel (make passes the venv's); TORCH_SPEC: torch for the clean venv.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/caprl-wheel-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

step() { echo "wheel-check: $*"; }

step "building the wheel"
"$PY" -m pip wheel --quiet --no-deps -w "$WORK/dist" "$REPO"
WHEEL=$(ls "$WORK"/dist/caprl_core-*.whl)
step "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"

# Every run-time file of the checkout must be in the wheel under caprl_core/.
"$PY" - "$WHEEL" <<'PYCHECK'
import sys, zipfile
from pathlib import Path

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
want = {f"caprl_core/kernels/{p.name}" for p in Path("kernels").glob("*.py")}
want |= {f"caprl_core/csrc/{p.relative_to('csrc')}" for p in Path("csrc").rglob("*") if p.is_file()}
want |= {f"caprl_core/world/{p.relative_to('caprl_core/world')}" for p in Path("caprl_core/world/shipped").rglob("*")
         if p.is_file()}
missing = sorted(want - names)
if missing:
    sys.exit(f"wheel-check: {len(missing)} files missing from the wheel: {missing}")
print(f"wheel-check: the wheel holds all {len(want)} kernel, C++/CUDA and shipped-world files")
PYCHECK

step "installing it into a clean venv ($TORCH_SPEC, the lock for the rest)"
python3 -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip install --quiet "$TORCH_SPEC"
"$VPY" "$REPO/scripts/lock_constraints.py" "$REPO/constraints.txt" > "$WORK/constraints.txt"
"$VPY" -m pip install --quiet -c "$WORK/constraints.txt" "$WHEEL"

mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"  # nothing of the checkout on sys.path: the installed package alone
step "python -m caprl_core.train --steps 2 (from $PWD)"
"$VPY" -m caprl_core.train --steps 2 --output-dir run --progress false
test -f run/metrics.jsonl && test "$(wc -l < run/metrics.jsonl)" -eq 2
step "python -m caprl_core.eval --policy run/checkpoints/step-000001"
"$VPY" -m caprl_core.eval --policy run/checkpoints/step-000001 --out eval
test -s eval/summary.json
step "passed"
