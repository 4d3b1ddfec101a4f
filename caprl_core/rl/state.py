"""Saving and resuming a run: checkpoints of one process or of every rank (rank 0 writes the gathered state), and
the optimizer adapters that restore a checkpoint across world sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from caprl_core.checkpoint import save_checkpoint
from caprl_core.config import policy_defaults
from caprl_core.distributed import (
    TokenLogprobs,
    barrier,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
)
from caprl_core.resume import load_checkpoint, load_weights, resume_errors, saved_masters, saved_parameters
from caprl_core.rl.step import Run


def load_full_weights(ckpt: Path, root: TokenLogprobs) -> None:
    """A checkpoint's weights into the (unsharded, fp32) policy; where a one-process low-precision run saved fp32
    master copies, those, not its rounded weights."""
    with resume_errors(ckpt):
        load_weights(ckpt, root.policy)
        params = [p for p in root.parameters() if p.requires_grad]  # MasterWeightOptimizer's order
        masters = saved_masters(ckpt)
        if len(masters) != len(params):
            raise ValueError(f"its optimizer state has {len(masters)} parameters, this policy {len(params)}")
        with torch.no_grad():
            for p, m in zip(params, masters, strict=True):
                if m is not None:
                    p.copy_(m)


class _OneProcessOptimizerLoader:
    """What `load_checkpoint` restores the optimizer into in one process: masters a checkpoint lacks (a torchrun
    run's, whose fp32 weights are its masters) are rebuilt from its fp32 weights."""

    def __init__(self, run: Run, ckpt: Path) -> None:
        self.run, self.ckpt = run, ckpt

    def load_state_dict(self, state: dict) -> None:
        optimizer = self.run.optimizer
        optimizer.load_state_dict(state, lambda: saved_parameters(self.ckpt, self.run.policy, optimizer.params))


class _FullOptimizerState:
    """What `save_checkpoint` stores as the optimizer: the state gathered from every rank (rank 0's copy)."""

    def __init__(self, state: dict | None) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state


class _ShardedOptimizerLoader:
    """What `load_checkpoint` restores the optimizer into: a full saved state split into this rank's shards."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.run.root, self.run.optimizer.optimizer, state)


def save(run: Run, step: int) -> None:
    """Checkpoint `step`. Sharded: every rank takes part in gathering the full weights and optimizer state, rank 0
    writes them (the fp32 masters are the weights there), the others wait until the checkpoint is complete."""
    config, world = run.config, run.world
    # policy_defaults: a checkpoint of a world run keeps the world's defaults when trained on (config.policy_defaults)
    state = {"step": step, "config": config.to_dict(), "policy_defaults": policy_defaults(config.model.policy)[0]}
    if not world.distributed:
        save_checkpoint(run.output_dir, step, model=run.policy, optimizer=run.optimizer, scheduler=run.scheduler,
                        trainer_state=state, processors=run.processors, keep_last=config.log.keep_last)  # fmt: skip
        return
    weights = full_model_state(run.root, world)
    optimizer = _FullOptimizerState(full_optimizer_state(run.root, run.optimizer.optimizer, world))
    if world.is_main:
        save_checkpoint(run.output_dir, step, model=run.policy, optimizer=optimizer, scheduler=run.scheduler,
                        trainer_state=state, processors=run.processors, keep_last=config.log.keep_last,
                        state_dict=weights)  # fmt: skip
    barrier(world)


def resume(run: Run, ckpt: Path) -> int:
    """Restore the optimizer, schedule and RNG of `ckpt` (and one process: the weights); returns the next step."""
    with resume_errors(ckpt):
        if run.world.distributed:  # the weights went into the full model before sharding (setup)
            state = load_checkpoint(ckpt, model=None, optimizer=_ShardedOptimizerLoader(run), scheduler=run.scheduler)
        else:
            state = load_checkpoint(ckpt, model=run.policy, optimizer=_OneProcessOptimizerLoader(run, ckpt),
                                    scheduler=run.scheduler)  # fmt: skip
    return int(state["step"]) + 1
