"""Benchmark helpers: peak memory of a call, on CPU (resident set high-water mark) or CUDA (allocator peak).

The CPU measure resets the kernel's high-water mark through /proc/self/clear_refs (Linux), runs the call, and
reports VmHWM minus the resident size before the call: the extra memory the call needed at its peak.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of fn() beyond what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


@pytest.fixture
def peak_memory() -> Callable[[Callable[[], object], torch.device], int]:
    return peak_extra_bytes


def machine() -> str:
    """A short description of where the benchmark ran, stored in the benchmark's extra_info."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "cpu")  # fmt: skip
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn, followed by a device synchronisation on CUDA, so timings include the kernels and not just the launch."""

    def run() -> object:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def best_seconds(fn: Callable[[], object], device: torch.device, rounds: int = 2) -> float:
    """Best wall time of `rounds` synchronised calls of fn (for baselines timed outside pytest-benchmark)."""
    run, times = synced(fn, device), []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
