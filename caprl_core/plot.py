"""Training curves as a PNG, drawn with Pillow only (no plotting library to install on a training machine).

    from caprl_core.plot import plot_metrics
    plot_metrics("runs/x/metrics.jsonl", "runs/x/plot.png")

One small line chart per metric, in a grid: title, axes, the min/max of each axis as tick labels, step on x, a light
grid. The per-step values are drawn light, their running mean (SMOOTHING) dark: per-step rewards are noisy.
Missing, None or non-finite values are gaps in the line; an isolated point is drawn as a dot.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

DEFAULT_KEYS = (
    "reward_mean",
    "accuracy",
    "fact_precision",
    "fact_recall",
    "caption_length",
    "kl",
    "clip_fraction",
    "grad_norm",
)
_BACKGROUND, _AXIS, _GRID, _TEXT, _LINE = "white", (60, 60, 60), (225, 225, 225), (20, 20, 20), (31, 119, 180)
_RAW = (170, 200, 230)  # the per-step values, under their running mean
SMOOTHING = 0.9  # running-mean weight of the past (exponential, bias-corrected); a line per panel
# Panel margins in pixels: room for the title above, y tick labels left, x tick labels below.
_TOP, _LEFT, _BOTTOM, _RIGHT = 30, 70, 30, 20


def plot_metrics(
    metrics_path: str | Path, out_png: str | Path, keys: Sequence[str] = DEFAULT_KEYS, *,
    size: tuple[int, int] = (1200, 800),
) -> Path:  # fmt: skip
    """Draw one panel per key of `keys` that has at least one finite value in `metrics_path` (JSON lines with "step"
    and numeric fields; unparsable lines, e.g. one cut short by a crash, are skipped). Returns `out_png`."""
    records = _read_records(Path(metrics_path))
    series = {key: _series(records, key) for key in keys}
    series = {key: pts for key, pts in series.items() if any(math.isfinite(y) for _, y in pts)}
    image = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font(14)
    if not series:
        draw.text((20, 20), f"no finite values of {', '.join(keys)} in {metrics_path}", fill=_TEXT, font=font)
    cols = min(3, len(series)) or 1
    rows = math.ceil(len(series) / cols) or 1
    width, height = size[0] // cols, size[1] // rows
    for i, (key, points) in enumerate(series.items()):
        x0, y0 = (i % cols) * width, (i // cols) * height
        _panel(draw, (x0, y0, x0 + width, y0 + height), key, points, font)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)  # a reader never sees a half-written image
    return out


def _read_records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _series(records: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) for the records that have `key`; non-numbers and non-finite values become NaN (a gap)."""
    points = []
    for index, record in enumerate(records):
        if key not in record:
            continue
        step, value = record.get("step"), record[key]
        points.append((_number(step) if math.isfinite(_number(step)) else float(index), _number(value)))
    return sorted(points, key=lambda p: p[0])


def _number(value) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if is_number else math.nan


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # flat or a single point: centre it
        pad = 0.5 * abs(hi) if hi else 1.0
        return lo - pad, hi + pad
    return lo, hi


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], key: str, points, font) -> None:
    left, top = box[0] + _LEFT, box[1] + _TOP
    right, bottom = box[2] - _RIGHT, box[3] - _BOTTOM
    finite = [(x, y) for x, y in points if math.isfinite(y)]
    (x_lo, x_hi), (y_lo, y_hi) = _range([x for x, _ in points]), _range([y for _, y in finite])
    to_px = lambda x, y: (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                          bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))  # fmt: skip
    for k in range(5):  # light grid, 4 intervals each way
        gx, gy = left + k * (right - left) / 4, top + k * (bottom - top) / 4
        draw.line([(gx, top), (gx, bottom)], fill=_GRID)
        draw.line([(left, gy), (right, gy)], fill=_GRID)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS, width=1)
    draw.text(((left + right) / 2, box[1] + 6), key, fill=_TEXT, font=font, anchor="mt")
    draw.text((left - 6, top), _fmt(y_hi), fill=_TEXT, font=font, anchor="ra")
    draw.text((left - 6, bottom), _fmt(y_lo), fill=_TEXT, font=font, anchor="rd")
    draw.text((left, bottom + 4), _fmt(x_lo), fill=_TEXT, font=font, anchor="la")
    draw.text((right, bottom + 4), _fmt(x_hi), fill=_TEXT, font=font, anchor="ra")
    draw.text(((left + right) / 2, bottom + 4), "step", fill=_AXIS, font=font, anchor="ma")
    runs = _runs(points)  # each run of consecutive finite values is one polyline
    smoothed = [_smooth(run) for run in runs] if len(finite) > 2 else []
    for run, colour in [(r, _RAW if smoothed else _LINE) for r in runs] + [(r, _LINE) for r in smoothed]:
        pixels = [to_px(x, y) for x, y in run]
        if len(pixels) == 1:
            (px, py), r = pixels[0], 3
            draw.ellipse([px - r, py - r, px + r, py + r], fill=colour)
        else:
            draw.line(pixels, fill=colour, width=2)


def _smooth(run: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Bias-corrected exponential running mean of a run's values."""
    out, mean = [], 0.0
    for i, (x, y) in enumerate(run):
        mean = SMOOTHING * mean + (1 - SMOOTHING) * y
        out.append((x, mean / (1 - SMOOTHING ** (i + 1))))
    return out


def _runs(points: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    runs, current = [], []
    for x, y in points:
        if math.isfinite(y):
            current.append((x, y))
        elif current:
            runs.append(current)
            current = []
    return runs + [current] if current else runs


def _fmt(value: float) -> str:
    return f"{value:.4g}"
