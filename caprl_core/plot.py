"""Training and evaluation figures, drawn with matplotlib (Agg backend: no display needed).

    from caprl_core.plot import plot_metrics, plot_eval
    plot_metrics("runs/x/metrics.jsonl", "runs/x/plot.png")     # what `python -m caprl_core.train` writes
    plot_eval("runs/eval/details.jsonl", "runs/eval/plot.png")   # what `python -m caprl_core.eval` writes

`plot_metrics` draws one titled panel per metric in a grid: the per-step values as light points and their running
mean (exponential, bias-corrected: per-step rewards are noisy) as a line, "step" on x and the metric's unit on y.
Missing, None or non-finite values are gaps; lines cut short by a crash are skipped. `plot_eval` draws the
distribution of per-image accuracy and accuracy against caption length.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_KEYS = ("reward_mean", "accuracy", "fact_precision", "fact_recall", "caption_length", "kl", "clip_fraction",
                "grad_norm")  # fmt: skip
SMOOTHING = 0.9  # weight of the past in the running mean
RAW_COLOUR, MEAN_COLOUR = "#9ecae1", "#1f77b4"
# Panel title and y label per metric; others get their key as title and no unit.
LABELS = {
    "reward_mean": ("Reward (mean over captions)", "reward"),
    "accuracy": ("Reader accuracy", "fraction right"),
    "fact_precision": ("Fact precision of captions", "true / claimed"),
    "fact_recall": ("Fact recall of captions", "stated / facts"),
    "caption_length": ("Caption length", "tokens"),
    "kl": ("KL to the initial policy (k3)", "nats / token"),
    "clip_fraction": ("Clipped ratio share", "fraction of tokens"),
    "grad_norm": ("Gradient norm (before clipping)", "L2 norm"),
    "entropy": ("Policy entropy", "nats / token"),
    "loss": ("GRPO loss", "loss"),
    "lr": ("Learning rate", "lr"),
}


def plot_metrics(
    metrics_path: str | Path, out_png: str | Path, keys: Sequence[str] = DEFAULT_KEYS, *,
    size: tuple[int, int] = (1200, 800),
) -> Path:  # fmt: skip
    """Draw one panel per key of `keys` that has at least one finite value in `metrics_path` (JSON lines with "step"
    and numeric fields; unparsable lines are skipped) into `out_png` (`size` in pixels). Returns `out_png`."""
    fig = metrics_figure(_read_records(Path(metrics_path)), keys, size=size)
    fig.suptitle(f"Training: {Path(metrics_path).parent.name or Path(metrics_path).name}")
    return _save(fig, Path(out_png))


def metrics_figure(records: list[dict], keys: Sequence[str] = DEFAULT_KEYS, *, size: tuple[int, int] = (1200, 800)):
    """The figure of `plot_metrics` from parsed metric records (tests look inside it)."""
    series = {key: _series(records, key) for key in keys}
    series = {key: pts for key, pts in series.items() if any(math.isfinite(y) for _, y in pts)}
    cols = min(3, len(series)) or 1
    rows = math.ceil(len(series) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] / 100, size[1] / 100), dpi=100, squeeze=False)
    for ax in axes.flat[len(series) :]:
        ax.set_axis_off()
    if not series:
        axes[0, 0].text(0.5, 0.5, f"no finite values of {', '.join(keys)}", ha="center", va="center",
                        transform=axes[0, 0].transAxes)  # fmt: skip
    for ax, (key, points) in zip(axes.flat, series.items(), strict=False):
        _panel(ax, key, points)
    return fig


def plot_eval(details_path: str | Path, out_png: str | Path) -> Path:
    """The distribution of per-image mean accuracy, and each caption's accuracy against its length, from an
    evaluation's details.jsonl. Returns `out_png`."""
    rows = _read_records(Path(details_path))
    accuracy = [sum(r["accuracy"]) / len(r["accuracy"]) for r in rows if r.get("accuracy")]
    pairs = [(t, a) for r in rows for t, a in zip(r.get("caption_tokens", []), r.get("accuracy", []), strict=False)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    left.hist(accuracy, bins=20, range=(0, 1), color=MEAN_COLOUR)
    left.set(title="Per-image accuracy (mean over captions)", xlabel="fraction of questions right", ylabel="images")
    if pairs:
        right.scatter(*zip(*pairs, strict=True), s=8, alpha=0.5, color=MEAN_COLOUR)
    right.set(title="Caption accuracy against length", xlabel="caption tokens", ylabel="fraction right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"Evaluation: {len(accuracy)} images")
    return _save(fig, Path(out_png))


def _panel(ax, key: str, points: list[tuple[float, float]]) -> None:
    title, unit = LABELS.get(key, (key, ""))
    xs, ys = [x for x, _ in points], [y for _, y in points]
    ax.plot(xs, ys, "o", markersize=2.5, color=RAW_COLOUR, label="per step")
    if sum(math.isfinite(y) for y in ys) > 2:
        ax.plot(xs, _smooth(ys), color=MEAN_COLOUR, linewidth=1.8, label="running mean")
        ax.legend(fontsize="x-small", loc="best")
    ax.set(title=title, xlabel="step", ylabel=unit)
    ax.grid(alpha=0.3)


def _smooth(values: list[float]) -> list[float]:
    """Bias-corrected exponential running mean; NaN where the value is NaN (a gap), restarted after a gap."""
    out, mean, n = [], 0.0, 0
    for y in values:
        if not math.isfinite(y):
            out.append(math.nan)
            mean, n = 0.0, 0
            continue
        mean, n = SMOOTHING * mean + (1 - SMOOTHING) * y, n + 1
        out.append(mean / (1 - SMOOTHING**n))
    return out


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    fig.tight_layout()
    fig.savefig(tmp, format="png")
    plt.close(fig)
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
