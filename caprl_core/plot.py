"""Training and evaluation figures, drawn with matplotlib (Agg backend: no display needed).

    python -m caprl_core.plot RUN_DIR          # (re)draws RUN_DIR/plot.png from RUN_DIR/metrics.jsonl, any time

    from caprl_core.plot import plot_metrics, plot_eval
    plot_metrics("runs/x/metrics.jsonl", "runs/x/plot.png")     # what `python -m caprl_core.train` writes
    plot_eval("runs/eval/details.jsonl", "runs/eval/plot.png")   # what `python -m caprl_core.eval` writes

`plot_metrics` draws the panels of PANELS that say something: a panel is left out when none of its metrics has a
finite value, when all of them are constant zero (the clip share under one iteration, the KL without a reference),
or when it would repeat another panel (reader accuracy is the reward itself unless a length term is added). Each
metric is drawn as light per-step points and a centred moving average (WINDOW_FRACTION of the run, odd, at least 3
points: a centred mean does not lag the points as a running mean does); a metric logged on fewer than half the steps
(the held-out evaluation's) is drawn point to point instead. Missing, None or non-finite values are gaps;
lines cut short by a crash are skipped. `plot_eval` draws the distribution of per-image accuracy and accuracy against
caption length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

WINDOW_FRACTION = 0.1  # the centred mean's window, as a share of the run's points
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")  # one per metric of a panel; its points are the same, lighter


@dataclass(frozen=True)
class Panel:
    """One panel: its title, the y axis's unit, and the metrics it draws as (key, legend label)."""

    title: str
    unit: str
    metrics: tuple[tuple[str, str], ...]
    drop_if_same_as: str | None = None  # a key of another panel: this one is left out when its first metric equals it


PANELS = (
    Panel("Reward (mean over captions)", "reward", (("reward_mean", "reward"),)),
    Panel("Reader accuracy", "fraction right", (("accuracy", "training captions"),), drop_if_same_as="reward_mean"),
    Panel("Held-out accuracy", "fraction right", (("heldout_accuracy", "held-out (--eval-every)"),)),
    Panel("Fact precision and recall", "fraction",
          (("fact_precision", "precision (train)"), ("fact_recall", "recall (train)"),
           ("heldout_precision", "precision (held-out)"), ("heldout_recall", "recall (held-out)"))),
    Panel("Caption length", "tokens", (("caption_length", "mean"),)),
    Panel("Truncated captions", "fraction of captions", (("truncation_rate", "hit max_new_tokens"),)),
    Panel("Policy entropy", "nats / token", (("entropy", "entropy"),)),
    Panel("KL", "nats / token", (("kl", "to the reference (k3)"), ("approx_kl", "to the rollout policy"))),
    Panel("Clipped ratio share", "fraction of tokens", (("clip_fraction", "clipped"),)),
    Panel("Gradient norm (before clipping)", "L2 norm", (("grad_norm", "grad norm"),)),
    Panel("Time per phase", "seconds",
          (("time_rollout", "rollout"), ("time_reward", "reward"), ("time_update", "update"),
           ("time_heldout", "held-out"))),
)  # fmt: skip
PANEL_COLUMNS = 3


def plot_metrics(metrics_path: str | Path, out_png: str | Path, *, size: tuple[int, int] | None = None) -> Path:
    """Draw the informative panels of PANELS from `metrics_path` (JSON lines with "step" and numeric fields;
    unparsable lines are skipped) into `out_png`; `size` in pixels (default: 400 x 300 per panel). Returns
    `out_png`."""
    fig = metrics_figure(_read_records(Path(metrics_path)), size=size)
    fig.suptitle(f"Training: {Path(metrics_path).resolve().parent.name}")
    return _save(fig, Path(out_png))


def metrics_figure(records: list[dict], panels: tuple[Panel, ...] = PANELS, *, size: tuple[int, int] | None = None):
    """The figure of `plot_metrics` from parsed metric records (tests look inside it)."""
    shown = [(panel, series) for panel in panels if (series := _panel_series(records, panel))]
    shown = [(p, s) for p, s in shown if not _repeats(p, s, records)]
    cols = min(PANEL_COLUMNS, len(shown)) or 1
    rows = math.ceil(len(shown) / cols) or 1
    width, height = size or (400 * cols, 300 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=(width / 100, height / 100), dpi=100, squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.set_axis_off()
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no metric with a finite value yet", ha="center", va="center",
                        transform=axes[0, 0].transAxes)  # fmt: skip
    for ax, (panel, series) in zip(axes.flat, shown, strict=False):
        _draw(ax, panel, series)
    return fig


def plot_eval(details_path: str | Path, out_png: str | Path, *, title: str | None = None) -> Path:
    """The distribution of per-image mean accuracy, and each caption's accuracy against its length, from an
    evaluation's details.jsonl; `title` names what was evaluated (default: the number of images). Returns
    `out_png`."""
    rows = _read_records(Path(details_path))
    accuracy = [sum(r["accuracy"]) / len(r["accuracy"]) for r in rows if r.get("accuracy")]
    pairs = [(t, a) for r in rows for t, a in zip(r.get("caption_tokens", []), r.get("accuracy", []), strict=False)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    left.hist(accuracy, bins=20, range=(0, 1), color=COLOURS[0])
    left.set(title="Per-image accuracy (mean over captions)", xlabel="fraction of questions right", ylabel="images")
    if pairs:
        right.scatter(*zip(*pairs, strict=True), s=8, alpha=0.5, color=COLOURS[0])
    right.set(title="Caption accuracy against length", xlabel="caption tokens", ylabel="fraction right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"Evaluation: {len(accuracy)} images")
    return _save(fig, Path(out_png))


def _panel_series(records: list[dict], panel: Panel) -> dict[str, list[tuple[float, float]]]:
    """The panel's metrics that have a finite value that is not 0 everywhere (a metric stuck at 0 says nothing)."""
    series = {}
    for key, _ in panel.metrics:
        points = _series(records, key)
        finite = [y for _, y in points if math.isfinite(y)]
        if finite and any(y != 0 for y in finite):
            series[key] = points
    return series


def _repeats(panel: Panel, series: dict, records: list[dict]) -> bool:
    """Whether the panel's first metric equals the one it may repeat (at every step where both are finite)."""
    if panel.drop_if_same_as is None or panel.metrics[0][0] not in series:
        return False
    ours, theirs = dict(series[panel.metrics[0][0]]), dict(_series(records, panel.drop_if_same_as))
    common = [s for s in ours if s in theirs and math.isfinite(ours[s]) and math.isfinite(theirs[s])]
    return bool(common) and all(math.isclose(ours[s], theirs[s], rel_tol=1e-9, abs_tol=1e-12) for s in common)


def _draw(ax, panel: Panel, series: dict[str, list[tuple[float, float]]]) -> None:
    labels = dict(panel.metrics)
    for colour, (key, points) in zip(COLOURS, series.items(), strict=False):
        xs, ys = [x for x, _ in points], [y for _, y in points]
        if is_sparse(xs):  # each point a whole evaluation (--eval-every): joined as measured, never averaged
            ax.plot(xs, ys, "o-", markersize=4, color=colour, linewidth=1.8, label=labels[key])
            continue
        ax.plot(xs, ys, "o", markersize=2.5, color=colour, alpha=0.35)
        if sum(math.isfinite(y) for y in ys) > 2:
            ax.plot(xs, centred_mean(ys), color=colour, linewidth=1.8, label=labels[key])
        else:
            ax.lines[-1].set_label(labels[key])
    if len(series) > 1 or any(sum(math.isfinite(y) for _, y in pts) > 2 or is_sparse([x for x, _ in pts])
                              for pts in series.values()):  # fmt: skip
        ax.legend(fontsize="x-small", loc="best")
    ax.set(title=panel.title, xlabel="step", ylabel=panel.unit)
    ax.grid(alpha=0.3)


def is_sparse(steps: list[float]) -> bool:
    """Whether a metric was logged on fewer than half the steps it spans (the held-out evaluation's, every N steps):
    a centred mean would average measurements N steps apart, so such a series is drawn point to point."""
    return len(steps) > 1 and 2 * len(steps) < steps[-1] - steps[0] + 1


def centred_mean(values: list[float], window: int | None = None) -> list[float]:
    """Mean of the finite values in a window centred on each point (narrower at the ends); NaN where the value is
    NaN (a gap). `window` is odd; by default WINDOW_FRACTION of the points, at least 3."""
    n = len(values)
    if window is None:
        window = max(3, int(n * WINDOW_FRACTION) // 2 * 2 + 1)
    half = window // 2
    out = []
    for i, y in enumerate(values):
        near = [v for v in values[max(0, i - half) : i + half + 1] if math.isfinite(v)]
        out.append(sum(near) / len(near) if math.isfinite(y) and near else math.nan)
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


def main(argv: list[str] | None = None) -> int:
    """`python -m caprl_core.plot RUN_DIR [--out PNG]`: redraw a training run's plot from its metrics.jsonl."""
    parser = argparse.ArgumentParser(prog="python -m caprl_core.plot", description=main.__doc__)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a training run's output directory")
    parser.add_argument("--out", type=Path, metavar="PNG", help="where to write (default: RUN_DIR/plot.png)")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"error: RUN_DIR: {metrics} does not exist (is {args.run_dir} a training run's directory?)",
              file=sys.stderr)  # fmt: skip
        return 2
    print(plot_metrics(metrics, args.out or args.run_dir / "plot.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
