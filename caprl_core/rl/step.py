"""One training step, top to bottom: rollout -> reward and advantages -> update -> the step's metrics (`Run.step`).
`Run` holds what the step uses (built by `caprl_core.rl.setup`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from caprl_core.config import TrainConfig
from caprl_core.data import Example
from caprl_core.distributed import (
    ONE_PROCESS,
    TokenLogprobs,
    World,
    gathered,
    local_images,
    reduce_floats,
)
from caprl_core.policy import PolicyPrompter
from caprl_core.precision import MasterWeightOptimizer
from caprl_core.reward import CapRLReward
from caprl_core.rl.progress import peak_memory_mb, reset_peak_memory
from caprl_core.rl.rollout import Rollout, batch_examples, rollout
from caprl_core.rl.scoring import rewards_and_advantages
from caprl_core.rl.update import update
from caprl_core.sampler.engine import Engine


@dataclass
class Run:
    """Everything a training step uses (see `setup`). Under torchrun `root` is the FSDP-sharded wrapper of
    `policy` (whose parameters are then shards outside `gathered(root)`)."""

    config: TrainConfig
    output_dir: Path
    device: torch.device
    policy: torch.nn.Module
    ref_policy: torch.nn.Module | None
    tokenizer: object
    prompter: PolicyPrompter
    engine: Engine
    reward: CapRLReward
    optimizer: MasterWeightOptimizer
    scheduler: object
    examples: list[Example]
    processors: list  # saved beside each checkpoint's weights: tokenizer, image processor, chat-template files
    world: World = ONE_PROCESS
    root: TokenLogprobs | None = None

    def step(self, step: int) -> dict:
        """One rollout -> reward -> update step over this rank's share of the step's images; returns the whole
        step's metrics (the same on every rank; peak memory per phase: the largest rank's)."""
        config, device, world = self.config, self.device, self.world
        reset_peak_memory(device)
        t0 = time.perf_counter()
        mine = local_images(config.rollout.images_per_step, world)
        batch = batch_examples(self.examples, step, config.rollout.images_per_step, config.seed)[mine.start : mine.stop]
        self.policy.eval()
        with gathered(self.root):  # every group gathered once for the whole rollout; resharded before the update
            ro = rollout(self.engine, self.prompter, self.tokenizer, batch, config, step, first_image=mine.start)
        t1, peak_rollout = time.perf_counter(), peak_memory_mb(device)
        reset_peak_memory(device)
        rewards, advantages, metrics = rewards_and_advantages(self.reward, ro, batch, config, step, world, mine.start)
        t2, peak_reward = time.perf_counter(), peak_memory_mb(device)
        reset_peak_memory(device)
        metrics.update(update(self.policy, self.ref_policy, self.optimizer, self.scheduler, ro, advantages, config,
                              device, world=world, root=self.root))  # fmt: skip
        t3, peak_update = time.perf_counter(), peak_memory_mb(device)
        generated = reduce_floats({"tokens": sum(len(c.token_ids) for c in ro.completions)}, world)["tokens"]
        peaks = reduce_floats({"rollout": peak_rollout, "reward": peak_reward, "update": peak_update}, world, "max")
        metrics.update({"time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2, "time_step": t3 - t0,
                        "tokens_per_s": generated / max(t1 - t0, 1e-9), "peak_memory_mb": max(peaks.values()),
                        "peak_memory_rollout_mb": peaks["rollout"], "peak_memory_reward_mb": peaks["reward"],
                        "peak_memory_update_mb": peaks["update"]})  # fmt: skip
        if step % config.log.sample_every == 0 and world.is_main:  # rank 0's first images: the batch's first
            self._write_samples(step, batch, ro, rewards)
        return {"step": step, **metrics}

    def _write_samples(self, step: int, batch: list[Example], ro: Rollout, rewards: torch.Tensor) -> None:
        """The first two images of the step: where the image is (relative to the run directory when inside it, as the
        world's data is), its reference caption if the data has one, the G captions and their rewards."""
        G = self.config.rollout.group_size
        with (self.output_dir / "samples.jsonl").open("a") as f:
            for i, ex in enumerate(batch[:2]):
                image = Path(ex.image)
                if image.resolve().is_relative_to(self.output_dir.resolve()):
                    image = image.resolve().relative_to(self.output_dir.resolve())
                f.write(json.dumps({"step": step, "id": ex.id, "image": str(image), "reference": ex.caption,
                                    "captions": ro.captions[i * G : (i + 1) * G],
                                    "rewards": rewards[i * G : (i + 1) * G, 0].tolist()}) + "\n")  # fmt: skip
