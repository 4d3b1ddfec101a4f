"""plot_metrics: a readable PNG from metrics.jsonl, with gaps for NaN/None, absent keys skipped, one point allowed."""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

from caprl_core.plot import _LINE, plot_metrics


def _write(path, records) -> None:
    # json.dumps writes NaN as the bare token NaN, as the trainer's metrics.jsonl would.
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int64)  # [H, W, 3]


def _line_columns(pixels: np.ndarray) -> np.ndarray:
    """Per column, whether any pixel has the line colour."""
    return (np.abs(pixels - np.array(_LINE)).sum(-1) < 60).any(0)  # [W]


def _records(steps: int = 20):
    records = []
    for step in range(steps):
        record = {"step": step, "reward_mean": 0.2 + 0.03 * step, "accuracy": math.sin(step / 3),
                  "caption_length": 40 + step, "kl": None if step == 5 else 0.01 * step}  # fmt: skip
        if step == 7:
            record["reward_mean"] = math.nan
        records.append(record)
    return records


def test_plot_writes_a_readable_grid(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, _records())
    with metrics.open("a") as f:
        f.write('{"step": 20, "reward_m')  # a line cut short by a crash
    out = plot_metrics(metrics, tmp_path / "plots" / "plot.png")
    assert out == tmp_path / "plots" / "plot.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1200, 800)
    pixels = _pixels(out)
    assert pixels.std() > 10  # not blank
    # Four keys present (clip_fraction and grad_norm absent): a 3 x 2 grid with the last two cells empty.
    for index in range(6):
        row, col = divmod(index, 3)
        cell = pixels[row * 400 : (row + 1) * 400, col * 400 : (col + 1) * 400]  # [400, 400, 3]
        has_line = _line_columns(cell).sum() > 100
        assert has_line == (index < 4), index
        if index >= 4:
            assert (cell == 255).all()  # white: nothing drawn


def test_nan_and_none_are_gaps(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": s, "kl": (None if 8 <= s < 12 else float(s % 3))} for s in range(20)]
    _write(metrics, records)
    line = _line_columns(_pixels(plot_metrics(metrics, tmp_path / "plot.png", keys=["kl"])))
    columns = np.flatnonzero(line)
    gaps = np.diff(columns)
    # One panel 1200 px wide, plot area from 70 to 1180 px: steps 7..12 span ~290 px with no line.
    assert gaps.max() > 200
    assert columns.max() - columns.min() > 1000  # the line spans the whole x range on both sides of the gap


def test_single_point_and_no_data(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, [{"step": 3, "reward_mean": 0.5, "kl": math.nan}])
    pixels = _pixels(plot_metrics(metrics, tmp_path / "one.png", size=(600, 400)))
    assert pixels.shape == (400, 600, 3)
    assert 0 < _line_columns(pixels).sum() < 20  # one dot, in the only panel (kl is all NaN: skipped)

    pixels = _pixels(plot_metrics(metrics, tmp_path / "none.png", keys=["grad_norm"]))
    assert not _line_columns(pixels).any() and pixels.std() > 0  # a message, no panel
