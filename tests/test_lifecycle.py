"""A run directory's life (`caprl_core.rl.lifecycle`): a resume continues with the run's saved configuration and
refuses flags that would change the run; --resume with nothing to resume is one line (`--resume if-exists` starts
fresh); a directory holding a run is never written into by another (--overwrite clears it first); samples.jsonl is
trimmed on resume like metrics.jsonl; Ctrl-C stops with one line and exit 130, and the resumed run equals the
uninterrupted one; plot.png is redrawn on its cadence and a failing plot never stops training."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caprl_core import train
from caprl_core.rl import state
from caprl_core.rl.progress import TIMING_KEYS

TINY = ["--images-per-step", "2", "--group-size", "3", "--max-new-tokens", "8", "--num-draws", "2",
        "--synthetic-images", "8", "--progress", "false"]  # fmt: skip


def _main(out: Path, *extra: str) -> int:
    return train.main([*TINY, "--output-dir", str(out), *extra])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m caprl_core.train: error: "), err
    return err


def test_resume_keeps_the_runs_configuration_and_refuses_a_change(tmp_path, capsys):
    """The measured bug: a resume ran with the CLI defaults (8 images, lr 1e-4) and rewrote config.json."""
    out = tmp_path / "run"
    assert _main(out, "--lr", "2e-4", "--images-per-step", "2", "--group-size", "4", "--steps", "2") == 0
    # only options typed count, and a typed value equal to the saved one is fine
    assert train.main(["--output-dir", str(out), "--resume", "--steps", "3", "--lr", "2e-4"]) == 0
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2]["update_images"] == 2 and rows[2]["lr"] == pytest.approx(2e-4), rows[2]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["rollout"]["images_per_step"], saved["rollout"]["group_size"]) == (2, 4)
    assert (saved["optim"]["lr"], saved["steps"]) == (2e-4, 3)  # --steps may change, and is recorded
    assert _rows(out / "resumes.jsonl")[0]["changed"] == {"steps": [2, 3]}
    capsys.readouterr()

    before = (out / "config.json").read_bytes()
    assert train.main(["--output-dir", str(out), "--resume", "--images-per-step", "4", "--steps", "3"]) == 2
    err = _one_error_line(capsys)
    assert "--images-per-step 4: the run in" in err and "started with --images-per-step 2" in err, err
    assert (out / "config.json").read_bytes() == before  # never rewritten before the checks pass


def test_which_options_a_resume_may_change(tmp_path):
    """Without training: a saved configuration, and what a resume makes of options given over it."""
    from caprl_core.config import TrainConfig
    from caprl_core.resume import ResumeError
    from caprl_core.rl.lifecycle import resumed_config

    saved = TrainConfig()
    saved.optim.lr, saved.model.policy = 2e-4, "tiny-random"
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    config = resumed_config(tmp_path, {"steps": 500, "keep_last": 1, "lr": 2e-4, "output_dir": "elsewhere"})
    assert (config.steps, config.log.keep_last, config.optim.lr) == (500, 1, 2e-4)
    assert config.log.output_dir == str(tmp_path)  # where the run is now
    with pytest.raises(ResumeError, match="^--seed 1: the run in .* was started with --seed 0"):
        resumed_config(tmp_path, {"seed": 1})
    saved.optim.schedule = "cosine"  # its decay ends at --steps: another length changes the steps to come
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    with pytest.raises(ResumeError, match="^--steps 500: .*cosine schedule"):
        resumed_config(tmp_path, {"steps": 500})


@pytest.mark.parametrize("where", ["missing", "empty", "no-checkpoint"])
def test_resume_with_nothing_to_resume_is_one_line_unless_if_exists(where, tmp_path, capsys):
    out = tmp_path / "run"
    if where != "missing":
        out.mkdir()
    if where == "no-checkpoint":  # a run that stopped before its first checkpoint
        (out / "checkpoints").mkdir()
    assert _main(out, "--resume", "--steps", "1") == 2
    err = _one_error_line(capsys)
    assert f"--resume: {out} " in err and "nothing to resume" in err, err
    assert not (out / "metrics.jsonl").exists()
    if where == "empty":  # for schedulers: a fresh run when there is nothing to resume
        assert _main(out, "--resume", "if-exists", "--steps", "1") == 0
        assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [0]


def test_a_run_directory_is_never_mixed_with_another_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(out, "--steps", "2", "--checkpoint-every", "1", "--sample-every", "1") == 0
    capsys.readouterr()
    metrics = (out / "metrics.jsonl").read_bytes()
    assert _main(out, "--steps", "1") == 2
    err = _one_error_line(capsys)
    assert f"--output-dir {out}: already holds a run" in err and "--resume" in err and "--overwrite" in err, err
    assert (out / "metrics.jsonl").read_bytes() == metrics

    (out / "notes.txt").write_text("not the run's\n")
    assert _main(out, "--steps", "1", "--checkpoint-every", "1", "--sample-every", "1", "--overwrite") == 0
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [0]
    assert [r["step"] for r in _rows(out / "samples.jsonl")] == [0, 0]  # two images' samples, of this run only
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000000"]
    assert (out / "notes.txt").exists()  # --overwrite deletes the run's files and nothing else

    model_dir = tmp_path / "model"  # e.g. a Hugging Face model directory given as --output-dir by mistake
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "qwen2"}\n')
    capsys.readouterr()
    assert _main(model_dir, "--steps", "1", "--overwrite") == 2
    assert "is not a training run's configuration" in _one_error_line(capsys)
    assert (model_dir / "config.json").exists()


def test_samples_are_trimmed_on_resume_like_metrics(tmp_path):
    out = tmp_path / "run"
    assert _main(out, "--steps", "3", "--checkpoint-every", "1", "--sample-every", "1") == 0
    samples = (out / "samples.jsonl").read_text()
    shutil.rmtree(out / "checkpoints" / "step-000002")  # as if the run had stopped after its step-1 checkpoint
    (out / "checkpoints" / "latest").write_text("step-000001\n")
    assert _main(out, "--resume", "--steps", "3", "--checkpoint-every", "1", "--sample-every", "1") == 0
    assert [r["step"] for r in _rows(out / "samples.jsonl")] == [0, 0, 1, 1, 2, 2]
    assert (out / "samples.jsonl").read_text() == samples  # step 2 written again, the same captions


def test_plot_is_redrawn_on_its_cadence_and_a_failing_plot_never_stops_training(tmp_path, monkeypatch, capsys):
    from caprl_core import plot

    drawn: list[int] = []

    def failing_plot(metrics_path, out_png):
        drawn.append(len(_rows(Path(metrics_path))))
        raise RuntimeError("no disk left")

    monkeypatch.setattr(plot, "plot_metrics", failing_plot)
    assert _main(tmp_path / "every2", "--steps", "3", "--checkpoint-every", "1", "--plot-every", "2") == 0
    assert drawn == [2, 3]  # after step 1, and at exit
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "plot.png not drawn" in ln]
    assert len(warnings) == 1 and "no disk left" in warnings[0], warnings
    drawn.clear()
    assert _main(tmp_path / "default", "--steps", "3", "--checkpoint-every", "2") == 0
    assert drawn == [2, 3, 3]  # at each checkpoint (steps 1 and 2), and at exit


def _command(out: Path, *extra: str) -> list[str]:
    small = [*TINY, "--steps", "5", "--checkpoint-every", "1", "--sample-every", "1"]
    return [sys.executable, "-m", "caprl_core.train", *small, "--output-dir", str(out), *extra]


@pytest.mark.slow  # three runs in their own processes: 45 s alone, 196 s on the loaded shared 2-core machine
def test_ctrl_c_stops_cleanly_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean"
    done = subprocess.run(_command(clean), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "interrupted"
    after = random.randint(1, 2)  # checkpointed steps before Ctrl-C; the run has 5, so it is still training
    proc = subprocess.Popen(_command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    latest, deadline = out / "checkpoints" / "latest", time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:  # until step `after - 1` is checkpointed
        if latest.exists() and latest.read_text().strip() >= f"step-{after - 1:06d}":
            break
        time.sleep(0.05)
    time.sleep(random.uniform(0, 0.5))  # somewhere inside the next step
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (after, stderr)
    assert "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"\[caprl_core\.train\] interrupted at step (\d+); last checkpoint: (\S+); resume with: "
                         rf"python -m caprl_core\.train --output-dir {re.escape(str(out))} --resume", line)  # fmt: skip
    assert match, line
    step = int(match.group(1))  # the step in progress, abandoned; Ctrl-C in a checkpoint write: that step's
    assert step >= after - 1 and match.group(2)[-6:] in (f"{step - 1:06d}", f"{step:06d}"), line
    assert (out / "plot.png").stat().st_size > 1000

    resumed = subprocess.run(_command(out, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert [_stable(r) for r in _rows(out / "metrics.jsonl")] == [_stable(r) for r in _rows(clean / "metrics.jsonl")]
    assert (out / "samples.jsonl").read_text() == (clean / "samples.jsonl").read_text()


def test_print_config_with_resume_prints_what_the_resume_would_run(tmp_path, capsys):
    """It used to print the command line's configuration (CLI defaults) instead of the run's saved one."""
    out = tmp_path / "run"
    assert _main(out, "--lr", "2e-4", "--steps", "1") == 0
    capsys.readouterr()
    assert train.main(["--output-dir", str(out), "--resume", "--steps", "3", "--print-config"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert (printed["optim"]["lr"], printed["steps"], printed["rollout"]["images_per_step"]) == (2e-4, 3, 2)
    assert captured.err.startswith("# resumed: the saved configuration of"), captured.err
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [0]  # printed, nothing run
    assert json.loads((out / "config.json").read_text())["steps"] == 1
    # a change the resume would refuse is refused with --print-config too
    assert train.main(["--output-dir", str(out), "--resume", "--lr", "1e-3", "--print-config"]) == 2
    assert "--lr 0.001: the run in" in _one_error_line(capsys)


def test_a_resume_that_cannot_load_its_checkpoint_leaves_config_json_alone(tmp_path, capsys, monkeypatch):
    """setup() used to write the resumed configuration (here --steps 3) before the checkpoint's optimizer loaded."""
    out = tmp_path / "run"
    assert _main(out, "--steps", "1") == 0
    before = (out / "config.json").read_text()

    def unreadable(path, **kwargs):  # a checkpoint that passes the completeness check and fails to load
        raise ValueError("trainer_state/optimizer.safetensors: damaged")

    monkeypatch.setattr(state, "load_checkpoint", unreadable)
    capsys.readouterr()
    assert train.main(["--output-dir", str(out), "--resume", "--steps", "3"]) == 2
    assert "--resume: " in _one_error_line(capsys)
    assert (out / "config.json").read_text() == before
    assert not (out / "resumes.jsonl").exists()


@pytest.mark.slow  # two torchrun launches: about a minute on the loaded shared 2-core machine
def test_ctrl_c_under_torchrun_is_one_line_and_the_run_resumes(tmp_path):
    """A terminal's Ctrl-C reaches torchrun and both ranks. A rank blocked in a collective used to fail with gloo's
    "Connection closed by peer" traceback once the other had left; now rank 0 prints the one line and no rank a
    traceback (torchrun itself still reports the signal in its own words and exits 1). Whether a rank is inside a
    collective at that moment is up to timing (the test above pins that case down in one process)."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "caprl_core.train", "--policy", "tiny-random", "--reader", "tiny-random", *TINY[:-2],
                "--checkpoint-every", "1", "--progress", "false", "--output-dir", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*torchrun, "--steps", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)  # fmt: skip
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground process group
    _, stderr = proc.communicate(timeout=300)
    ours = [line for line in stderr.splitlines() if line.startswith("[caprl_core.train] interrupted at step")]
    assert len(ours) == 1 and "--resume" in ours[0], stderr
    assert not [line for line in stderr.splitlines() if line.startswith("[rank")], stderr  # no rank's traceback
    done = subprocess.run([*torchrun, "--steps", str(len(_rows(metrics)) + 1), "--resume"], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    steps = [r["step"] for r in _rows(metrics)]
    assert steps == list(range(len(steps))), steps


def test_an_error_caused_by_ctrl_c_ends_the_run_like_ctrl_c(tmp_path, monkeypatch, capsys):
    """What a torchrun rank sees when the other rank left first on the same Ctrl-C: the KeyboardInterrupt inside a
    collective becomes the collective's own error (gloo: "Connection closed by peer"). It is the Ctrl-C: one line,
    exit 130, no traceback. The same error without a SIGINT is a real failure and propagates."""
    from caprl_core.rl.step import Run

    real_step = Run.step

    def step_interrupted_in_a_collective(self, step):
        if step == 1:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler raises KeyboardInterrupt here
            finally:
                raise RuntimeError("gloo: Connection closed by peer")  # noqa: B012 - the collective's cleanup
        return real_step(self, step)

    monkeypatch.setattr(Run, "step", step_interrupted_in_a_collective)
    out = tmp_path / "run"
    assert _main(out, "--steps", "3", "--checkpoint-every", "1") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("[caprl_core.train] interrupted at step 1; last checkpoint:"), err
    assert not any("Traceback" in line or "RuntimeError" in line for line in err), err

    def step_failing(self, step):
        raise RuntimeError("gloo: Connection closed by peer")

    monkeypatch.setattr(Run, "step", step_failing)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        _main(tmp_path / "other", "--steps", "1")
