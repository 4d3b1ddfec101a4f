"""Build and load the C++ extension (csrc/) with PyTorch's JIT extension tooling.

Why JIT rather than at install time: `pip install` of a torch extension needs torch inside pip's isolated build
environment, and an unpinned torch there pulls a multi-GB CUDA build even on CPU machines; a JIT build uses the
torch already installed, compiles once (about a minute) into the torch extensions cache (TORCH_EXTENSIONS_DIR),
and is reused afterwards. The cache key includes the compile flags, so a change of CPU features rebuilds.

One extension, one binding file (csrc/bindings.cpp) with two submodules: `cpu` (OpenMP kernels, always) and
`cuda` (CUDA kernels, only where torch has CUDA and nvcc is found). If the CUDA build fails, the CPU-only build is
used and the CUDA backend reports why it is unavailable.

C++ standard: never ours to choose. csrc/ includes torch's headers, and torch decides the standard they need
(torch 2.14's use C++20 `requires` clauses; a forced -std=c++17 broke every fresh install there). The JIT build
passes no -std, so torch's own builder adds the one it was made for; `cxx_standard()` tells scripts/nvcc_check.sh
the same answer.

Run `python -m caprl_core._build` to build ahead of time and print where the extension lives;
`python -m caprl_core._build --cxx-std` prints the C++ standard torch builds extensions with (e.g. c++20).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import sys
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
if not CSRC.is_dir():  # installed (not editable): csrc/ is packaged as caprl_core.csrc
    CSRC = Path(__file__).resolve().parent / "csrc"


def cxx_standard() -> str:
    """The C++ standard torch's extension builder compiles with ("c++20" for torch 2.13 and 2.14, "c++17" for
    older releases): the newest `-std=c++NN` that torch.utils.cpp_extension itself passes. Read from its source
    because torch exposes no function for it; "c++17" (the oldest torch 2.x used) if none is found."""
    from torch.utils import cpp_extension

    found = re.findall(r"-std=c\+\+(\d+)", inspect.getsource(cpp_extension))
    return f"c++{max(int(v) for v in found)}" if found else "c++17"


def _cpu_flags() -> list[str]:
    """-O3 and OpenMP, plus AVX2/FMA where this CPU has them (the exp polynomials vectorise 8-wide with them).
    No -std: torch's builder adds the standard its headers need (see the module docstring)."""
    flags = ["-O3", "-fopenmp"]
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    if " avx2" in cpuinfo and " fma" in cpuinfo:
        flags += ["-mavx2", "-mfma"]
    return flags


def _sources(with_cuda: bool) -> list[str]:
    sources = [CSRC / "bindings.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]
    if with_cuda:
        sources += sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))
    return [str(s) for s in sources]


def _name(sources: list[str], flags: list[str]) -> str:
    """Extension name keyed on the source contents, flags, torch and Python versions, so an edit, another CPU or
    another torch never loads a stale build from the shared cache."""
    digest = hashlib.sha1()
    headers = sorted(str(h) for h in CSRC.rglob("*.h"))  # included, not compiled: part of the key all the same
    for s in [*sources, *headers]:
        digest.update(Path(s).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(f"{torch.__version__} {sys.version_info[:2]}".encode())
    return "caprl_ext_" + digest.hexdigest()[:12]


def _build(with_cuda: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    cflags = _cpu_flags() + (["-DCAPRL_WITH_CUDA"] if with_cuda else [])
    sources = _sources(with_cuda)
    verbose = os.environ.get("CAPRL_BUILD_VERBOSE", "0") != "0"
    return load(
        name=_name(sources, cflags),
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "--use_fast_math"] if with_cuda else None,  # no -std: torch adds its own
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(CSRC)],
        with_cuda=with_cuda,
        verbose=verbose,
    )


@cache
def extension() -> ModuleType:
    """The compiled extension module (built on first call, then cached on disk and in memory)."""
    if torch.cuda.is_available() and torch.version.cuda is not None:
        try:
            return _build(with_cuda=True)
        except Exception as e:
            warnings.warn(
                f"caprl_core: the CUDA kernels did not build ({e}); building the CPU kernels only", stacklevel=2
            )
    return _build(with_cuda=False)


def load_extension(name: str) -> ModuleType:
    """The `cpu` or `cuda` submodule of the extension; raises if that part was not built."""
    ext = extension()
    if not hasattr(ext, name):
        raise RuntimeError(f"the extension was built without its {name!r} kernels")
    return getattr(ext, name)


if __name__ == "__main__":
    if sys.argv[1:] == ["--cxx-std"]:
        print(cxx_standard())
        sys.exit(0)
    ext = extension()
    parts = [p for p in ("cpu", "cuda") if hasattr(ext, p)]
    print(f"built {ext.__name__} ({', '.join(parts)}) at {ext.__file__}")
    sys.exit(0)
