"""pytest plugin for CI: a test skipped because an op backend or a module cannot be loaded fails the run.

On the CI machine every backend that tests/conftest.py lists for the device must run (the C++ extension built,
Triton importable) and the test dependencies must import. A skip there means the build or the install is broken, and
without this plugin it would hide under a green run, e.g. after a torch upgrade breaks the extension or Triton.
Other skips are left alone (a test may legitimately skip for reasons of its own), among them a backend that has no
kernel for an op by design ("the cuda backend has no kernel for token_logprobs (by design)"). Tests marked `gpu` are
deselected on CPU machines, not skipped, so they are unaffected. On a GPU machine tests/conftest.py fails (does not
skip) a Triton or CUDA backend that does not load; `make gpu-check` loads this plugin too.

Use: python -m pytest -p scripts.ci_strict_skips   (.ci/run does; run from the repository root)
"""

from __future__ import annotations

import re

import pytest

# tests/conftest.py: "<name> backend unavailable for <op>: <why>"; pytest.importorskip without a reason:
# "could not import '<module>': ...".
BROKEN = re.compile(r"backend unavailable|could not import", re.IGNORECASE)

_broken: list[str] = []


def _reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):  # (file, line, "Skipped: <reason>")
        return str(report.longrepr[2])
    return str(report.longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and BROKEN.search(_reason(report)):
        _broken.append(f"{report.nodeid}: {_reason(report)}")


def pytest_terminal_summary(terminalreporter) -> None:
    if _broken:
        terminalreporter.section("ci_strict_skips: skips that mean a broken build or install", red=True)
        for line in _broken:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _broken and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
