"""examples/: every config file resolves to a valid configuration under `python -m caprl_core.train --config`, and
the Python example trains through the API and scores captions with the reader's own prompt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from caprl_core.config_cli import parse_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "examples").glob("*.toml"))


def test_there_are_the_three_configs():
    assert {p.name for p in CONFIGS} == {"world.toml", "qwen2.5-vl-3b.toml", "torchrun.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_config_resolves(path, tmp_path):
    """The model and data paths of the real pairs are placeholders: stand-ins that exist are given as flags."""
    stand_ins = []
    if path.name != "world.toml":
        (tmp_path / "model").mkdir()
        (tmp_path / "data.jsonl").write_text("")
        stand_ins = ["--policy", str(tmp_path / "model"), "--reader", str(tmp_path / "model"), "--data",
                     str(tmp_path / "data.jsonl")]  # fmt: skip
    config, _ = parse_config(["--config", str(path), *stand_ins])
    assert config.log.output_dir.startswith("runs/")
    if path.name == "world.toml":  # written out, it is exactly the no-flag run
        default, _ = parse_config(["--output-dir", "runs/world"])
        assert config == default
    else:
        assert config.reward.reward_preset == "recipe" and config.model.gradient_checkpointing


@pytest.mark.slow
def test_the_python_example_trains_and_scores(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "train_and_score.py"), "--steps", "2",
                          "--output-dir", str(tmp_path / "run"), "--progress", "false", "--images-per-step", "2",
                          "--group-size", "2"], capture_output=True, text=True, timeout=900, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"trained: {tmp_path / 'run'}")
    assert lines[-1].startswith("mean reward over 8 held-out images: ")
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
