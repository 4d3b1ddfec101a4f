"""caprl_core._build: where CUDA is present, a failed CUDA build is reported with the compiler's error and fails
`python -m caprl_core._build` (the CPU kernels stay usable); the nvcc flags of the build and of `make nvcc-check`
come from one file.

Run: pytest tests/test_build.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

from caprl_core import _build

ROOT = Path(__file__).resolve().parent.parent
NVCC_OUTPUT = """Error building extension 'caprl_ext_0123':
[1/3] nvcc -c csrc/cuda/mcq_rewards.cu
csrc/cuda/mcq_rewards.cu(42): error: identifier "lse" is undefined
ninja: build stopped: subcommand failed."""


@pytest.fixture
def failing_cuda_build(monkeypatch):
    """A machine where CUDA is expected and its part fails to compile; the CPU part builds as usual."""
    real_build = _build._build

    def build(with_cuda: bool):
        if with_cuda:
            raise RuntimeError(NVCC_OUTPUT)
        return real_build(with_cuda=False)

    monkeypatch.setattr(_build, "_build", build)
    monkeypatch.setattr(_build, "cuda_expected", lambda: True)
    monkeypatch.setattr(_build, "_cuda_build_error", None)
    _build.extension.cache_clear()
    yield
    _build.extension.cache_clear()  # the next caller gets the real extension again


def test_failed_cuda_build_names_the_compiler_error(failing_cuda_build):
    with pytest.warns(UserWarning, match='error: identifier "lse" is undefined'):
        ext = _build.extension()
    assert hasattr(ext, "cpu") and not hasattr(ext, "cuda")  # the CPU kernels stay usable
    with pytest.raises(RuntimeError, match='CUDA build failed: .*identifier "lse" is undefined'):
        _build.load_extension("cuda")


def test_build_command_fails_where_cuda_is_expected_but_did_not_build(failing_cuda_build, capsys):
    with pytest.warns(UserWarning):
        assert _build.main([]) == 1
    err = capsys.readouterr().err
    assert "this machine has CUDA but the CUDA kernels did not build" in err and "ninja: build stopped" in err


def test_build_command_passes_when_every_expected_part_built(capsys):
    assert _build.main([]) == 0
    assert ("(cpu, cuda)" if _build.cuda_expected() else "(cpu)") in capsys.readouterr().out


def test_nvcc_flags_are_the_builds_and_torchs():
    """--use_fast_math and the rest of csrc/cuda/nvcc.flags, after the flags torch's builder adds to every .cu file;
    scripts/nvcc_check.sh compiles with exactly this list."""
    ours = (ROOT / "csrc" / "cuda" / "nvcc.flags").read_text().split()
    assert "--use_fast_math" in ours and _build.nvcc_flags() == ours
    command = [sys.executable, "-m", "caprl_core._build", "--nvcc-flags"]
    printed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert printed == [*COMMON_NVCC_FLAGS, *ours]
    assert '"$PY" -m caprl_core._build --nvcc-flags' in (ROOT / "scripts" / "nvcc_check.sh").read_text()


def test_the_build_key_follows_the_sources_not_where_they_live(tmp_path):
    """Every clone and worktree of the same sources shares one build (issue 23: each clone rebuilt, ~2 min)."""
    import shutil

    copy = tmp_path / "elsewhere" / "csrc"
    shutil.copytree(_build.CSRC, copy)
    flags = ["-O3"]
    assert _build._name(False, flags, copy) == _build._name(False, flags, _build.CSRC)
    assert _build._name(True, flags, copy) == _build._name(True, flags, _build.CSRC)
    (copy / "cpu" / "token_logprobs.cpp").write_text((copy / "cpu" / "token_logprobs.cpp").read_text() + "\n// edit\n")
    assert _build._name(False, flags, copy) != _build._name(False, flags, _build.CSRC)
    assert _build._name(False, ["-O2"], _build.CSRC) != _build._name(False, flags, _build.CSRC)


def test_a_build_announces_itself_and_a_cached_one_is_silent(tmp_path, monkeypatch, capsys):
    """The first build says what takes time; loading a cached build prints nothing. torch's load is replaced by a
    stand-in that records what it was asked to compile: the sources come from the staged copy in the build dir."""
    cpp_extension = _build.quiet_cpp_extension()
    calls = []
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs) or "module")
    (tmp_path / _build._name(False, _build._cpu_flags())).mkdir()
    assert _build._build(with_cuda=False) == "module"
    assert "building the C++ kernels" in capsys.readouterr().err
    stage = Path(calls[0]["build_directory"]) / "src"
    assert all(Path(s).is_relative_to(stage) and Path(s).is_file() for s in calls[0]["sources"])
    assert calls[0]["extra_include_paths"] == [str(stage)]
    (Path(calls[0]["build_directory"]) / f"{calls[0]['name']}.so").write_bytes(b"")
    _build._build(with_cuda=False)
    assert capsys.readouterr().err == ""


def test_no_cuda_runtime_notice_from_torch(caplog):
    """torch logs "No CUDA runtime is found" on a CPU machine with a CUDA toolkit, on every run: dropped."""
    import logging

    _build.quiet_cpp_extension()
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/x")
    assert "No CUDA runtime" not in caplog.text


def test_a_dead_builds_lock_is_removed_instead_of_waited_on(tmp_path, monkeypatch, capsys):
    """torch's FileBaton waits forever on `<build dir>/lock` if a build was killed after taking it (seen here: every
    test that loaded the kernels hung until its timeout). Under our flock no live build holds it, so it goes."""
    cpp_extension = _build.quiet_cpp_extension()
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.append(Path(kwargs["build_directory"])) or "m")
    build_dir = tmp_path / _build._name(False, _build._cpu_flags())
    build_dir.mkdir()
    (build_dir / "lock").write_text("")  # what a SIGKILLed build leaves
    assert _build._build(with_cuda=False) == "m"
    assert f"removing {build_dir / 'lock'}, left by a build that was killed" in capsys.readouterr().err
    assert seen == [build_dir] and not (build_dir / "lock").exists()
