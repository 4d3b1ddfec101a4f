"""Shared test setup: Triton runs through its interpreter on CPU-only machines, and ops tests are parametrised
over every backend that can run here.

Use the `backend` fixture (or `BACKENDS_HERE`) in op tests: each test then runs once per backend, and a backend that
cannot run on this machine is reported as skipped with the reason (never silently dropped).
"""

from __future__ import annotations

import os

# Under the Triton interpreter tl.dot runs through numpy: OpenBLAS threads on a loaded 2-core machine make those
# small matmuls ~100x slower (measured by the kernel author), so keep it single-threaded. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined (i.e. before caprl_core.kernels is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from caprl_core import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Every backend that can run on this machine's device; "cuda" only with a GPU.
BACKENDS_HERE = ("torch", "cpu", "triton") if DEVICE.type == "cpu" else ("torch", "triton", "cuda")


# Backends that must load wherever CUDA tensors are tested: on a GPU machine a failed Triton import or CUDA build is
# a broken install, and a skip would hide it under a green run.
REQUIRED_ON_CUDA = ("triton", "cuda")


def require_backend(name: str, op: str, device: torch.device = DEVICE) -> None:
    """Skip (with the reason) when backend `name` cannot run `op` on `device`; tests must not pass on a fallback.

    A backend that has no kernel for `op` by design (the CUDA backend has no token_logprobs) is a plain skip. On CUDA
    tensors, a Triton or CUDA backend that does not load fails the test instead: that is a broken build."""
    why = backends._why_unavailable(name, op, device)
    if why is None:
        return
    if backends._load_error(name) is None and not backends.has_op(backends.load(name), op):
        pytest.skip(f"the {name} backend has no kernel for {op} (by design)")
    if device.type == "cuda" and name in REQUIRED_ON_CUDA:
        pytest.fail(f"{name} backend broken for {op} on a CUDA machine: {why}", pytrace=False)
    pytest.skip(f"{name} backend unavailable for {op}: {why}")


@pytest.fixture(params=BACKENDS_HERE)
def backend(request) -> str:
    return request.param


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` need CUDA: without it they are deselected (pytest reports how many), not skipped."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


def train_to_checkpoint(policy, reader, out, run_args: list[str], num_images: int = 4):
    """`python -m caprl_core.train` in this process on model directories: (run directory, its latest checkpoint).
    The data (a real policy needs --data) are `num_images` of the world's train split, in the run's data/."""
    from caprl_core import train
    from caprl_core.world import make_world_data

    data = make_world_data(out / "data", "train", num_images)
    argv = ["--policy", str(policy), "--reader", str(reader), "--data", str(data), "--output-dir", str(out)]
    assert train.main([*argv, *run_args]) == 0
    return out, out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
