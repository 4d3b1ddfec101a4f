# caprl-core: `make test` and `make train` set everything up in .venv on a fresh machine.
#
# TORCH_SPEC is what pip installs for torch when the venv has none. Users keep the default (their platform's normal
# torch: a CUDA build on Linux, torch 2.14.1 today). CPU-only machines may pass a CPU wheel instead, e.g.
#     make test TORCH_SPEC=torch==2.13.0      (.ci/run's first pass: that wheel is on the CI machine's disk)
# VENV names the virtual environment, so that two sets of versions can live side by side.
# DEPS picks the versions of everything but torch: `lock` (default) installs the tested set in constraints.txt, so a
# release upstream cannot break `make test` or `make train`; `newest` installs what pip resolves today, torch included
# when TORCH_SPEC leaves it free (.ci/run's second pass pins the CPU wheel, CI_NEWEST_TORCH=1 frees it), e.g.
#     make test DEPS=newest VENV=.venv-newest
# PYTEST_ARGS goes to pytest (.ci/run: -p scripts.ci_strict_skips).
PYTHON ?= python3
DEPS ?= lock
VENV ?= .venv
TORCH_SPEC ?= torch
REQUIRE_NVCC ?= 0
NVCC ?= nvcc
CUDA_ARCH ?= sm_90
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint build nvcc-check bench train selfcheck gpu-check wheel-check lock clean

ifeq ($(DEPS),lock)
# The lock as constraints, less what the installed torch pins itself (scripts/lock_constraints.py says why).
INSTALL = $(PY) scripts/lock_constraints.py constraints.txt > $(VENV)/constraints.txt && \
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[test]"
else ifeq ($(DEPS),newest)
# TORCH_SPEC as a requirement, so that a pinned torch stays and a free one is upgraded with everything else.
INSTALL = $(PY) -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]" "$(TORCH_SPEC)"
else
$(error DEPS must be lock or newest, got '$(DEPS)')
endif

setup: $(VENV)/.installed-$(DEPS)

# One marker per DEPS: switching between lock and newest reinstalls.
$(VENV)/.installed-$(DEPS): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	@rm -f $(VENV)/.installed $(VENV)/.installed-*
	@$(PY) -c "import torch; print(torch.__version__)" > $(VENV)/.torch-before
	$(INSTALL)
	@# The dependencies must fit the torch installed, never replace it (a lock conflict once swapped 2.14.1 for
	@# 2.13.0+cpu without a word). DEPS=newest with a free TORCH_SPEC may upgrade it: that is what it asks for.
	@test "$(DEPS)" = newest || $(PY) -c "import torch, sys; before = open('$(VENV)/.torch-before').read().strip(); \
		sys.exit(0 if torch.__version__ == before else f'error: installing the dependencies replaced torch {before} \
		with {torch.__version__}: the lock (constraints.txt) conflicts with this torch')"
	@touch $@

# Moves the lock forward to this venv's versions: run after `make test DEPS=newest VENV=...` passed with that VENV.
lock:
	$(PY) scripts/lock_constraints.py --write constraints.txt

# Builds the wheel and runs it from a clean venv outside the repository (scripts/wheel_check.sh; .ci/run's last pass).
wheel-check: setup
	PY=$(PY) TORCH_SPEC="$(TORCH_SPEC)" scripts/wheel_check.sh

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
# captions go from one statement to four (docs/world.md). ARGS passes options,
# e.g. make train ARGS="--policy DIR --reader DIR --data FILE".
ARGS ?=
train: setup build
	$(PY) -m caprl_core.train $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache bench/results
