"""scripts/gpu_check.py (`make gpu-check`): the dry run invokes every step and writes the report; a failing, timed-out
or unreached step fails the check, is recorded as such, and the steps after it still run. The card-peak table.

Run: pytest tests/test_gpu_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import gpu_check, gpu_fork
from scripts.gpu_machine import card_peaks
from scripts.gpu_report import summary_markdown

ROOT = Path(__file__).resolve().parent.parent


def run_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """`python -m scripts.gpu_check --dry-run --out OUT ARGS` -> (process, JSON report, markdown summary)."""
    command = [sys.executable, "-m", "scripts.gpu_check", "--dry-run", "--out", str(out), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    (report_path,) = out.glob("gpu-check-*.json")  # exactly one report, whatever the outcome
    return done, json.loads(report_path.read_text()), report_path.with_suffix(".md").read_text()


def test_dry_run_invokes_every_step_and_writes_the_report(tmp_path):
    done, report, summary = run_check(tmp_path)
    names = [s.name for s in gpu_check.plan(True, tmp_path)]
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["passed"] and report["dry_run"] and report["failed_steps"] == []
    assert report["runner"] == "run_forked"
    assert [r["name"] for r in report["steps"]] == names
    assert all(r["status"] == "passed" and r["returncode"] == 0 for r in report["steps"])
    steps = {r["name"]: r for r in report["steps"]}
    assert steps["facts"]["result"]["torch"] and steps["facts"]["result"]["peaks"]["source"] == "no CUDA device"
    assert steps["op_tests"]["collected"] > 100 and steps["gpu_tests"]["collected"] > 100
    assert len(steps["train"]["result"]["steps"]) == 3 and "time_update" in steps["train"]["result"]["steps"][-1]
    for backend, name in [("cpu", "memcheck_cuda"), ("triton", "memcheck_triton")]:
        assert steps[name]["result"]["backend"] == backend and steps[name]["result"]["kernels_s"]
    assert steps["bench_decode"]["result"]["batch_4"]["engine"]["decode_tokens_per_s"] > 0
    assert "PASSED" in summary and all(f"| {n} | passed |" in summary for n in names)


def test_a_failing_step_fails_the_check_and_the_next_steps_still_run(tmp_path):
    done, report, summary = run_check(tmp_path, "--steps", "facts,build,bench_mcq_rewards", "--break", "build")
    assert done.returncode == 1, done.stdout + done.stderr
    assert not report["passed"] and report["failed_steps"] == ["build"]
    statuses = {r["name"]: r["status"] for r in report["steps"]}
    assert statuses == {"facts": "passed", "build": "failed", "bench_mcq_rewards": "passed"}
    build = next(r for r in report["steps"] if r["name"] == "build")
    assert build["returncode"] == 1 and "broken on purpose" in build["output_tail"]
    assert "FAILED (build)" in summary and "FAILED: build" in done.stdout


def test_unknown_step_names_are_an_error_naming_the_option(tmp_path):
    command = [sys.executable, "-m", "scripts.gpu_check", "--dry-run", "--out", str(tmp_path), "--break", "nope"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--break: no step named nope" in done.stderr


def test_a_step_past_its_timeout_is_killed_and_recorded(tmp_path):
    step = gpu_check.Step("sleepy", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                          timeout_s=60)  # fmt: skip
    record = gpu_check.run_step(step, tmp_path, timeout_s=2)
    assert record["status"] == "timeout" and record["seconds"] < 30 and record["returncode"] is None


def test_forked_steps_keep_their_exit_code_environment_and_timeout(tmp_path):
    """The dry run's runner: a fork per step, with its own output, environment and timeout."""
    code = "import os, sys; print(os.environ['STEP_VAR']); sys.exit(3)"
    status, returncode, output = gpu_fork.run_forked([sys.executable, "-c", code], {"STEP_VAR": "seen"}, 30)
    assert (status, returncode, output.strip()) == ("failed", 3, "seen")
    assert "STEP_VAR" not in os.environ  # the parent's environment is untouched
    status, returncode, _ = gpu_fork.run_forked([sys.executable, "-c", "import time; time.sleep(60)"], {}, 1)
    assert (status, returncode) == ("timeout", None)
    with pytest.raises(ValueError, match="^command:"):
        gpu_fork.run_forked(["compute-sanitizer", "python"], {}, 1)


def test_steps_beyond_the_budget_are_recorded_as_not_run(tmp_path):
    steps = [gpu_check.Step(name, [sys.executable, "-c", "pass"], 10) for name in ("first", "second")]
    records: list[dict] = []
    gpu_check.run_all(steps, tmp_path, budget_s=0, records=records)
    assert [r["status"] for r in records] == ["skipped_budget", "skipped_budget"]


def test_a_command_that_cannot_start_is_a_failure(tmp_path):
    record = gpu_check.run_step(gpu_check.Step("missing", ["/no/such/compute-sanitizer"], 10), tmp_path, 10)
    assert record["status"] == "failed" and "could not start" in record["output_tail"]


@pytest.mark.parametrize(
    "name, bandwidth, tflops",
    [("NVIDIA H100 80GB HBM3", 3350, 989), ("NVIDIA H100 PCIe", 2000, 756), ("NVIDIA H200", 4800, 989),
     ("NVIDIA GH200 480GB", 4000, 989), ("NVIDIA A100-SXM4-80GB", 2039, 312), ("NVIDIA A100-SXM4-40GB", 1555, 312)],
)  # fmt: skip
def test_card_peaks_by_device_name(name, bandwidth, tflops):
    assert card_peaks(name) == {"name": name, "bandwidth_gbs": bandwidth, "bf16_tflops": tflops, "source": "table"}


def test_unknown_card_falls_back_without_a_bf16_peak():
    peaks = card_peaks("NVIDIA Future GPU")
    assert peaks["bf16_tflops"] is None and peaks["source"].startswith("fallback")


def test_summary_names_the_failed_steps():
    report = {"started": "x", "dry_run": False, "passed": False, "failed_steps": ["gpu_tests"], "seconds": 1.0,
              "steps": [{"name": "gpu_tests", "status": "failed", "seconds": 1.0,
                         "tests": {"tests": 9, "failures": 2, "errors": 0, "skipped": 0}}]}  # fmt: skip
    text = summary_markdown(report)
    assert (
        "FAILED (gpu_tests)" in text and "| gpu_tests | failed | 1.0 | 9 tests, 2 failed, 0 errors, 0 skipped |" in text
    )
