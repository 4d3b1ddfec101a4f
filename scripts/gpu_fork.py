"""The dry run's step runner (scripts/gpu_check.py --dry-run): each step runs in a fork of a process that has already
imported torch, transformers and pytest, instead of in a fresh interpreter.

Why: on the 2-core machine a fresh `python -m ...` spent most of each dry-run step importing them (12 steps took
72-87 s at load average ~4, 52 s of CPU time, mostly imports). The step still runs in a process of its own, with its
own environment, output and timeout (the fork is killed when it runs past it), and its exit status decides the step.
Only for the dry run: on the GPU machine every step is a fresh subprocess (a CUDA context does not survive a fork,
and compute-sanitizer wraps a command line). The parent hides the GPU before importing anything, so no CUDA context
exists when it forks.
"""

from __future__ import annotations

import importlib
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ("torch", "transformers", "pytest", "caprl_core.ops", "caprl_core.models", "caprl_core.sampler.engine")


def available() -> bool:
    """Whether this platform can fork (POSIX)."""
    return hasattr(os, "fork")


def preload() -> None:
    """Import what every step needs, once, in the parent. CPU only: the GPU is hidden before torch loads."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: before any Triton kernel is defined
    for module in PRELOAD:
        importlib.import_module(module)


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)  # SystemExit("message"): Python prints it and exits 1
    return 1


def _child(command: list[str], env: dict[str, str], log_fd: int) -> None:
    """Runs `python -m MODULE ARGS` or `python -c CODE` in this (forked) process, output to log_fd; never returns."""
    code = 1
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # New streams on fds 1 and 2: the parent's sys.stdout may be anything (pytest's capture, a pipe's buffer).
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(ROOT)
        os.environ.update(env)
        sys.path.insert(0, str(ROOT))
        flag, target, args = command[1], command[2], command[3:]
        sys.argv = [target, *args]
        try:
            if flag == "-m":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout_s: float) -> int | None:
    """The exit code of child `pid`, or None after killing it when it ran past timeout_s."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def run_forked(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[str, int | None, str]:
    """(status, exit code, output) of a `[sys.executable, "-m" | "-c", ...]` command run in a fork."""
    if len(command) < 3 or command[0] != sys.executable or command[1] not in ("-m", "-c"):
        raise ValueError(f"command: the fork runner takes [python, -m|-c, ...], got {command}")
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as log:
        pid = os.fork()
        if pid == 0:
            _child(command, env, log.fileno())
        code = _wait(pid, timeout_s)
        log.seek(0)
        output = log.read().decode(errors="replace")
    status = "timeout" if code is None else "passed" if code == 0 else "failed"
    return status, code, output
