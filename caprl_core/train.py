"""`python -m caprl_core.train`: CapRL with GRPO on one node.

    python -m caprl_core.train                                   # the shipped miniature world, a few CPU minutes
    python -m caprl_core.train --policy Qwen2.5-VL-3B-Instruct --reader Qwen2.5-3B-Instruct --data train.jsonl
    python -m caprl_core.train --output-dir runs/x --resume      # continue the run: its saved config and checkpoint

One step: (1) rollout: the policy samples G captions for each of B images through the paged sampler (the policy
object itself, no weight sync), with the log-probs it sampled them with; (2) reward: the reader scores every caption
with N drawn questions (`CapRLReward`), plus an optional caption-length term, and `ops.group_advantages` turns the
rewards into advantages within each image's group; (3) update: for each micro-batch the policy's hidden states and
`ops.linear_token_logprobs` give the caption tokens' log-probs (the [tokens, vocab] logits never exist), the
clipped GRPO loss (`caprl_core.grpo`) is back-propagated, and AdamW steps once per batch (num_iterations times).
By default the update's forward packs each image's prompt once followed by its captions in the micro-batch
(`caprl_core.shared_prefix`: the vision tower encodes each image once); `shared_prefix=False` runs one padded
`prompt + caption` row per caption, the reference it equals.

The phases live in caprl_core/rl/ (rollout, scoring, batches, update; `Run.step` in rl/step.py runs them top to
bottom); this module runs the loop (step -> log -> checkpoint -> plot) and the command (its flags and --config file:
`caprl_core.config_cli`). What a run may do to its directory (a resume keeps the saved configuration, a fresh run
never mixes with an old one, --overwrite, Ctrl-C: one line and exit 130) is `caprl_core.rl.lifecycle`.

Output directory: metrics.jsonl (one line per step; with --eval-every the held-out evaluation's heldout_* keys on its
steps: caprl_core.rl.heldout), samples.jsonl (captions every few steps), plot.png (every --plot-every steps, default
at each checkpoint, and at exit), config.json, resumes.jsonl (what each resume changed), checkpoints/step-*/ (Hugging
Face format with safetensors + trainer state; `latest` names the newest complete one); with --report-to,
tensorboard/ or wandb/ (caprl_core.rl.report).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

from caprl_core._cli import plain_warnings
from caprl_core.config import TrainConfig, _flag
from caprl_core.config_cli import parse_command, print_config
from caprl_core.data import DataError
from caprl_core.distributed import World, WorldSizeError, barrier, close_world, init_world, local_images
from caprl_core.policy import DeviceError, ModelLoadError
from caprl_core.precision import NonFiniteGradientError
from caprl_core.resume import ResumeError, latest_checkpoint
from caprl_core.rl import report, state
from caprl_core.rl.heldout import HeldOut
from caprl_core.rl.lifecycle import (
    METRICS,
    RESUMES,
    SAMPLES,
    Interrupted,
    Plotter,
    RunDirError,
    changes,
    no_interrupts,
    open_run_dir,
    plan,
    saved_config,
    sigint_seen,
    watch_sigint,
    write_config,
)
from caprl_core.rl.progress import Progress, trim_metrics
from caprl_core.rl.setup import device_and_dtype, setup
from caprl_core.rl.step import Run


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run training; returns the output directory. Under torchrun every rank runs this; rank 0 writes the logs.
    resume: continue from the last checkpoint in config.log.output_dir (ResumeError when there is none); overwrite:
    delete the run already there (`caprl_core.rl.lifecycle`); neither with a run there: RunDirError."""
    report.require(config.log.report_to)  # a missing package stops the run before any model loads
    device, _ = device_and_dtype(config)
    world = init_world(device.type)
    try:
        local_images(config.rollout.images_per_step, world)  # before any model loads: a batch that cannot split
        out = _train(config, resume, overwrite, world)
        # Rank 0 ends seconds after the others (the last checkpoint, plot.png): no rank tears its gloo/NCCL connections
        # down while another is still running. A 2-rank CPU run once aborted in teardown without this (CI, 2026-12-07).
        barrier(world)
        return out
    finally:
        close_world(world)


def _train(config: TrainConfig, resume: bool, overwrite: bool, world: World) -> Path:
    out = Path(config.log.output_dir) if config.log.output_dir else None
    ckpt = open_run_dir(out, resume, overwrite, world) if out is not None else None
    before = saved_config(out) if ckpt is not None else None  # before setup writes this run's config.json
    run = setup(config, world, weights_from=ckpt)
    output_dir, main_rank = run.output_dir, world.is_main
    start = 0
    if ckpt is not None:
        start = state.resume(run, ckpt)
        if main_rank:  # only now: a resume that fails to load leaves the run's config.json as it was
            write_config(output_dir, config)
            _continue_logs(output_dir, ckpt, start, changes(before, config))
    heldout = HeldOut(run) if config.log.eval_every else None
    reporters = report.Reporters(config, output_dir, start, enabled=main_rank)
    plotter = Plotter(output_dir, main_rank)
    progress = Progress(config.steps, start, config.log.progress and main_rank)
    in_progress = start  # the step a Ctrl-C abandons: the next one once a step's checkpoint is written
    try:
        for step in range(start, config.steps):
            in_progress = step
            metrics = run.step(step)
            if heldout is not None and heldout.due(step):  # after the update: the policy checkpoint step-N holds
                metrics.update(heldout.evaluate(run))
            if main_rank:
                with (output_dir / METRICS).open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            reporters.log(metrics)  # beside metrics.jsonl, never instead of it
            progress.update(step, metrics)
            _stop_on_skips(run, step)  # before a checkpoint: the last one stays the last good one
            checkpoint = (step + 1) % config.log.checkpoint_every == 0 or step == config.steps - 1
            if checkpoint:
                state.save(run, step)
                in_progress = step + 1
            if checkpoint if config.log.plot_every is None else (step + 1) % config.log.plot_every == 0:
                plotter.draw()
    except KeyboardInterrupt:  # Ctrl-C: the step in progress is abandoned; a resume redoes it from the checkpoint
        raise Interrupted(in_progress, output_dir, main_rank) from None
    except Exception:
        if sigint_seen():  # under torchrun: a collective that failed because another rank left on the same Ctrl-C
            raise Interrupted(in_progress, output_dir, main_rank) from None
        raise
    finally:  # plot.png shows every logged step, whatever ended the run
        progress.close()
        with no_interrupts():
            reporters.close()
            plotter.draw()
    return output_dir


def _continue_logs(output_dir: Path, ckpt: Path, start: int, changed: dict[str, list]) -> None:
    """A resumed run's logs: lines past its checkpoint go (the run writes them again), and resumes.jsonl and stderr
    say where it resumed and which options it changed."""
    for log in (METRICS, SAMPLES):
        trim_metrics(output_dir / log, start - 1)
    with (output_dir / RESUMES).open("a") as f:
        f.write(json.dumps({"step": start, "checkpoint": str(ckpt), "changed": changed}) + "\n")
    what = "; ".join(f"{_flag(name)} {old} -> {new}" for name, (old, new) in changed.items())
    print(f"[caprl_core.train] resumed from {ckpt} at step {start}" + (f"; changed {what}" if what else ""),
          file=sys.stderr)  # fmt: skip


def _stop_on_skips(run: Run, step: int) -> None:
    skips, limit = run.optimizer.consecutive_skips, run.config.optim.max_skipped_steps
    if skips >= limit:
        last = latest_checkpoint(run.output_dir)
        raise NonFiniteGradientError(f"step {step}: {skips} optimizer steps in a row had a non-finite gradient norm "
                                     f"and were skipped (--max-skipped-steps {limit}); the last good checkpoint is "
                                     f"{last or 'none'}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """The command: 0 done, 1 stopped by non-finite gradients, 2 a bad flag, directory or checkpoint (one line),
    130 Ctrl-C (one line: the step abandoned, the last checkpoint, how to resume; rank 0 only)."""
    watch_sigint()
    if "WORLD_SIZE" in os.environ:  # torchrun reports a rank's fatal signal as "Signal 6": print where it was too
        faulthandler.enable()
    try:
        return _main(argv)
    except Interrupted as e:
        if e.is_main:
            print(e.message, file=sys.stderr)
        return 130
    except Exception:
        if not sigint_seen():
            raise
        return _interrupted_outside_a_step()  # a collective failed because another rank left on the same Ctrl-C
    except KeyboardInterrupt:
        return _interrupted_outside_a_step()


def _interrupted_outside_a_step() -> int:
    """Ctrl-C while parsing, loading models or closing: no step was in progress."""
    if os.environ.get("RANK", "0") == "0":
        print("[caprl_core.train] interrupted (no training step was in progress)", file=sys.stderr)
    return 130


def _main(argv: list[str] | None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoint writes would print bars of their own between the run's
    plain_warnings()
    try:
        command = parse_command(argv)
        config, resume, overwrite = plan(command)  # a resume: the run's saved config, checked flags
    except ValueError as e:
        print(f"python -m caprl_core.train: error: {e}", file=sys.stderr)
        return 2
    if command.print_config:  # with --resume: what the resume would run with, not the command line's defaults
        origin = f"resumed: the saved configuration of {config.log.output_dir}" if resume else "a fresh run"
        print_config(config, origin + " with the options given applied")
        return 0
    try:
        out = train(config, resume=resume, overwrite=overwrite)
    except (ModelLoadError, WorldSizeError, ResumeError, RunDirError, DataError, DeviceError, report.ReportError) as e:
        # the user's input: a directory, a batch size, a package --report-to needs, ...
        print(f"python -m caprl_core.train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteGradientError as e:
        print(f"python -m caprl_core.train: error: {e}", file=sys.stderr)
        return 1
    print(f"[caprl_core.train] done: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
