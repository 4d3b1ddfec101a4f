"""`--report-to tensorboard,wandb` (caprl_core.rl.report): TensorBoard event files read back with TensorBoard's own
reader, a W&B offline run directory (WANDB_MODE=offline: no network), a missing package as one line naming the
install command, and a short training run whose every numeric metric reaches both, beside metrics.jsonl.

Run: pytest tests/test_report_to.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from caprl_core.config import TrainConfig
from caprl_core.config_cli import parse_config
from caprl_core.rl import report

pytest.importorskip("tensorboard", reason="the test extra installs it: pip install -e '.[test]'")
pytest.importorskip("wandb", reason="the test extra installs it: pip install -e '.[test]'")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

STEPS = [{"step": 0, "reward_mean": 0.25, "tokens": 12, "shared": True, "note": None},
         {"step": 1, "reward_mean": 0.5, "tokens": 15, "shared": True, "note": None}]  # fmt: skip


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_NAME", raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def _config(report_to: str) -> TrainConfig:
    config = TrainConfig()
    config.log.report_to = report_to
    return config


def test_tensorboard_events_hold_every_numeric_metric(tmp_path):
    reporters = report.Reporters(_config("tensorboard"), tmp_path)
    for metrics in STEPS:
        reporters.log(metrics)
    reporters.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"reward_mean", "tokens"}  # bools and None are not scalars; the step is the x axis
    assert scalars["reward_mean"] == [(0, 0.25), (1, 0.5)] and scalars["tokens"] == [(0, 12.0), (1, 15.0)]


def test_wandb_offline_writes_a_run_directory_under_wandb_dir(tmp_path, offline_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    reporters = report.Reporters(_config("wandb"), tmp_path / "run")
    for metrics in STEPS:
        reporters.log(metrics)
    reporters.close()
    runs = list((tmp_path / "elsewhere" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), runs
    assert not (tmp_path / "run" / "wandb").exists()


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    from caprl_core.train import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    with pytest.raises(report.ReportError, match=r"pip install 'caprl-core\[tensorboard\]'"):
        report.require("tensorboard")
    out = tmp_path / "run"
    assert main(["--report-to", "tensorboard", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'caprl-core[tensorboard]'" in err[0], err
    assert not out.exists()  # refused before any model loads or the run directory is made


@pytest.mark.parametrize("value", ["tensorbored", "none,wandb", "wandb,"])
def test_bad_report_to_names_the_flag(value):
    with pytest.raises(ValueError, match=re.escape("--report-to: one of none|tensorboard|wandb or a comma list")):
        parse_config(["--report-to", value])


def test_a_training_run_reports_to_both_beside_metrics_jsonl(tmp_path, offline_wandb):
    """2 steps with --report-to tensorboard,wandb: metrics.jsonl as always, every numeric metric of every step in the
    TensorBoard events at its step, and W&B's offline run under RUN_DIR/wandb."""
    from caprl_core.train import main

    out = tmp_path / "run"
    argv = ["--steps", "2", "--images-per-step", "2", "--group-size", "3", "--max-new-tokens", "8", "--num-draws", "2",
            "--synthetic-images", "4", "--progress", "false", "--output-dir", str(out),
            "--report-to", "tensorboard,wandb", "--wandb-project", "caprl-test"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    scalars = _scalars(out / "tensorboard")
    for row in rows:
        for key, value in report.scalars(row).items():
            assert (row["step"], pytest.approx(value, rel=1e-6, nan_ok=True)) in scalars[key], key
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), runs
