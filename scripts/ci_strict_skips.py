"""pytest plugin for CI: every skip fails the run unless its reason is on the allow-list below.

On the CI machine every backend that tests/conftest.py lists for the device must run (the C++ extension built,
Triton importable) and every test dependency must import. A skip there means the build or the install is broken,
and without this plugin it would hide under a green run: e.g. a module-level `pytest.importorskip("trl", reason=...)`
would skip the whole TRL suite the day TRL stopped importing. So a skip passes only when its reason matches one of
ALLOWED, each a skip by design with the reason it is harmless. Tests marked `gpu` are deselected on CPU machines,
not skipped, so they are unaffected. `make gpu-check` loads this plugin too.

Use: python -m pytest -p scripts.ci_strict_skips   (.ci/run does; run from the repository root)
"""

from __future__ import annotations

import re

import pytest

# Skips by design, matched against the skip's reason with re.search.
ALLOWED = (
    # tests/conftest.py: a backend that has no kernel for an op on purpose (the CUDA backend has no token_logprobs).
    re.compile(r"backend has no kernel for \w+ \(by design\)"),
    # bench/: a benchmark row for the other kind of machine, or one whose timing would mean nothing on this one.
    re.compile(r"runs on (a GPU|the CPU) only"),
    re.compile(r"bf16 matmuls run ~80x slower than fp32 on this CPU"),
    re.compile(r"triton on CPU runs under the interpreter"),
)

_refused: list[str] = []


def allowed(reason: str) -> bool:
    """Whether a skip with this reason is one of the skips by design in ALLOWED."""
    return any(pattern.search(reason) for pattern in ALLOWED)


def _reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):  # (file, line, "Skipped: <reason>")
        return str(report.longrepr[2])
    return str(report.longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and not allowed(_reason(report)):
        _refused.append(f"{report.nodeid}: {_reason(report)}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module-level skip (importorskip at the top of a file) skips the whole file at collection."""
    if report.skipped and not allowed(_reason(report)):
        _refused.append(f"{report.nodeid}: {_reason(report)}")


def pytest_terminal_summary(terminalreporter) -> None:
    if _refused:
        terminalreporter.section("ci_strict_skips: skips not on the allow-list (scripts/ci_strict_skips.py)", red=True)
        for line in _refused:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # NO_TESTS_COLLECTED too: a file skipped whole at collection leaves nothing to run.
    if _refused and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
