"""`python -m caprl_core.world ablations`: the CapRL paper's ablations run in the miniature world, several seeds each,
summarised as a table of means with 95% confidence intervals and one figure.

    python -m caprl_core.world ablations --out runs/ablations                       # every family, seeds 0 1 2
    python -m caprl_core.world ablations --out runs/ablations --families draws control --seeds 0 1
    python -m caprl_core.world ablations --out runs/faint --level faint            # facts hard to see (LEVELS)

Each arm is `python -m caprl_core.train` with the world's defaults and the arm's flags, then `python -m caprl_core.eval`
of its last checkpoint on the world's held-out images (scenes that no training stream draws: caprl_core.world.splits).
A family compares arms that differ in one choice; arms with the same flags (the world's defaults appear in most
families) are one run per seed, shared. Every run writes `runs/<arm>-seed<S>/result.json` when it is done, so a
command stopped half-way (Ctrl-C, a crash) reruns only what has no result; `table.md`, `table.json` and `ablations.png`
are rewritten from all results at the end.

The families and what the paper reports for each (CapRL, arXiv 2509.22647; Prism averages of Qwen2.5-VL-3B):
- draws: N = 1 / 4 / 8 questions drawn per caption (Table 5: 47.3 / 48.4 / 48.3);
- reward: the CapRL reward against a judge that prefers long captions, as the paper's judge-model rewards were hacked
  into long or self-praising captions (Fig. 1; Table 3: 38.4 and 42.5 against 48.3);
- mode: the reader's soft probability of the right letter against its hard argmax;
- estimator: GRPO against RLOO advantages (the same run up to a constant AdamW removes, see FAMILIES);
- scale: advantages divided by the group's standard deviation, or not (Dr.GRPO);
- length: with and without the caption-length term;
- control: the true reward against rewards shuffled across the batch (any gain of the shuffled run is not the
  reward's doing);
- qa: training questions filtered of leaky ones against leaky ones kept (Table 6: 48.5 against 47.4), rewarded by a
  reader that answers leaky questions from their text (caprl_core.world.qa_reader, built once per `--out`);
- sight: facts that are hard to see (BalCapRL's critique: a utility reward pays for guessing, so it should lower fact
  precision where the policy is unsure): training on the plain images against images whose shapes are faded
  (`world data --faint`), with a shuffled-reward control, every arm evaluated on the faded held-out images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Flags of each arm over the world's defaults (caprl_core.config.WORLD_DEFAULTS: soft mode, N = 4 draws, GRPO, no
# length term); () is the defaults themselves. The length arm's term pays in full up to 16 caption tokens and nothing
# from 32, the world's --max-new-tokens: a reference caption is 6-24 tokens, so it bites on captions that ramble.
FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "draws": {"N=1": ("--num-draws", "1"), "N=4": (), "N=8": ("--num-draws", "8")},
    "reward": {"CapRL": (), "judge (length)": ("--judge", "length")},
    "mode": {"soft": (), "hard": ("--mode", "hard")},
    # With the group-std scaling RLOO's advantage is G/(G-1) times GRPO's, a constant AdamW removes: the two runs are
    # the same (measured: equal rewards at every step, grad norms in the ratio 7/8). "scale" varies what differs.
    "estimator": {"grpo": (), "rloo": ("--advantage", "rloo")},
    "scale": {"group std": (), "none (Dr.GRPO)": ("--scale", "none")},
    "length": {"off": (), "on": ("--length-weight", "0.2", "--length-l1", "16", "--length-l2", "32")},
    "control": {"true reward": (), "shuffled": ("--shuffle-rewards", "true")},
    # The same 256 training images with the curation candidates' questions (caprl_core.world.questions), half of them
    # leaky (answerable from the question alone), against those with the leaky ones removed by the world's ground
    # truth (a perfect filter); "@name" is a data file or model `prepare_data` writes. Both arms are rewarded by a
    # reader that reads the candidates and answers leaky ones from their text (caprl_core.world.qa_reader says why
    # the shipped one cannot); both are evaluated by the shipped reader, as every arm is.
    "qa": {
        "filtered": ("--data", "@qa-filtered", "--reader", "@qa-reader"),
        "leaky": ("--data", "@qa-leaky", "--reader", "@qa-reader"),
    },
    "sight": {
        "plain images": (),
        "faint images": ("--data", "@faint-train"),
        "faint, shuffled": ("--data", "@faint-train", "--shuffle-rewards", "true"),
    },
}
# Families evaluated on other held-out data than the world's plain held-out images: {family: "@name"}.
EVAL_DATA = {"sight": "@faint-heldout"}
# How far `sight`'s shapes fade towards their cell's grey. The start policy's fact precision on the held-out images:
# 1.0 plain, 0.39 / 0.37 / 0.37 at 0.6 / 0.75 / 0.85 (recall 0.32 plain, 0.12 faded): at 0.6 it already misreads most
# of what it states, so what training does to precision there is the question.
FAINT = 0.6
METRICS = ("mean_accuracy", "fact_precision", "fact_recall", "mean_caption_tokens")
RESULT = "result.json"

# Two-sided 95% quantiles of Student's t with df = 1..30 degrees of freedom (any statistics table). Beyond 30 seeds
# the df = 30 value is used: it is at most 4% above the true quantile (1.96 at infinity), so the interval errs wide.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One configuration of a family: its name in the table, its flags over the world's defaults, and the held-out
    data it is evaluated on ("@name", or None for the world's held-out images)."""

    family: str
    name: str
    flags: tuple[str, ...]
    eval_data: str | None = None

    @property
    def run_name(self) -> str:
        """The directory name of its runs: the same for every arm with the same flags and evaluation data, whatever
        its family."""
        name = "_".join(f.lstrip("-@") for f in self.flags).replace(".", "p").replace(" ", "-") or "defaults"
        return name + (f"__eval_{self.eval_data.lstrip('@')}" if self.eval_data else "")


# The levels: "plain", the world's images; "faint", every run trains on the faded training images and is evaluated on
# the faded held-out ones (`FAINT`), where facts are hard to see and a run does not reach the reader's ceiling.
LEVELS = ("plain", "faint")
PLAIN_ONLY = ("sight",)  # a family that chooses its own evaluation data


def arms(families: list[str], level: str = "plain") -> list[Arm]:
    """The arms of `families` at `level`, in table order; ValueError naming an unknown family, or one that has no
    faint level."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"--families: unknown {', '.join(unknown)} (known: {', '.join(FAMILIES)})")
    if level not in LEVELS:
        raise ValueError(f"--level: expected one of {', '.join(LEVELS)}, got {level!r}")
    if level == "faint" and set(families) & set(PLAIN_ONLY):
        raise ValueError(f"--level faint: {', '.join(f for f in families if f in PLAIN_ONLY)} is a comparison of "
                         f"levels itself; leave it out (--families)")  # fmt: skip
    out = [Arm(f, name, flags, EVAL_DATA.get(f)) for f in families for name, flags in FAMILIES[f].items()]
    if level == "faint":  # an arm with data of its own (qa) takes its faded copy
        out = [Arm(a.family, a.name, _faded(a.flags), "@faint-heldout") for a in out]
    return out


def _faded(flags: tuple[str, ...]) -> tuple[str, ...]:
    """An arm's flags at the faint level: its "@name" data file's faded copy, or the faded training images."""
    if "--data" in flags:
        i = flags.index("--data") + 1
        return (*flags[:i], flags[i] + "-faint", *flags[i + 1 :])
    return ("--data", "@faint-train", *flags)


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval of the mean) over `values`, Student's t; nan width for one."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[min(n - 1, len(_T975)) - 1]
    return mean, t * sd / math.sqrt(n)


def prepare_data(out: Path, names: set[str]) -> dict[str, str]:
    """The data files that arms name as "@name" (written once into `out`/data, reused by a rerun): {"@name": path}."""
    files = {}
    for suffix, faint in (("", 0.0), ("-faint", FAINT)):
        if names & {f"@qa-leaky{suffix}", f"@qa-filtered{suffix}"}:
            leaky, filtered = _qa_data(out / "data" / f"qa{suffix}", faint)
            files.update({f"@qa-leaky{suffix}": str(leaky), f"@qa-filtered{suffix}": str(filtered)})
    if "@qa-reader" in names:
        files["@qa-reader"] = str(_made_once(out / "data" / "qa-reader", _build_qa_reader))
    for name, split in (("@faint-train", "train"), ("@faint-heldout", "heldout")):
        if name in names:
            files[name] = str(_faint_data(out / "data" / name.lstrip("@"), split))
    unknown = names - set(files)
    if unknown:
        raise ValueError(f"no data file named {', '.join(sorted(unknown))}")
    return files


def _qa_data(qa: Path, faint: float) -> tuple[Path, Path]:
    """The curation candidates of the training images (shapes faded `faint`), with and without their leaky
    questions: (leaky, filtered) JSONL paths."""
    from caprl_core.world.questions import make_question_data

    leaky = _written_once(qa, lambda tmp: make_question_data(tmp, "train", leaky_fraction=0.5, faint=faint))
    filtered = leaky.with_name("filtered.jsonl")  # beside it: the image paths are relative to the file
    if not filtered.exists():
        rows = [json.loads(line) for line in leaky.read_text().splitlines() if line.strip()]
        for row in rows:
            row["questions"] = [q for q in row["questions"] if not q.get("leaky")]
        kept = "".join(json.dumps(row) + "\n" for row in rows if row["questions"])  # all-leaky images go
        filtered.with_suffix(".tmp").write_text(kept)
        filtered.with_suffix(".tmp").replace(filtered)
    return leaky, filtered


def _faint_data(directory: Path, split: str) -> Path:
    """The world's `split` with its shapes faded FAINT; its data.jsonl."""
    from caprl_core.world import make_world_data

    return _written_once(directory, lambda tmp: make_world_data(tmp, split, faint=FAINT))


def _build_qa_reader(directory: Path) -> None:
    from caprl_core.world.qa_reader import build_qa_reader

    print("building the qa family's reader (caprl_core.world.qa_reader, a few minutes) ...", flush=True)
    build_qa_reader(directory)


def _written_once(directory: Path, write) -> Path:
    """directory/data.jsonl, written once by `_made_once`."""
    return _made_once(directory, write) / "data.jsonl"


def _made_once(directory: Path, write) -> Path:
    """directory, which write(tmp) makes in a directory beside it that is then renamed, so a directory that exists is
    whole (a rerun reuses it; a write cut short is redone)."""
    if not directory.exists():
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        tmp.rename(directory)
    return directory


def run_arm(arm: Arm, seed: int, out: Path, extra: tuple[str, ...] = (), eval_extra: tuple[str, ...] = (),
            data: dict[str, str] | None = None) -> dict:  # fmt: skip
    """Train and evaluate `arm` with `seed` (unless `out`/runs/<arm>-seed<S>/result.json exists): the result row.
    extra: flags for every training run (e.g. --steps); eval_extra: for every evaluation (e.g. --limit)."""
    run = out / "runs" / f"{arm.run_name}-seed{seed}"
    done = run / RESULT
    if done.exists():
        return json.loads(done.read_text())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    flags = [(data or {}).get(f, f) for f in arm.flags]  # "@name": the data file prepare_data wrote
    train = [sys.executable, "-m", "caprl_core.train", "--seed", str(seed), "--output-dir", str(run / "train"),
             "--progress", "false", "--resume", "if-exists", *flags, *extra]  # fmt: skip
    started = time.perf_counter()
    _check_call(train, run / "train.log", env)
    trained = time.perf_counter()
    on = ("--data", (data or {})[arm.eval_data]) if arm.eval_data else ()
    evaluate = [sys.executable, "-m", "caprl_core.eval", "--policy", str(run / "train" / "checkpoints" / "latest"),
                "--seed", str(seed), "--num-draws", "0", "--out", str(run / "eval"), *on, *eval_extra]  # fmt: skip
    _check_call(evaluate, run / "eval.log", env)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    row = {"run": run.name, "flags": list(arm.flags), "seed": seed, **{m: summary[m] for m in METRICS},
           "train_s": round(trained - started, 1), "eval_s": round(time.perf_counter() - trained, 1)}  # fmt: skip
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=2) + "\n")
    tmp.replace(done)  # a result file exists only whole: a rerun trusts what it finds
    return row


def _check_call(command: list[str], log: Path, env: dict) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(command[1:4])} ... exited {code}; see {log}: {tail[0]}")


def summarise(results: dict[tuple[str, int], dict], table_arms: list[Arm], seeds: list[int]) -> list[dict]:
    """One row per arm: each metric's mean and 95% half-width over the seeds that have a result, and its held-out
    accuracy minus its family's first arm's, paired by seed ("delta_accuracy", "delta_accuracy_ci95"; nan for the
    first arm). Runs of one seed share the data order and the start, so the seed-to-seed spread that widens each
    arm's own interval cancels in the paired difference."""
    rows = []
    first: dict[str, Arm] = {}
    for arm in table_arms:
        found = [results[arm.run_name, s] for s in seeds if (arm.run_name, s) in results]
        row = {"family": arm.family, "arm": arm.name, "flags": " ".join(arm.flags) or "(world defaults)",
               "seeds": len(found)}  # fmt: skip
        for m in METRICS:
            row[m], row[m + "_ci95"] = t_interval([r[m] for r in found]) if found else (float("nan"), float("nan"))
        ref = first.setdefault(arm.family, arm)
        both = [s for s in seeds if (arm.run_name, s) in results and (ref.run_name, s) in results]
        diffs = [results[arm.run_name, s]["mean_accuracy"] - results[ref.run_name, s]["mean_accuracy"] for s in both]
        none = float("nan"), float("nan")
        row["delta_accuracy"], row["delta_accuracy_ci95"] = t_interval(diffs) if diffs and ref is not arm else none
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The table as markdown: mean ± 95% half-width per metric (accuracy in percent), and the accuracy difference to
    the family's first arm, paired by seed."""
    head = ("| family | arm | seeds | held-out accuracy | fact precision | fact recall | caption tokens | "
            "Δ accuracy vs the family's first arm, paired |\n")  # fmt: skip
    head += "|--------|-----|-------|-------------------|----------------|-------------|----------------|------|\n"

    def cell(row: dict, m: str, scale: float, digits: int) -> str:
        mean, half = row[m] * scale, row[m + "_ci95"] * scale
        if math.isnan(mean):
            return "-"
        return f"{mean:.{digits}f} ± {half:.{digits}f}" if not math.isnan(half) else f"{mean:.{digits}f}"

    def delta(row: dict) -> str:
        text = cell(row, "delta_accuracy", 100, 1)
        return text if text == "-" else ("+" if row["delta_accuracy"] >= 0 else "") + text + " points"

    lines = [f"| {r['family']} | {r['arm']} | {r['seeds']} | {cell(r, 'mean_accuracy', 100, 1)}% | "
             f"{cell(r, 'fact_precision', 1, 3)} | {cell(r, 'fact_recall', 1, 3)} | "
             f"{cell(r, 'mean_caption_tokens', 1, 1)} | {delta(r)} |" for r in rows]  # fmt: skip
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, level: str = "plain") -> None:
    """One figure: held-out accuracy and fact precision per arm, grouped by family, with the 95% intervals, and each
    arm's accuracy difference to its family's first arm, paired by seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 0.45 * len(rows) + 1.5), sharey=True)
    labels = [f"{r['family']}: {r['arm']}" for r in rows]
    ys = list(range(len(rows)))[::-1]
    panels = [("mean_accuracy", "held-out accuracy (%)", 100), ("fact_precision", "fact precision", 1),
              ("delta_accuracy", "accuracy minus the family's first arm\n(points, paired by seed)", 100)]  # fmt: skip
    for ax, (m, title, scale) in zip(axes, panels, strict=True):
        shown = [(y, r) for y, r in zip(ys, rows, strict=True) if not math.isnan(r[m])]
        means = [r[m] * scale for _, r in shown]
        halves = [0.0 if math.isnan(r[m + "_ci95"]) else r[m + "_ci95"] * scale for _, r in shown]
        ax.errorbar(means, [y for y, _ in shown], xerr=halves, fmt="o", capsize=3)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[2].axvline(0, color="grey", lw=1)
    axes[0].set_yticks(ys, labels)
    seeds = max(r["seeds"] for r in rows)
    fig.suptitle(f"miniature world ablations, {level} level: mean and 95% CI over seeds ({seeds} per arm)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_ablations(out: Path, families: list[str], seeds: list[int], extra: tuple[str, ...] = (),
                  eval_extra: tuple[str, ...] = (), log=print, level: str = "plain") -> list[dict]:  # fmt: skip
    """Every arm of `families` at `level` with every seed (each distinct configuration once per seed), then the table
    and figure in `out`; returns the table's rows."""
    table_arms = arms(families, level)
    distinct = {a.run_name: a for a in table_arms}
    todo = [(a, s) for a in distinct.values() for s in seeds]
    named = {f for a in distinct.values() for f in (*a.flags, a.eval_data) if f and f.startswith("@")}
    data = prepare_data(out, named)
    results: dict[tuple[str, int], dict] = {}
    started = time.perf_counter()
    for i, (arm, seed) in enumerate(todo, 1):
        row = run_arm(arm, seed, out, extra, eval_extra, data)
        results[arm.run_name, seed] = row
        log(f"[{i}/{len(todo)}] {arm.run_name} seed {seed}: accuracy {row['mean_accuracy']:.3f}, precision "
            f"{row['fact_precision']:.3f}, {row['mean_caption_tokens']:.1f} tokens (train {row['train_s']} s, eval "
            f"{row['eval_s']} s); {time.perf_counter() - started:.0f} s so far")  # fmt: skip
    rows = summarise(results, table_arms, seeds)
    record = {"level": level, "seeds": seeds, "train_flags": list(extra), "eval_flags": list(eval_extra), "rows": rows,
              "runs": list(results.values())}  # fmt: skip
    (out / "table.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(rows))
    plot(rows, out / "ablations.png", level)
    return rows


def main(argv: list[str] | None = None) -> int:
    """The command: 0 done, 2 a bad option, 1 a run that failed (its log named)."""
    parser = argparse.ArgumentParser(prog="python -m caprl_core.world ablations", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for runs/, table.md, table.json, ablations.png"
    )
    parser.add_argument("--families", nargs="+", metavar="NAME", default=argparse.SUPPRESS,
                        help=f"which families to run, of: {', '.join(FAMILIES)} (default: all, less "
                        f"{', '.join(PLAIN_ONLY)} at --level faint)")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every arm")
    parser.add_argument("--level", choices=LEVELS, default="plain", help="plain: the world's images; faint: train and "
                        f"evaluate on images whose shapes are faded {FAINT} towards their cell's grey (facts hard to "
                        f"see; families {', '.join(PLAIN_ONLY)} excepted)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the world's, 40)")
    parser.add_argument("--eval-images", type=int, help="evaluate each run on the first N held-out images (default: "
                        "all 64); for a quick look, not for the table")  # fmt: skip
    args = parser.parse_args(argv)
    if "families" not in args:
        args.families = [f for f in FAMILIES if args.level == "plain" or f not in PLAIN_ONLY]
    try:
        arms(args.families, args.level)
    except ValueError as e:
        parser.error(str(e))
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {' '.join(map(str, args.seeds))}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps: must be >= 1, got {args.steps}")
    extra = ("--steps", str(args.steps)) if args.steps is not None else ()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        eval_extra = ("--limit", str(args.eval_images)) if args.eval_images is not None else ()
        rows = run_ablations(args.out, args.families, args.seeds, extra, eval_extra, level=args.level,
                             log=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    except RuntimeError as e:
        print(f"python -m caprl_core.world ablations: error: {e}", file=sys.stderr)
        return 1
    print(markdown_table(rows), end="")
    print(
        f"[caprl_core.world ablations] wrote {args.out / 'table.md'} and {args.out / 'ablations.png'}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
