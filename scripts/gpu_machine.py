"""The machine, for `make gpu-check`: the device the steps run on, the card's peaks (memory bandwidth, dense bf16
tensor TFLOP/s) and the machine's facts (versions).

Peaks come from a small table keyed by the CUDA device name (vendor datasheets, dense i.e. without 2:4 sparsity).
Fallback for a card not in the table: the bandwidth from the device's memory clock and bus width when torch reports
them (2 transfers per clock: the datasheet figure for HBM and GDDR6 within a few %), and no bf16 peak (the
TFLOP/s figures are then reported without a percentage). `source` in the result says which one was used.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import time

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
VOCAB = 151936  # Qwen2.5's: the real shape of every vocabulary-wide op


def synced_seconds(fn) -> float:
    """Wall time of one call of fn, the device synchronised before and after (so its kernels are inside it)."""
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def percent(value: float, peak: float | None) -> float | None:
    """value as a percentage of peak, None when the peak is unknown."""
    return None if peak is None else round(100 * value / peak, 1)


# (substrings the device name must contain, bandwidth GB/s, dense bf16 TFLOP/s); first match wins, so more specific
# names come first (GH200 before H200, H100 PCIe / NVL before the H100 SXM's "H100 80GB HBM3").
CARDS: list[tuple[tuple[str, ...], float, float]] = [
    (("GH200",), 4000.0, 989.0),
    (("H200",), 4800.0, 989.0),
    (("H100", "PCIe"), 2000.0, 756.0),
    (("H100", "NVL"), 3900.0, 835.0),
    (("H100",), 3350.0, 989.0),  # H100 SXM5: "NVIDIA H100 80GB HBM3"
    (("H800",), 3350.0, 989.0),
    (("A100", "80GB", "PCIe"), 1935.0, 312.0),
    (("A100", "80GB"), 2039.0, 312.0),  # A100 SXM4 80GB
    (("A100",), 1555.0, 312.0),  # A100 40GB, SXM4 and PCIe
    (("L40S",), 864.0, 362.0),
    (("A10G",), 600.0, 70.0),
    (("B200",), 8000.0, 2250.0),
]


def _table_lookup(name: str) -> tuple[float, float] | None:
    for needles, bandwidth, tflops in CARDS:
        if all(n.lower() in name.lower() for n in needles):
            return bandwidth, tflops
    return None


def card_peaks(name: str | None = None) -> dict:
    """{"name", "bandwidth_gbs", "bf16_tflops", "source"} of the current CUDA device (or of `name`); without CUDA
    and no name, every peak is None."""
    if name is None and not torch.cuda.is_available():
        return {"name": None, "bandwidth_gbs": None, "bf16_tflops": None, "source": "no CUDA device"}
    name = name or torch.cuda.get_device_name()
    found = _table_lookup(name)
    if found is not None:
        return {"name": name, "bandwidth_gbs": found[0], "bf16_tflops": found[1], "source": "table"}
    return {"name": name, "bandwidth_gbs": _bandwidth_from_properties(), "bf16_tflops": None,
            "source": "fallback: bandwidth from memory clock x bus width, no bf16 peak"}  # fmt: skip


def _bandwidth_from_properties() -> float | None:
    """2 x memory clock x bus width, when this torch exposes them (memory_clock_rate in kHz, bus width in bits)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _version(package: str) -> str:
    """The installed version of `package`, read from its metadata (importing triton or transformers costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict:
    """GPU, driver, CUDA, torch, triton and transformers versions, and the peaks used for the percentages."""
    from scripts.gpu_check import find_sanitizer

    triton_version, transformers_version = _version("triton"), _version("transformers")
    facts = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": triton_version, "transformers": transformers_version,
        "cuda_available": torch.cuda.is_available(), "driver": _driver_version(), "peaks": card_peaks(),
        # What the later steps need: a missing one explains their failure at a glance.
        "tools": {**{p: _version(p) for p in ("pytest", "ninja", "liger-kernel")},
                  "nvcc": shutil.which("nvcc"), "compute-sanitizer": find_sanitizer()},
    }  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        facts.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / 2**30,
                     compute_capability=f"{props.major}.{props.minor}",
                     shared_memory_per_block_optin=getattr(props, "shared_memory_per_block_optin", None))  # fmt: skip
    return facts


if __name__ == "__main__":  # python -m scripts.gpu_machine --result FILE: the facts step of `make gpu-check`
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Write the machine's facts and the card's peaks as JSON.")
    parser.add_argument("--result", type=Path, required=True, help="where the JSON goes")
    parser.parse_args().result.write_text(json.dumps(machine_facts(), indent=2))
