"""Build and load the C++ extension (csrc/) with PyTorch's JIT extension tooling.

Why JIT rather than at install time: `pip install` of a torch extension needs torch inside pip's isolated build
environment, and an unpinned torch there pulls a multi-GB CUDA build even on CPU machines; a JIT build uses the
torch already installed, compiles once (about a minute) into the torch extensions cache (TORCH_EXTENSIONS_DIR),
and is reused afterwards. The cache key includes the compile flags, so a change of CPU features rebuilds.

One extension, one binding file (csrc/bindings.cpp) with two submodules: `cpu` (OpenMP kernels, always) and
`cuda` (CUDA kernels, only where torch has CUDA and nvcc is found). If the CUDA build fails, the CPU-only build is
used (the CPU kernels stay usable), the `cuda` backend reports the compiler's error as the reason it is unavailable,
and `python -m caprl_core._build` exits non-zero: on a machine with a GPU a broken CUDA build is a failure, never a
silent fallback (tests/conftest.py fails, not skips, the tests of a backend that should run on CUDA).

nvcc flags: ours live in one place, csrc/cuda/nvcc.flags, read by this build and by scripts/nvcc_check.sh (through
`python -m caprl_core._build --nvcc-flags`, which adds the ones torch's builder passes itself), so the compile check
cannot drift from the real build.

C++ standard: never ours to choose. csrc/ includes torch's headers, and torch decides the standard they need
(torch 2.14's use C++20 `requires` clauses; a forced -std=c++17 broke every fresh install there). The JIT build
passes no -std, so torch's own builder adds the one it was made for; `cxx_standard()` tells scripts/nvcc_check.sh
the same answer.

Run `python -m caprl_core._build` to build ahead of time and print where the extension lives;
`python -m caprl_core._build --cxx-std` prints the C++ standard torch builds extensions with (e.g. c++20);
`python -m caprl_core._build --nvcc-flags` the nvcc flags of the CUDA part (without -std and -gencode).
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


def nvcc_flags(with_torch_defaults: bool = False) -> list[str]:
    """Our nvcc flags (csrc/cuda/nvcc.flags); with `with_torch_defaults`, preceded by the ones torch's builder adds
    to every .cu compile (e.g. -D__CUDA_NO_HALF_OPERATORS__, --expt-relaxed-constexpr), i.e. the full set the JIT
    build compiles with apart from -std and the -gencode of the local GPU."""
    ours = (CSRC / "cuda" / "nvcc.flags").read_text().split()
    if not with_torch_defaults:
        return ours
    from torch.utils import cpp_extension

    return [*cpp_extension.COMMON_NVCC_FLAGS, *ours]


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
    """Extension name keyed on the source contents and location, flags, torch and Python versions, so an edit,
    another CPU or another torch never loads a stale build from the shared cache."""
    digest = hashlib.sha1()
    headers = sorted(str(h) for h in CSRC.rglob("*.h"))  # included, not compiled: part of the key all the same
    for s in [*sources, *headers]:
        digest.update(Path(s).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(f"{torch.__version__} {sys.version_info[:2]}".encode())
    # And where the sources are: torch's build.ninja names them by absolute path, so two checkouts of the same
    # sources sharing the cache would otherwise recompile on every switch between them (measured: ~105 s a switch
    # on the 2-core machine, with two worktrees at the same commit).
    digest.update(str(CSRC).encode())
    return "caprl_ext_" + digest.hexdigest()[:12]


def _build(with_cuda: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    cflags = _cpu_flags() + (["-DCAPRL_WITH_CUDA"] if with_cuda else [])
    cuda_flags = nvcc_flags() if with_cuda else []
    sources = _sources(with_cuda)
    verbose = os.environ.get("CAPRL_BUILD_VERBOSE", "0") != "0"
    return load(
        name=_name(sources, cflags + cuda_flags),
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags or None,  # no -std: torch adds its own
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(CSRC)],
        with_cuda=with_cuda,
        verbose=verbose,
    )


def cuda_expected() -> bool:
    """Whether this machine should build the CUDA part: torch has CUDA and sees a GPU."""
    return torch.cuda.is_available() and torch.version.cuda is not None


# Why the CUDA part did not build (the compiler's output), set by extension(); None when it built or was not tried.
_cuda_build_error: str | None = None


def _first_error_line(text: str) -> str:
    """The compiler's first "error" line (gcc's and nvcc's "error:", not torch's "Error building extension" header;
    ninja's last line is only "build stopped"), else the last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return next((ln for ln in lines if re.search(r"\berror\b", ln)), lines[-1] if lines else "no output")


@cache
def extension() -> ModuleType:
    """The compiled extension module (built on first call, then cached on disk and in memory)."""
    global _cuda_build_error
    if cuda_expected():
        try:
            return _build(with_cuda=True)
        except Exception as e:
            _cuda_build_error = str(e) or repr(e)
            warnings.warn(
                f"caprl_core: the CUDA kernels did not build ({_first_error_line(_cuda_build_error)}); building the "
                "CPU kernels only (`python -m caprl_core._build` prints the whole error)",
                stacklevel=2,
            )
    return _build(with_cuda=False)


def load_extension(name: str) -> ModuleType:
    """The `cpu` or `cuda` submodule of the extension; raises if that part was not built, with the compiler's
    error when it was tried and failed."""
    ext = extension()
    if not hasattr(ext, name):
        why = (
            f": the CUDA build failed: {_first_error_line(_cuda_build_error)}"
            if name == "cuda" and _cuda_build_error
            else ""
        )
        raise RuntimeError(f"the extension was built without its {name!r} kernels{why}")
    return getattr(ext, name)


def main(argv: list[str]) -> int:
    """The command line (see the module docstring); exit status 1 when CUDA is expected and its part did not build."""
    if argv == ["--cxx-std"]:
        print(cxx_standard())
        return 0
    if argv == ["--nvcc-flags"]:
        print(" ".join(nvcc_flags(with_torch_defaults=True)))
        return 0
    if argv:
        print(f"usage: python -m caprl_core._build [--cxx-std | --nvcc-flags]; got {' '.join(argv)}", file=sys.stderr)
        return 2
    ext = extension()
    parts = [p for p in ("cpu", "cuda") if hasattr(ext, p)]
    print(f"built {ext.__name__} ({', '.join(parts)}) at {ext.__file__}")
    if cuda_expected() and "cuda" not in parts:
        print(f"error: this machine has CUDA but the CUDA kernels did not build:\n{_cuda_build_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
