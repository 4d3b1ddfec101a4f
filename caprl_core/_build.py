"""Build and load the C++ extension (csrc/) with PyTorch's JIT extension tooling.

Why JIT rather than at install time: `pip install` of a torch extension needs torch inside pip's isolated build
environment, and an unpinned torch there pulls a multi-GB CUDA build even on CPU machines; a JIT build uses the
torch already installed, compiles once (about a minute) into the torch extensions cache (TORCH_EXTENSIONS_DIR),
and is reused afterwards. The cache key includes the compile flags, so a change of CPU features rebuilds. It does not
include where the checkout lives: the sources are first copied into the build directory (`<key>/src`) and compiled
from there, so every clone and worktree of the same sources shares one build (torch's build.ninja names sources by
absolute path, so compiling them in place made each checkout rebuild, ~2 min on 2 cores). A build announces itself
on stderr; a cached one loads silently.

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

import contextlib
import fcntl
import hashlib
import inspect
import logging
import os
import re
import shutil
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

    found = re.findall(r"-std=c\+\+(\d+)", inspect.getsource(quiet_cpp_extension()))
    return f"c++{max(int(v) for v in found)}" if found else "c++17"


def nvcc_flags(with_torch_defaults: bool = False) -> list[str]:
    """Our nvcc flags (csrc/cuda/nvcc.flags); with `with_torch_defaults`, preceded by the ones torch's builder adds
    to every .cu compile (e.g. -D__CUDA_NO_HALF_OPERATORS__, --expt-relaxed-constexpr), i.e. the full set the JIT
    build compiles with apart from -std and the -gencode of the local GPU."""
    ours = (CSRC / "cuda" / "nvcc.flags").read_text().split()
    if not with_torch_defaults:
        return ours
    return [*quiet_cpp_extension().COMMON_NVCC_FLAGS, *ours]


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


SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh", ".flags")


def _sources(with_cuda: bool, root: Path = CSRC) -> list[Path]:
    """The files compiled (under `root`): the binding file, the CPU kernels, and with CUDA the CUDA ones."""
    sources = [root / "bindings.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        sources += sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cpp"))
    return sources


def _name(with_cuda: bool, flags: list[str], root: Path = CSRC) -> str:
    """Extension name keyed on the sources' contents and their paths inside csrc/ (headers included), the flags,
    torch and Python versions, so an edit, another CPU or another torch never loads a stale build from the shared
    cache; and not on where csrc/ lives, so that every checkout of the same sources shares one build."""
    digest = hashlib.sha1()
    headers = sorted(root.rglob("*.h"))  # included, not compiled: part of the key all the same
    for path in [*_sources(with_cuda, root), *headers]:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(f"{torch.__version__} {sys.version_info[:2]}".encode())
    return "caprl_ext_" + digest.hexdigest()[:12]


def _staged(build_dir: Path) -> Path:
    """csrc/ copied to `build_dir`/src (once: the name keys the contents), compiled from there so that the absolute
    paths in torch's build.ninja are the same for every checkout. The copy is made beside it and renamed into place,
    so a concurrent build never compiles a half-copied tree."""
    stage = build_dir / "src"
    if not stage.is_dir():
        tmp = build_dir / f"src.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(CSRC, tmp, ignore=lambda d, names: [n for n in names if not _is_source(Path(d) / n)])
        try:
            os.replace(tmp, stage)
        except OSError:  # another process staged the same sources first
            shutil.rmtree(tmp, ignore_errors=True)
    return stage


def _is_source(path: Path) -> bool:
    return path.is_dir() or path.suffix in SOURCE_SUFFIXES


def _build(with_cuda: bool) -> ModuleType:
    cpp_extension = quiet_cpp_extension()
    cflags = _cpu_flags() + (["-DCAPRL_WITH_CUDA"] if with_cuda else [])
    cuda_flags = nvcc_flags() if with_cuda else []
    name = _name(with_cuda, cflags + cuda_flags)
    verbose = os.environ.get("CAPRL_BUILD_VERBOSE", "0") != "0"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose))  # torch's: TORCH_EXTENSIONS_DIR/<name>
    with _build_lock(build_dir):
        stage = _staged(build_dir)
        if not any(build_dir.glob(f"{name}*.so")):
            print(f"caprl_core: building the C++ kernels{' with CUDA' if with_cuda else ''}, once for these sources "
                  f"(about a minute or two on 2 cores) into {build_dir}", file=sys.stderr, flush=True)  # fmt: skip
        return cpp_extension.load(
            name=name,
            sources=[str(s) for s in _sources(with_cuda, stage)],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags or None,  # no -std: torch adds its own
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(stage)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            verbose=verbose,
        )


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One build per directory at a time, and no wait on a dead build. torch's own lock is a plain file (`<dir>/lock`)
    that a build killed mid-way (Ctrl-C, SIGKILL, a test's timeout) leaves behind, and every later process then waits
    on it forever. This flock is released by the kernel when its holder exits however it exits, so while we hold it
    no live build of ours is running there and a `lock` file found is a dead one's: it is removed, with a word."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "caprl.flock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"caprl_core: waiting for another process that is building the same C++ kernels ({build_dir})",
                  file=sys.stderr, flush=True)  # fmt: skip
            fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            print(f"caprl_core: removing {stale}, left by a build that was killed", file=sys.stderr, flush=True)
            stale.unlink(missing_ok=True)
        yield


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." warning: on a CPU machine with a CUDA toolkit
    (nvcc for the compile check) it said nothing useful, on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without its CUDA-runtime notice (see _NoCudaRuntimeNotice)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())
    from torch.utils import cpp_extension

    return cpp_extension


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
