"""A run directory's life: what a fresh start, a resume and --overwrite may do to it, the configuration a resumed
run continues with, plot.png kept current, and a Ctrl-C that ends the run cleanly.

    python -m caprl_core.train --output-dir runs/x ...                 # runs/x must not hold a run yet
    python -m caprl_core.train --output-dir runs/x --resume            # its saved config; SAFE_ON_RESUME may change
    python -m caprl_core.train --output-dir runs/x --resume if-exists  # the same, or fresh when nothing to resume
    python -m caprl_core.train --output-dir runs/x --overwrite         # delete its run (RUN_FILES only), start anew

A directory "holds a run" when it has any of RUN_FILES. Starting a run there without --resume is an error: two runs'
logs and checkpoints mixed in one directory cannot be told apart. --overwrite deletes RUN_FILES and nothing else (a
dataset or notes beside them stay), and refuses when checkpoints/ holds anything a run does not write, or config.json
is not a run's configuration (a model directory given as --output-dir by mistake). A directory holding none of
RUN_FILES (empty, or e.g. only the data the run reads) is not a run: training starts there and leaves its files alone.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from caprl_core import plot
from caprl_core.checkpoint import _STEP_RE, _TMP_RE, CHECKPOINTS_DIR, LATEST
from caprl_core.config import FIELDS, SECTIONS, TrainConfig, _flag, _get, _set, validate
from caprl_core.config_cli import Command
from caprl_core.distributed import World, barrier
from caprl_core.policy import TINY_RANDOM
from caprl_core.resume import ResumeError, latest_checkpoint

CONFIG, METRICS, SAMPLES, RESUMES, PLOT = "config.json", "metrics.jsonl", "samples.jsonl", "resumes.jsonl", "plot.png"
RUN_FILES = (CONFIG, METRICS, SAMPLES, RESUMES, PLOT, CHECKPOINTS_DIR)

# Options a resumed run may change: they decide how long it runs and what it shows and keeps, not what one step
# computes. --steps is one, except under --schedule cosine (whose decay ends at --steps: another length would change
# the learning rates of the steps still to come). Everything else (models, data, batch shape, reward, optimizer,
# seed, dtype, device, cache sizes) must equal the saved value, or the resumed run is another run.
# Options that change what a run logs, never what a step computes (the held-out evaluation leaves the training RNG
# stream alone: tests/test_heldout.py).
SAFE_ON_RESUME = ("steps", "output_dir", "progress", "sample_every", "checkpoint_every", "keep_last", "plot_every",
                  "max_skipped_steps", "eval_every", "eval_data", "report_to", "wandb_project")  # fmt: skip
_PATHS = ("policy", "reader", "data")


class RunDirError(ValueError):
    """A run directory that this command may not write into as asked; one line naming the option."""


# --- which configuration a run starts or continues with ---------------------------------------------------------------


def plan(command: Command) -> tuple[TrainConfig, bool, bool]:
    """(config, resume, overwrite) to train with. A resume takes the run's saved configuration with the options the
    user gave applied over it, refusing any that would change the run (a one-line ResumeError naming the flag);
    `--resume if-exists` with no checkpoint is a fresh run (over whatever run files hold no checkpoint). Reads only."""
    config, out = command.config, command.config.log.output_dir
    if command.resume is None:
        return config, False, command.overwrite
    if latest_checkpoint(out) is None:
        if command.resume == "if-exists":
            return config, False, True
        raise ResumeError(nothing_to_resume(Path(out)))
    return resumed_config(Path(out), command.given), True, False


def nothing_to_resume(out: Path) -> str:
    what = "does not exist" if not out.exists() else "holds no complete checkpoint"
    return f"--resume: {out} {what}; nothing to resume (`--resume if-exists` starts a fresh run when there is none)"


def resumed_config(out: Path, given: dict[str, Any]) -> TrainConfig:
    """The run's saved configuration (`out`/config.json, else its latest checkpoint's) with `given` applied over it;
    a ResumeError naming the first given option that differs from the saved value and is not in SAFE_ON_RESUME."""
    saved = saved_config(out)
    config = config_from_dict(saved.to_dict())  # a copy: `saved` stays what the run was
    for name, value in given.items():
        before = _get(saved, name)
        if _same(name, value, before):
            continue
        why = _why_unsafe(name, saved)
        if why is not None:
            raise ResumeError(f"{_flag(name)} {_text(value)}: the run in {out} was started with {_flag(name)} "
                              f"{_text(before)}, and {why}")  # fmt: skip
        _set(config, name, value)
    _set(config, "output_dir", str(out))
    validate(config)
    return config


def saved_config(out: Path) -> TrainConfig:
    """The configuration run directory `out` was started (or last resumed) with."""
    for path in (out / CONFIG, _checkpoint_state(out)):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        raw = raw.get("config", raw) if path.name == "state.json" else raw
        if _is_run_config(raw):
            return config_from_dict(raw)
    raise ResumeError(f"--resume: {out} has no readable {CONFIG} (nor a checkpoint that holds its configuration)")


def write_config(out: Path, config: TrainConfig) -> None:
    """`out`/config.json: the configuration the run was started (or last resumed) with."""
    (out / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """`TrainConfig.to_dict()`'s inverse; options it lacks (a run from before they existed) keep their defaults."""
    config = TrainConfig()
    for name, (section, _) in FIELDS.items():
        part = raw.get(section, {}) if section else raw
        if isinstance(part, dict) and name in part:
            _set(config, name, part[name])
    return config


def changes(before: TrainConfig, after: TrainConfig) -> dict[str, list]:
    """{option: [old, new]} where two configurations differ (what a resume changed), the run directory aside."""
    return {name: [_get(before, name), _get(after, name)] for name in FIELDS
            if name != "output_dir" and _get(before, name) != _get(after, name)}  # fmt: skip


def _why_unsafe(name: str, saved: TrainConfig) -> str | None:
    if name == "steps" and saved.optim.schedule == "cosine":
        return (
            "its cosine schedule decays to 0 at that step: another --steps changes the learning rate of every "
            "step still to come (start a new run for a longer one)"
        )
    if name in SAFE_ON_RESUME:
        return None
    safe = ", ".join(_flag(n) for n in SAFE_ON_RESUME if n != "output_dir")
    return f"a resumed run keeps its configuration (it may change only {safe}; another run needs another --output-dir)"


def _same(name: str, a: Any, b: Any) -> bool:
    if name in _PATHS and a is not None and b is not None and TINY_RANDOM not in (a, b):
        return Path(a).resolve() == Path(b).resolve()  # ./x and x are the same directory
    return a == b


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _checkpoint_state(out: Path) -> Path:
    ckpt = latest_checkpoint(out)
    return ckpt / "trainer_state" / "state.json" if ckpt is not None else out / CONFIG


def _is_run_config(raw: Any) -> bool:
    return isinstance(raw, dict) and all(isinstance(raw.get(section), dict) for section in SECTIONS)


# --- the run directory ------------------------------------------------------------------------------------------------


def open_run_dir(out: Path, resume: bool, overwrite: bool, world: World) -> Path | None:
    """The checkpoint a resume continues from (ResumeError when there is none); for a fresh run, checks that `out`
    holds no run (RunDirError), or deletes it with `overwrite` (rank 0; every rank waits), and returns None."""
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise ResumeError(nothing_to_resume(out))
        return ckpt
    found = run_files(out)
    if found and not overwrite:
        raise RunDirError(f"--output-dir {out}: already holds a run ({', '.join(found)}); continue it with --resume, "
                          "or delete it and start anew with --overwrite")  # fmt: skip
    if found:
        _check_deletable(out, found)
        if world.is_main:
            for name in found:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    barrier(world)
    return None


def run_files(out: Path) -> list[str]:
    """The RUN_FILES that `out` holds."""
    return [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]


def _check_deletable(out: Path, found: list[str]) -> None:
    """RunDirError when deleting `found` could delete what is not a run's: a config.json that is no run's
    configuration, a checkpoints/ with entries no run writes."""
    if CONFIG in found:
        try:
            ours = _is_run_config(json.loads((out / CONFIG).read_text()))
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise RunDirError(f"--overwrite: {out / CONFIG} is not a training run's configuration; not deleting "
                              f"anything in {out} (is it the right --output-dir?)")  # fmt: skip
    ckpts = out / CHECKPOINTS_DIR
    if CHECKPOINTS_DIR in found:
        foreign = [] if ckpts.is_dir() and not ckpts.is_symlink() else [ckpts.name]
        foreign += [e.name for e in ckpts.iterdir() if not _is_checkpoint_entry(e.name)] if not foreign else []
        if foreign:
            raise RunDirError(f"--overwrite: {ckpts} holds {', '.join(sorted(foreign)[:3])}, which a run does not "
                              f"write; not deleting anything in {out}")  # fmt: skip


def _is_checkpoint_entry(name: str) -> bool:
    return bool(_STEP_RE.match(name) or _TMP_RE.search(name)) or name == LATEST


# --- plot.png and Ctrl-C ----------------------------------------------------------------------------------------------


class Plotter:
    """Redraws plot.png from metrics.jsonl. A failure (matplotlib, a full disk) never stops training: the first is
    reported with one warning line, later ones silently."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.metrics, self.png, self.enabled, self.warned = output_dir / METRICS, output_dir / PLOT, enabled, False

    def draw(self) -> None:
        if not self.enabled or not self.metrics.exists():
            return
        try:
            plot.plot_metrics(self.metrics, self.png)
        except Exception as e:  # noqa: BLE001 - a figure is never worth the run
            if not self.warned:
                print(f"[caprl_core.train] warning: {PLOT} not drawn ({type(e).__name__}: {' '.join(str(e).split())}); "
                      "training goes on, later plot failures are not reported", file=sys.stderr)  # fmt: skip
            self.warned = True


class Interrupted(Exception):
    """Ctrl-C (SIGINT) during training: the step in progress was abandoned; `message` is the one line to print."""

    def __init__(self, step: int, output_dir: Path, is_main: bool) -> None:
        ckpt = latest_checkpoint(output_dir)
        then = (f"resume with: python -m caprl_core.train --output-dir {output_dir} --resume" if ckpt is not None else
                "nothing to resume: rerun the command with --overwrite to start again")  # fmt: skip
        self.is_main = is_main
        self.message = f"[caprl_core.train] interrupted at step {step}; last checkpoint: {ckpt or 'none'}; {then}"
        super().__init__(self.message)


_sigint = {"seen": False}


def watch_sigint() -> None:
    """From now on SIGINT raises KeyboardInterrupt, as Python's default handler does, and is remembered
    (`sigint_seen`). Under torchrun every rank gets the Ctrl-C, but one blocked in a collective may first fail with
    the collective's error (its peer has already left: gloo's "Connection closed by peer"); that error is the same
    Ctrl-C and ends the run the same way, not with a traceback. Main thread only; elsewhere nothing changes."""
    _sigint["seen"] = False

    def handler(signum, frame):
        _sigint["seen"] = True
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass


def sigint_seen() -> bool:
    """Whether a SIGINT arrived since `watch_sigint`."""
    return _sigint["seen"]


@contextmanager
def no_interrupts() -> Iterator[None]:
    """SIGINT ignored inside (a second Ctrl-C while the interrupted run draws its plot); main thread only."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
