"""plot_metrics / plot_eval / `python -m caprl_core.plot`: a PNG per run with one titled, labelled panel per
informative group of metrics (no panel that repeats another or stays at 0), per-step points and their centred moving
average, gaps for NaN/None, one point allowed; the evaluation's figure; redrawing a run's plot from its directory.

Run: pytest tests/test_plot.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from caprl_core.plot import PANELS, centred_mean, main, metrics_figure, plot_eval, plot_metrics

TITLES = {panel.metrics[0][0]: panel.title for panel in PANELS}


def _write(path, records) -> None:
    # json.dumps writes NaN as the bare token NaN, as the trainer's metrics.jsonl would.
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _records(steps: int = 20, *, length_term: bool = False):
    records = []
    for step in range(steps):
        reward = 0.2 + 0.03 * step
        record = {"step": step, "reward_mean": reward, "accuracy": reward - 0.1 if length_term else reward,
                  "caption_length": 40 + step, "kl": None if step == 5 else 0.01 * step, "clip_fraction": 0.0,
                  "time_rollout": 1.0, "time_reward": 0.5, "time_update": 2.0}  # fmt: skip
        if step == 7:
            record["reward_mean"] = math.nan
        records.append(record)
    return records


def _visible(fig):
    return [ax for ax in fig.axes if ax.axison]


def test_plot_writes_a_png_with_a_panel_per_informative_metric_group(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, _records())
    with metrics.open("a") as f:
        f.write('{"step": 20, "reward_m')  # a line cut short by a crash
    out = plot_metrics(metrics, tmp_path / "plots" / "plot.png")
    assert out == tmp_path / "plots" / "plot.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1200, 600)  # 2 rows of 3 panels
        assert np.asarray(image.convert("L")).std() > 10  # not blank
    panels = _visible(metrics_figure([json.loads(line) for line in metrics.read_text().splitlines()[:-1]]))
    # accuracy = reward (no length term): no second panel; clip_fraction is 0 throughout: no panel.
    assert [ax.get_title() for ax in panels] == [TITLES[k] for k in ("reward_mean", "caption_length", "kl",
                                                                       "time_rollout")]  # fmt: skip
    assert all(ax.get_xlabel() == "step" and ax.get_ylabel() for ax in panels)
    assert len(panels[3].lines) == 6  # three phases: points and mean each
    raw, mean = panels[0].lines  # per-step points, centred mean
    assert list(raw.get_xdata()) == list(range(20))
    y = np.asarray(mean.get_ydata())
    # A centred mean of a straight line is the line itself away from gaps and ends: it does not lag.
    assert np.isnan(y[7]) and y[12] == pytest.approx(0.2 + 0.03 * 12)


def test_reader_accuracy_and_clip_share_appear_when_they_say_something():
    records = _records(length_term=True)
    for record in records:
        record["clip_fraction"] = 0.01
    titles = [ax.get_title() for ax in _visible(metrics_figure(records))]
    assert TITLES["accuracy"] in titles and TITLES["clip_fraction"] in titles


def test_centred_mean_window_gaps_and_ends():
    values = [0.0, 1.0, 2.0, 9.0, math.nan, 4.0]
    assert centred_mean(values, window=3)[:4] == [0.5, 1.0, 4.0, 5.5]  # ends average what the window holds
    assert math.isnan(centred_mean(values, window=3)[4]) and centred_mean(values, window=3)[5] == 4.0
    assert centred_mean([1.0] * 40) == [1.0] * 40


def test_nan_and_none_are_gaps():
    records = [{"step": s, "kl": (None if 8 <= s < 12 else float(s))} for s in range(20)]
    (ax,) = _visible(metrics_figure(records))
    raw, mean = ax.lines
    assert np.isnan(np.asarray(raw.get_ydata(), dtype=float)[8:12]).all()
    assert np.isnan(np.asarray(mean.get_ydata())[8:12]).all()


def test_single_point_and_no_data():
    (ax,) = _visible(metrics_figure([{"step": 3, "reward_mean": 0.5, "kl": math.nan}]))
    assert len(ax.lines) == 1  # one point: no mean (kl is all NaN: no panel)
    fig = metrics_figure([{"step": 3, "kl": math.nan}])
    assert not _visible(fig) and "no metric with a finite value" in fig.axes[0].texts[0].get_text()


def test_eval_plot_names_what_was_evaluated(tmp_path):
    details = tmp_path / "details.jsonl"
    _write(details, [{"accuracy": [0.5, 1.0], "caption_tokens": [10, 20]}, {"accuracy": [0.0, 0.25],
                                                                           "caption_tokens": [5, 7]}])  # fmt: skip
    with Image.open(plot_eval(details, tmp_path / "eval.png", title="step-000039: 43.8%")) as image:
        assert image.format == "PNG" and np.asarray(image.convert("L")).std() > 10


def test_plot_command_redraws_a_run_and_names_a_wrong_directory(tmp_path, capsys):
    _write(tmp_path / "metrics.jsonl", _records())
    result = subprocess.run([sys.executable, "-m", "caprl_core.plot", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "plot.png").is_file() and result.stdout.strip() == str(tmp_path / "plot.png")
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RUN_DIR" in err and "metrics.jsonl does not exist" in err
