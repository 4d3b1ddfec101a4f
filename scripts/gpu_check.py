"""`make gpu-check`: one command that validates the project on a CUDA machine and leaves a report.

    python -m scripts.gpu_check                # on a GPU machine: ~5-8 minutes
    python -m scripts.gpu_check --dry-run      # on a CPU machine: every step at CPU-sized shapes (CI runs this)

Steps, in order (each a subprocess with its own timeout, all within BUDGET_S):
  facts            GPU, driver, CUDA, torch, triton versions; the card's peaks (scripts/gpu_machine.py)
  build            the C++ extension with its CUDA part (`python -m caprl_core._build` fails without it)
  op_tests         the op tests on CUDA tensors, every backend (torch, triton, cuda) against the reference
  gpu_tests        the `gpu`-marked tests: real shapes (fwd+bwd, bf16/fp32), paged attention, greedy == HF generate,
                   group_advantages' global-memory path
  memcheck_cuda    compute-sanitizer memcheck over each CUDA kernel at small shapes, then racecheck_cuda
  bench_*          token_logprobs GB/s, linear_token_logprobs TFLOP/s (and Liger's), mcq_rewards, paged decode
  train            3 training steps on CUDA, time split
  memcheck_triton  compute-sanitizer memcheck over each Triton kernel (last: Triton compiles under the sanitizer)

A failing or timed-out step is recorded and makes the check exit 1, and the next steps still run; the report is
written whatever happens: bench/results/gpu-check-<time>.json (every step's status, time, output tail and figures)
and a markdown summary beside it. The pytest steps load scripts/ci_strict_skips.py, so a backend skipped because it
did not load fails them. --dry-run runs the same steps with stand-ins where a GPU is needed (pytest collects instead
of running, the kernels run on the CPU backends without compute-sanitizer, the benchmarks at tiny shapes), so the
kit is exercised on every CI run; its steps run in forks of a process that imported torch once (scripts/gpu_fork.py).
--break STEP replaces STEP's command by one that fails (to see the failure path).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scripts import gpu_fork

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480  # the whole check: a GPU machine is lent for minutes, so it must fit in 8
OP_TESTS = ["tests/test_token_logprobs.py", "tests/test_linear_token_logprobs.py", "tests/test_group_advantages.py",
            "tests/test_mcq_rewards.py", "tests/test_backends.py"]  # fmt: skip
# Files holding `gpu`-marked tests: the dry run collects these (on CPU the marked tests are deselected).
GPU_TEST_FILES = [*OP_TESTS[:3], "tests/test_paged_attention.py", "tests/test_engine.py"]
OUTPUT_TAIL = 4000  # characters of a step's output kept in the report


@dataclass(slots=True)
class Step:
    """One step: `command` runs from the repository root; "{result}" in it is replaced by the path of the JSON file
    the step writes its figures to, "{junit}" by a JUnit XML path whose test counts go into the report."""

    name: str
    command: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError(f"Step {self.name!r}: command must not be empty")
        if self.timeout_s <= 0:
            raise ValueError(f"Step {self.name!r}: timeout_s must be > 0, got {self.timeout_s}")


def _pytest(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "scripts.ci_strict_skips",
            "--junitxml={junit}", *args]  # fmt: skip


def _bench(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "scripts.gpu_bench", name, "--result", "{result}", *args]


def find_sanitizer() -> str:
    """compute-sanitizer on PATH, else in the CUDA toolkit ($CUDA_HOME, /usr/local/cuda: bin/ or its own folder);
    the bare name when nowhere, so the step fails saying it could not start it."""
    found = shutil.which("compute-sanitizer")
    homes = [Path(h) for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
    candidates = [home / sub / "compute-sanitizer" for home in homes for sub in ("bin", "compute-sanitizer")]
    return found or next((str(c) for c in candidates if c.is_file()), "compute-sanitizer")


def _sanitized(tool: str, backend: str, dry_run: bool) -> list[str]:
    """compute-sanitizer `tool` over every kernel of `backend`; the dry run runs the same driver on the CPU
    backend, without the sanitizer (there is no GPU to instrument)."""
    if dry_run:
        return _bench("kernels", "--backend", "cpu" if backend == "cuda" else backend)
    return [find_sanitizer(), "--tool", tool, "--error-exitcode", "1", *_bench("kernels", "--backend", backend)]


def plan(dry_run: bool, out_dir: Path) -> list[Step]:
    """The steps of the check, in order (see the module docstring)."""
    tiny = ["--tiny", "--repeats", "1"] if dry_run else []
    collect = ["--collect-only"] if dry_run else []
    # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past its end.
    no_cache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    steps = [
        Step("facts", [sys.executable, "-m", "scripts.gpu_machine", "--result", "{result}"], 60),
        Step("build", [sys.executable, "-m", "caprl_core._build"], 300),
        Step("op_tests", _pytest(*collect, "-m", "not gpu", *OP_TESTS), 240),  # Triton compiles every variant
        Step("gpu_tests", _pytest(*collect, *(GPU_TEST_FILES if dry_run else ["-m", "gpu", "tests"])), 180),
        Step("memcheck_cuda", _sanitized("memcheck", "cuda", dry_run), 120, no_cache),
        Step("racecheck_cuda", _sanitized("racecheck", "cuda", dry_run), 120, no_cache),
        Step("bench_token_logprobs", _bench("token_logprobs", *tiny), 60),
        Step("bench_linear_token_logprobs", _bench("linear_token_logprobs", *tiny), 90),
        Step("bench_mcq_rewards", _bench("mcq_rewards", *tiny), 60),
        Step("bench_decode", _bench("decode", *tiny), 150),
        Step("train", _bench("train", "--out", str(out_dir / "train"), *tiny), 150),
        Step("memcheck_triton", _sanitized("memcheck", "triton", dry_run), 180, no_cache),
    ]
    if dry_run:  # CPU stand-ins even on a GPU machine (the CPU backends refuse CUDA tensors)
        for step in steps:
            step.env = {**step.env, "CUDA_VISIBLE_DEVICES": ""}
    return steps


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-OUTPUT_TAIL:]


def _junit_counts(path: Path) -> dict | None:
    """tests / failures / errors / skipped of a pytest JUnit XML file (None when the step wrote none)."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


# A runner runs a command with extra environment and a timeout -> (status, exit code or None, output).
Runner = Callable[[list[str], dict[str, str], float], tuple[str, "int | None", str]]


def run_subprocess(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[str, int | None, str]:
    """The command in a fresh process from the repository root: passed, failed, or timeout (killed)."""
    try:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        return "timeout", None, _tail(e.stdout) + _tail(e.stderr)
    except OSError as e:  # the command does not exist (e.g. no compute-sanitizer on PATH)
        return "failed", None, f"could not start: {e}"
    return "passed" if done.returncode == 0 else "failed", done.returncode, done.stdout + done.stderr


def run_step(step: Step, work_dir: Path, timeout_s: float, runner: Runner = run_subprocess) -> dict:
    """Runs one step with `timeout_s`; returns its record: status (passed / failed / timeout), exit code, seconds,
    output tail, and the figures or test counts it wrote."""
    result, junit = work_dir / f"{step.name}.json", work_dir / f"{step.name}.xml"
    command = [part.replace("{result}", str(result)).replace("{junit}", str(junit)) for part in step.command]
    record: dict = {"name": step.name, "command": command, "timeout_s": round(timeout_s, 1)}
    start = time.perf_counter()
    status, returncode, output = runner(command, step.env, timeout_s)
    record.update(status=status, returncode=returncode, output_tail=_tail(output))
    record["seconds"] = round(time.perf_counter() - start, 2)
    if result.is_file():
        record["result"] = json.loads(result.read_text())
    counts = _junit_counts(junit)
    if counts is not None:
        record["tests"] = counts
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", record["output_tail"])
    if "--collect-only" in command and collected:  # the dry run's pytest steps: how many tests the GPU run gets
        record["collected"] = int(collected.group(1))
    return record


def run_all(
    steps: list[Step], work_dir: Path, budget_s: float, records: list[dict], runner: Runner = run_subprocess
) -> None:
    """Every step in order, each with the smaller of its timeout and what is left of the budget, appending to
    `records` as it goes (so a crash of the runner itself still leaves what ran); a step with no budget left is
    recorded as skipped_budget (a failure: the check did not run it)."""
    deadline = time.perf_counter() + budget_s
    for step in steps:
        left = deadline - time.perf_counter()
        if left < 1:
            records.append({"name": step.name, "status": "skipped_budget", "seconds": 0.0})
            continue
        print(f"gpu-check: {step.name} ...", file=sys.stderr, flush=True)
        records.append(run_step(step, work_dir, min(step.timeout_s, left), runner))
        print(f"gpu-check: {step.name} {records[-1]['status']} in {records[-1]['seconds']} s", file=sys.stderr)


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """The JSON report and its markdown summary, named by the check's start time."""
    from scripts.gpu_report import summary_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"gpu-check-{report['started']}{'-dry-run' if report['dry_run'] else ''}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2))
    md_path.write_text(summary_markdown(report))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU stand-ins for every step (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the report goes")
    parser.add_argument(
        "--break", dest="broken", action="append", default=[], metavar="STEP",
        help="make STEP fail (repeatable): shows that a failure is recorded and fails the check",
    )  # fmt: skip
    parser.add_argument("--steps", help="comma-separated names: run only these steps (default: all)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="time limit of the whole check")
    args = parser.parse_args(argv)
    started = time.strftime("%Y%m%d-%H%M%S")
    work_dir = args.out / f"gpu-check-{started}-steps"
    work_dir.mkdir(parents=True, exist_ok=True)
    steps = plan(args.dry_run, work_dir)
    names = [s.name for s in steps]
    chosen = names if args.steps is None else args.steps.split(",")
    for option, asked in (("--steps", chosen), ("--break", args.broken)):
        unknown = sorted(set(asked) - set(names))
        if unknown:
            parser.error(f"{option}: no step named {', '.join(unknown)}; steps: {', '.join(names)}")
    steps = [s for s in steps if s.name in chosen]
    for step in steps:
        if step.name in args.broken:
            step.command = [sys.executable, "-c", f"raise SystemExit('{step.name}: broken on purpose (--break)')"]
    start, records, runner = time.perf_counter(), [], run_subprocess
    try:
        if args.dry_run and gpu_fork.available():  # see scripts/gpu_fork.py: fresh interpreters cost ~5 s a step here
            gpu_fork.preload()
            runner = gpu_fork.run_forked
        run_all(steps, work_dir, args.budget_s, records, runner)
    except BaseException as e:  # a bug in the runner or Ctrl-C: still write the report of what ran
        records.append({"name": "runner", "status": "failed", "seconds": 0.0, "output_tail": repr(e)})
    failed = [r["name"] for r in records if r["status"] != "passed"]
    report = {"started": started, "dry_run": args.dry_run, "runner": runner.__name__, "passed": not failed,
              "failed_steps": failed,
              "seconds": round(time.perf_counter() - start, 1), "steps": records}  # fmt: skip
    json_path, md_path = write_report(report, args.out)
    print(f"gpu-check: {'PASSED' if not failed else 'FAILED: ' + ', '.join(failed)} in {report['seconds']} s; "
          f"report {json_path}, summary {md_path}")  # fmt: skip
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
