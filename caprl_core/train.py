"""`python -m caprl_core.train`: CapRL with GRPO on one node.

    python -m caprl_core.train                                   # the shipped miniature world, a few CPU minutes
    python -m caprl_core.train --policy Qwen2.5-VL-3B-Instruct --reader Qwen2.5-3B-Instruct --data train.jsonl
    python -m caprl_core.train --output-dir runs/x --resume      # continue from the last complete checkpoint

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
bottom); this module runs the loop (step -> log -> checkpoint) and the command (its flags and --config file:
`caprl_core.config_cli`).

Output directory: metrics.jsonl (one line per step; with --eval-every the held-out evaluation's heldout_* keys on its
steps: caprl_core.rl.heldout), samples.jsonl (captions every few steps), plot.png, config.json, checkpoints/step-*/
(Hugging Face format with safetensors + trainer state; `latest` names the newest complete one); with --report-to,
tensorboard/ or wandb/ (caprl_core.rl.report).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from caprl_core._cli import plain_warnings
from caprl_core.config import TrainConfig
from caprl_core.config_cli import parse_config
from caprl_core.data import DataError
from caprl_core.distributed import World, WorldSizeError, close_world, init_world, local_images
from caprl_core.plot import plot_metrics
from caprl_core.policy import ModelLoadError
from caprl_core.precision import NonFiniteGradientError
from caprl_core.resume import ResumeError, latest_checkpoint
from caprl_core.rl import report, state
from caprl_core.rl.heldout import HeldOut
from caprl_core.rl.progress import Progress, trim_metrics
from caprl_core.rl.setup import DeviceError, device_and_dtype, setup
from caprl_core.rl.step import Run


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Run training; returns the output directory. Under torchrun every rank runs this; rank 0 writes the logs."""
    report.require(config.log.report_to)  # a missing package stops the run before any model loads
    device, _ = device_and_dtype(config)
    world = init_world(device.type)
    try:
        local_images(config.rollout.images_per_step, world)  # before any model loads: a batch that cannot split
        return _train(config, resume, world)
    finally:
        close_world(world)


def _train(config: TrainConfig, resume: bool, world: World) -> Path:
    ckpt = latest_checkpoint(config.log.output_dir) if resume and config.log.output_dir else None
    run = setup(config, world, weights_from=ckpt)
    output_dir, main_rank = run.output_dir, world.is_main
    start = 0
    metrics_path = output_dir / "metrics.jsonl"
    if ckpt is not None:
        start = state.resume(run, ckpt)
        if main_rank:
            trim_metrics(metrics_path, start - 1)
            print(f"[caprl_core.train] resumed from {ckpt} at step {start}", file=sys.stderr)
    elif metrics_path.exists() and main_rank:
        metrics_path.unlink()  # a fresh run in an existing directory starts a fresh log

    heldout = HeldOut(run) if config.log.eval_every else None
    reporters = report.Reporters(config, output_dir, start, enabled=main_rank)
    progress = Progress(config.steps, start, config.log.progress and main_rank)
    for step in range(start, config.steps):
        metrics = run.step(step)
        if heldout is not None and heldout.due(step):  # after the update: the policy checkpoint step-N holds
            metrics.update(heldout.evaluate(run))
        if main_rank:
            with metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        reporters.log(metrics)  # beside metrics.jsonl, never instead of it
        progress.update(step, metrics)
        _stop_on_skips(run, step)  # before a checkpoint: the last one stays the last good one
        last = step == config.steps - 1
        if (step + 1) % config.log.checkpoint_every == 0 or last:
            state.save(run, step)
    progress.close()
    reporters.close()
    if main_rank:
        plot_metrics(metrics_path, output_dir / "plot.png")
    return output_dir


def _stop_on_skips(run: Run, step: int) -> None:
    skips, limit = run.optimizer.consecutive_skips, run.config.optim.max_skipped_steps
    if skips >= limit:
        last = latest_checkpoint(run.output_dir)
        raise NonFiniteGradientError(f"step {step}: {skips} optimizer steps in a row had a non-finite gradient norm "
                                     f"and were skipped (--max-skipped-steps {limit}); the last good checkpoint is "
                                     f"{last or 'none'}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoint writes would print bars of their own between the run's
    plain_warnings()
    try:
        config, resume = parse_config(argv)
    except ValueError as e:
        print(f"python -m caprl_core.train: error: {e}", file=sys.stderr)
        return 2
    try:
        out = train(config, resume=resume)
    except (ModelLoadError, WorldSizeError, ResumeError, DataError, DeviceError, report.ReportError) as e:  # the
        # user's input (a directory, a batch size, a package --report-to needs, ...)
        print(f"python -m caprl_core.train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteGradientError as e:
        print(f"python -m caprl_core.train: error: {e}", file=sys.stderr)
        return 1
    print(f"[caprl_core.train] done: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
