# caprl-core: `make test` and `make train` set everything up in .venv on a fresh machine.
#
# TORCH_SPEC is what pip installs for torch when the venv has none. Users keep the default (their platform's normal
# torch: a CUDA build on Linux, torch 2.14.1 today). CPU-only machines may pass a CPU wheel instead, e.g.
#     make test TORCH_SPEC=torch==2.13.0      (.ci/run's first pass: that wheel is on the CI machine's disk)
# VENV names the virtual environment, so that two torch versions can live side by side, e.g.
#     make test VENV=.venv-torch214 TORCH_SPEC=torch==2.14.1      (.ci/run's second pass)
# PYTEST_ARGS goes to pytest (.ci/run: -p scripts.ci_strict_skips).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
REQUIRE_NVCC ?= 0
NVCC ?= nvcc
CUDA_ARCH ?= sm_90
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint build nvcc-check bench train selfcheck gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Compile every CUDA source for $(CUDA_ARCH) so broken CUDA code cannot land, even where no GPU runs it.
nvcc-check:
	NVCC=$(NVCC) CUDA_ARCH=$(CUDA_ARCH) PY=$(PY) REQUIRE_NVCC=$(REQUIRE_NVCC) scripts/nvcc_check.sh

build: setup
	$(PY) -m caprl_core._build

test: setup lint nvcc-check build
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup build
	@mkdir -p bench/results
	$(PY) -m pytest bench --benchmark-only --benchmark-json=bench/results/bench-$$(date +%Y%m%d-%H%M%S).json $(PYTEST_ARGS)

selfcheck: setup build
	$(PY) -m caprl_core.selfcheck

# The GPU validation kit (scripts/gpu_check.py): build with CUDA, op and gpu tests, compute-sanitizer, benchmarks, a
# 3-step training run, in under 8 minutes; the report goes to bench/results/gpu-check-<time>.{json,md}. DRY_RUN=1
# runs every step with CPU stand-ins (CI runs it through tests/test_gpu_check.py). GPU_CHECK_ARGS passes options,
# e.g. GPU_CHECK_ARGS="--steps build,gpu_tests".
DRY_RUN ?= 0
GPU_CHECK_ARGS ?=
gpu-check: setup
	$(PY) -m scripts.gpu_check $(if $(filter 1,$(DRY_RUN)),--dry-run) $(GPU_CHECK_ARGS)

# The default run: the shipped miniature world (its reader, start policy and train split), ~2 minutes on a CPU; its
# captions go from one statement to four (README, "The miniature world"). ARGS passes options,
# e.g. make train ARGS="--policy DIR --reader DIR --data FILE".
ARGS ?=
train: setup build
	$(PY) -m caprl_core.train $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache bench/results
