"""Held-out evaluation during training (`--eval-every N`, caprl_core.rl.heldout): the steps it runs at, its keys in
metrics.jsonl, training metrics unchanged by it, the same numbers as `python -m caprl_core.eval` on the step's
checkpoint, its flags' checks, and the plot's held-out panels.

Run: pytest tests/test_heldout.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from caprl_core import eval as eval_command
from caprl_core.config_cli import parse_config
from caprl_core.plot import metrics_figure
from caprl_core.rl.heldout import is_due
from caprl_core.rl.progress import TIMING_KEYS
from caprl_core.train import main as train_main
from caprl_core.world import make_world_data

SMALL = ["--steps", "3", "--images-per-step", "2", "--group-size", "3", "--max-new-tokens", "8", "--num-draws", "2",
         "--synthetic-images", "8", "--checkpoint-every", "2", "--sample-every", "2",
         "--progress", "false"]  # fmt: skip
HELDOUT_KEYS = {"heldout_accuracy", "heldout_caption_length", "heldout_precision", "heldout_recall", "time_heldout"}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_the_default_run_evaluates_at_0_10_20_30_and_its_last_step():
    assert [s for s in range(40) if is_due(s, 10, 40)] == [0, 10, 20, 30, 39]
    assert [s for s in range(5) if is_due(s, 2, 5)] == [0, 2, 4]
    assert [s for s in range(3) if is_due(s, 100, 3)] == [0, 2]


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory) -> Path:
    return make_world_data(tmp_path_factory.mktemp("heldout"), "heldout", 4)  # 4 of the world's held-out images


def test_eval_every_logs_heldout_keys_and_leaves_training_metrics_unchanged(tmp_path, heldout_file):
    """3 steps, --eval-every 2: held-out keys at steps 0 and 2 (the last) only; every training metric equal to a run
    without it (the evaluation draws nothing from the training RNG stream and leaves the engines as it found them);
    the step-2 numbers are what `python -m caprl_core.eval` measures on checkpoint step-000002."""
    with_eval, without = tmp_path / "with", tmp_path / "without"
    assert train_main([*SMALL, "--output-dir", str(with_eval), "--eval-every", "2",
                       "--eval-data", str(heldout_file)]) == 0  # fmt: skip
    assert train_main([*SMALL, "--output-dir", str(without)]) == 0
    rows, plain = _metrics(with_eval), _metrics(without)
    assert [r["step"] for r in rows if "heldout_accuracy" in r] == [0, 2]
    for row in rows:
        if row["step"] in (0, 2):
            assert HELDOUT_KEYS <= row.keys(), row.keys()
            assert 0 <= row["heldout_accuracy"] <= 1 and 0 <= row["heldout_recall"] <= 1
            assert 0 < row["heldout_precision"] <= 1 and row["time_heldout"] > 0
        else:
            assert not HELDOUT_KEYS & row.keys()
    skip = set(TIMING_KEYS) | HELDOUT_KEYS
    for a, b in zip(rows, plain, strict=True):
        stable_a = {k: v for k, v in a.items() if k not in skip}
        stable_b = {k: v for k, v in b.items() if k not in skip}
        assert stable_a.keys() == stable_b.keys()
        for key, value in stable_b.items():  # exactly: the same computation, not merely close
            assert value == stable_a[key] or (math.isnan(value) and math.isnan(stable_a[key])), key
    summary = eval_command.main(["--policy", str(with_eval / "checkpoints" / "step-000002"), "--data",
                                 str(heldout_file), "--num-draws", "0", "--out", str(tmp_path / "eval")])  # fmt: skip
    last = rows[-1]
    assert last["heldout_accuracy"] == pytest.approx(summary["mean_accuracy"], abs=1e-9)
    assert last["heldout_precision"] == pytest.approx(summary["fact_precision"], abs=1e-9)
    assert last["heldout_recall"] == pytest.approx(summary["fact_recall"], abs=1e-9)
    assert last["heldout_caption_length"] == pytest.approx(summary["mean_caption_tokens"], abs=1e-9)
    titles = {ax.get_title() for ax in metrics_figure(rows).axes}
    assert "Held-out accuracy" in titles


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--eval-every", "-1"], "--eval-every: must be >= 0"),
        (["--eval-data", "x.jsonl"], "--eval-data: path does not exist"),
        (["--eval-data", __file__], "--eval-data: has no use without --eval-every"),
    ],
)
def test_bad_eval_options_name_the_flag(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_config(argv)


def test_eval_every_with_own_data_needs_eval_data(tmp_path):
    data = make_world_data(tmp_path / "d", "heldout", 1)
    with pytest.raises(ValueError, match="--eval-data: required with --eval-every and --data"):
        parse_config(["--data", str(data), "--eval-every", "5"])
    config, _ = parse_config(["--data", str(data), "--eval-every", "5", "--eval-data", str(data)])
    assert (config.log.eval_every, config.log.eval_data) == (5, str(data))


def test_the_heldout_panels_show_only_when_the_keys_exist():
    plain = [{"step": s, "reward_mean": 0.1 * s, "time_rollout": 1.0} for s in range(10)]
    titles = {ax.get_title() for ax in metrics_figure(plain).axes}
    assert "Held-out accuracy" not in titles and "Fact precision and recall" not in titles
    evaluated = [dict(r, heldout_accuracy=0.3 + r["step"] / 100, heldout_precision=0.9, heldout_recall=0.4)
                 if is_due(r["step"], 5, 10) else r for r in plain]  # fmt: skip
    axes = {ax.get_title(): ax for ax in metrics_figure(evaluated).axes}
    assert {"Held-out accuracy", "Fact precision and recall"} <= axes.keys()
    (line,) = axes["Held-out accuracy"].lines  # evaluations every 5 steps: drawn as measured, not averaged
    assert list(line.get_xdata()) == [0, 5, 9] and list(line.get_ydata()) == [0.3, 0.35, 0.39]


@pytest.mark.slow
def test_two_ranks_evaluate_what_one_process_evaluates(tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU) with --eval-every: 20 held-out images make two batches of eval's 16,
    one per rank; the gathered numbers equal one process's, and neither run waits on the other rank."""
    import os
    import subprocess
    import sys

    heldout = make_world_data(tmp_path / "heldout", "heldout", 20)
    argv = ["-m", "caprl_core.train", "--policy", "tiny-random", "--reader", "tiny-random", *SMALL,
            "--eval-every", "2", "--eval-data", str(heldout)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for ranks in (1, 2):
        launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        out = tmp_path / f"ranks-{ranks}"
        done = subprocess.run([sys.executable, *launcher, *argv, "--output-dir", str(out)], capture_output=True,
                              text=True, env=env, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        rows[ranks] = [r for r in _metrics(out) if "heldout_accuracy" in r]
    assert [r["step"] for r in rows[2]] == [r["step"] for r in rows[1]] == [0, 2]
    for one, two in zip(rows[1], rows[2], strict=True):
        assert two["heldout_accuracy"] == pytest.approx(one["heldout_accuracy"], abs=1e-9)
        assert two["heldout_caption_length"] == pytest.approx(one["heldout_caption_length"], abs=1e-9)
