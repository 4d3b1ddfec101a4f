# caprl-core: `make test` and `make train` set everything up in .venv on a fresh machine.
#
# TORCH_SPEC is what pip installs for torch when the venv has none. Users keep the default (their platform's normal
# torch: a CUDA build on Linux). CPU-only machines and CI pass a CPU wheel instead, e.g.
#     make test TORCH_SPEC=torch==2.13.0      (.ci/run does this: that wheel is on the CI machine's disk)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
REQUIRE_NVCC ?= 0
NVCC ?= nvcc
CUDA_ARCH ?= sm_90
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint build nvcc-check bench train selfcheck clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Compile every CUDA source for $(CUDA_ARCH) so broken CUDA code cannot land, even where no GPU runs it. Then, where
# the venv has torch, syntax-check the torch-facing CUDA C++ (csrc/cuda/*.cpp, bindings.cpp with CAPRL_WITH_CUDA)
# against torch's headers and the CUDA runtime headers. C10_CUDA_NO_CMAKE_CONFIGURE_FILE: CPU wheels of torch lack
# the generated c10/cuda/impl/cuda_cmake_macros.h (it only matters for Windows DLL exports). The CUDA include
# directory is the one nvcc itself uses (asked with -dryrun: nvcc may be a wrapper script outside the toolkit).
nvcc-check:
	@if command -v $(NVCC) >/dev/null 2>&1; then \
		tmp=$$(mktemp -d) && set -e && for f in csrc/cuda/*.cu; do \
			echo "nvcc -arch=$(CUDA_ARCH) $$f"; \
			$(NVCC) -arch=$(CUDA_ARCH) -std=c++17 -O3 -Xcompiler -fPIC -Icsrc -c $$f -o $$tmp/$$(basename $$f).o; \
		done && $(NVCC) -arch=$(CUDA_ARCH) -shared $$tmp/*.o -o $$tmp/libcheck.so && rm -rf $$tmp && echo "nvcc-check: ok" \
			|| exit 1; \
		if $(PY) -c "import torch" >/dev/null 2>&1; then \
			cuda_inc=$$($(NVCC) -dryrun -c -x cu /dev/null -o /dev/null 2>&1 \
				| sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1); \
			inc=$$($(PY) -c "from torch.utils.cpp_extension import include_paths as p; import sysconfig; \
				print(' '.join('-isystem ' + d for d in [*p(), sysconfig.get_paths()['include']]))"); \
			for f in csrc/cuda/*.cpp csrc/bindings.cpp; do \
				echo "c++ -fsyntax-only -DCAPRL_WITH_CUDA $$f"; \
				$(CXX) -std=c++17 -fsyntax-only -DCAPRL_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Icsrc \
					-isystem "$$cuda_inc" $$inc $$f || exit 1; \
			done; echo "nvcc-check: torch-facing CUDA C++ ok"; \
		else echo "nvcc-check: torch-facing syntax check skipped ($(PY) has no torch)"; fi; \
	elif [ "$(REQUIRE_NVCC)" = "1" ]; then echo "nvcc-check: $(NVCC) not found and REQUIRE_NVCC=1" >&2; exit 1; \
	else echo "nvcc-check: skipped ($(NVCC) not found)"; fi

build: setup
	$(PY) -m caprl_core._build

test: setup lint nvcc-check build
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup build
	@mkdir -p bench/results
	$(PY) -m pytest bench --benchmark-only --benchmark-json=bench/results/bench-$$(date +%Y%m%d-%H%M%S).json $(PYTEST_ARGS)

selfcheck: setup build
	$(PY) -m caprl_core.selfcheck

# Until the training loop lands (issue 5), `make train` runs the op self-check: every backend against the reference.
train: selfcheck

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache bench/results
