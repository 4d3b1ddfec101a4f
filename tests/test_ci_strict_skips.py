"""scripts/ci_strict_skips.py (the pytest plugin .ci/run loads): a skip not on its allow-list fails the run, whatever
its reason (an unavailable backend, an import that failed, module-level or not); a skip by design passes; a run that
collects no test fails (pytest's exit code 5).

Run: pytest tests/test_ci_strict_skips.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_pytest(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `body` as a test file in a fresh pytest process with the plugin loaded (from the repository root)."""
    test_file = tmp_path / "test_sample.py"
    test_file.write_text(f"import pytest\n\n\n{body}\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "scripts.ci_strict_skips"]
    return subprocess.run(
        [*command, "--rootdir", str(tmp_path), "-c", "/dev/null", *args, str(test_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        'def test_cpu():\n    pytest.skip("cpu backend unavailable for token_logprobs: the extension did not build")',
        'def test_triton():\n    pytest.importorskip("caprl_core_no_such_module")',
        'def test_trl():\n    pytest.importorskip("caprl_core_no_such_module", reason="x")',
        'no_such = pytest.importorskip("caprl_core_no_such_module", reason="x")\n\n\ndef test_a():\n    pass',
        'def test_other():\n    pytest.skip("needs a GPU with 80 GB")',
    ],
    ids=["backend-unavailable", "importorskip", "importorskip-with-reason", "module-level-importorskip", "other"],
)
def test_skip_for_a_broken_build_fails(tmp_path, body):
    result = run_pytest(tmp_path, body)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ci_strict_skips" in result.stdout


def test_skips_by_design_and_passes_succeed(tmp_path):
    reason = "the cuda backend has no kernel for token_logprobs (by design)"
    body = f'def test_a():\n    pass\n\n\ndef test_b():\n    pytest.skip("{reason}")'
    result = run_pytest(tmp_path, body)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_tests_collected_fails(tmp_path):
    result = run_pytest(tmp_path, "def test_a():\n    pass", "-k", "no_such_test")
    assert result.returncode == pytest.ExitCode.NO_TESTS_COLLECTED != 0, result.stdout + result.stderr
