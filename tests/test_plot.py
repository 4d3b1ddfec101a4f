"""plot_metrics / plot_eval: a PNG per run with one titled, labelled panel per metric, per-step points and their
running mean, gaps for NaN/None, absent keys skipped, one point allowed; and the evaluation's figure."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from caprl_core.plot import LABELS, SMOOTHING, metrics_figure, plot_eval, plot_metrics


def _write(path, records) -> None:
    # json.dumps writes NaN as the bare token NaN, as the trainer's metrics.jsonl would.
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _records(steps: int = 20):
    records = []
    for step in range(steps):
        record = {"step": step, "reward_mean": 0.2 + 0.03 * step, "accuracy": math.sin(step / 3),
                  "caption_length": 40 + step, "kl": None if step == 5 else 0.01 * step}  # fmt: skip
        if step == 7:
            record["reward_mean"] = math.nan
        records.append(record)
    return records


def _visible(fig):
    return [ax for ax in fig.axes if ax.axison]


def test_plot_writes_a_png_with_a_titled_panel_per_present_metric(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, _records())
    with metrics.open("a") as f:
        f.write('{"step": 20, "reward_m')  # a line cut short by a crash
    out = plot_metrics(metrics, tmp_path / "plots" / "plot.png")
    assert out == tmp_path / "plots" / "plot.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1200, 800)
        assert np.asarray(image.convert("L")).std() > 10  # not blank
    fig = metrics_figure([json.loads(line) for line in metrics.read_text().splitlines()[:-1]])
    panels = _visible(fig)  # clip_fraction, grad_norm and the fact metrics are absent: 4 of the 8 default keys
    assert [ax.get_title() for ax in panels] == [LABELS[k][0] for k in ("reward_mean", "accuracy", "caption_length",
                                                                          "kl")]  # fmt: skip
    assert all(ax.get_xlabel() == "step" and ax.get_ylabel() for ax in panels)
    raw, mean = panels[0].lines  # per-step points, running mean
    assert list(raw.get_xdata()) == list(range(20))
    y = np.asarray(mean.get_ydata())
    assert np.isnan(y[7]) and y[6] == pytest.approx(np.average([0.2 + 0.03 * s for s in range(7)],
                                                 weights=[SMOOTHING ** (6 - s) for s in range(7)]))  # fmt: skip


def test_nan_and_none_are_gaps_and_the_mean_restarts_after_one():
    records = [{"step": s, "kl": (None if 8 <= s < 12 else float(s))} for s in range(20)]
    (ax,) = _visible(metrics_figure(records, keys=["kl"]))
    raw, mean = ax.lines
    assert np.isnan(np.asarray(raw.get_ydata(), dtype=float)[8:12]).all()
    y = np.asarray(mean.get_ydata())
    assert np.isnan(y[8:12]).all() and y[12] == 12.0  # the first value after the gap starts a new mean


def test_single_point_and_no_data(tmp_path):
    (ax,) = _visible(metrics_figure([{"step": 3, "reward_mean": 0.5, "kl": math.nan}]))
    assert len(ax.lines) == 1  # one point: no running mean (kl is all NaN: no panel)
    fig = metrics_figure([{"step": 3, "kl": math.nan}], keys=["grad_norm"])
    assert not _visible(fig) and "no finite values" in fig.axes[0].texts[0].get_text()


def test_eval_plot(tmp_path):
    details = tmp_path / "details.jsonl"
    _write(details, [{"accuracy": [0.5, 1.0], "caption_tokens": [10, 20]}, {"accuracy": [0.0, 0.25],
                                                                           "caption_tokens": [5, 7]}])  # fmt: skip
    with Image.open(plot_eval(details, tmp_path / "eval.png")) as image:
        assert image.format == "PNG" and np.asarray(image.convert("L")).std() > 10
