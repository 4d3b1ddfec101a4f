"""A run's setup: models, data, sampler, reward, optimizer and schedule (`setup`), before anything trains."""

from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from caprl_core.config import TrainConfig
from caprl_core.data import Example, load_jsonl
from caprl_core.distributed import (
    ONE_PROCESS,
    TokenLogprobs,
    World,
    barrier,
    gathered,
    rank_device,
    shard_policy,
)
from caprl_core.policy import DTYPES, PolicyPrompter, _default_dtype, checked_device, load_models
from caprl_core.precision import MasterWeightOptimizer
from caprl_core.reward import CapRLReward
from caprl_core.rl.batches import policy_logprobs
from caprl_core.rl.lifecycle import write_config
from caprl_core.rl.scoring import reward_config
from caprl_core.rl.state import load_full_weights
from caprl_core.rl.step import Run
from caprl_core.sampler.engine import Engine
from caprl_core.world import make_world_data


def device_and_dtype(config: TrainConfig) -> tuple[torch.device, torch.dtype]:
    name = config.model.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = checked_device(name)
    return device, _default_dtype(DTYPES[config.model.dtype], device)


def _load_user_data(config: TrainConfig) -> list[Example] | None:
    """--data's examples, read before the run directory is made (a file with no valid line is `DataError`, and must
    leave nothing behind); None without --data."""
    if config.data.data is None:
        return None
    return load_jsonl(config.data.data, on_error=config.data.on_error).examples


def _world_data(config: TrainConfig, output_dir: Path, world: World = ONE_PROCESS) -> list[Example]:
    """The miniature world's train split (`world.make_world_data`), written once, by rank 0, into the (shared) run
    directory."""
    path = output_dir / "data" / "data.jsonl"
    if world.is_main:
        path = make_world_data(output_dir / "data", "train", config.data.synthetic_images)
    barrier(world)
    return load_jsonl(path, on_error=config.data.on_error).examples


def _schedule(config: TrainConfig):
    """LR multiplier per step: linear warm-up, then constant or cosine to 0 at the last step."""
    o, total = config.optim, config.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(config: TrainConfig, world: World = ONE_PROCESS, weights_from: Path | None = None) -> Run:
    """Models, data, sampler, reward, optimizer and schedule of a run (nothing trained yet). Under torchrun
    (`world.distributed`) the policy is loaded in fp32, given the weights of checkpoint `weights_from` (a resume),
    then sharded; the sampler and the reader are this rank's own."""
    seed_everything(config.seed)
    device, dtype = device_and_dtype(config)
    device = rank_device(device, world)
    # Models first: a directory that does not load must not leave a half-made run directory behind.
    models = load_models(config.model.policy, config.model.reader, dtype=dtype, device=device, seed=config.seed)
    policy, tokenizer, image_processor = models.policy, models.tokenizer, models.image_processor
    reader, reader_tokenizer = models.reader, models.reader_tokenizer
    if world.distributed:
        # Sharded, the fp32 parameters are the masters. Loaded in the compute dtype first, they start where one
        # process's masters start (its weights rounded to that dtype), so N ranks step what one process steps.
        policy.float()
    examples = _load_user_data(config)
    output_dir = Path(config.log.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    output_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main and weights_from is None:  # a resume writes it once its checkpoint has loaded (train._train)
        write_config(output_dir, config)
    reader.requires_grad_(False)
    if config.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if examples is None:
        examples = _world_data(config, output_dir, world)
    prompter = PolicyPrompter(tokenizer, image_processor, config.rollout.instruction)
    # The KL reference is the initial policy, frozen and replicated per rank; with beta == 0 (the recipe) none.
    ref_policy = copy.deepcopy(policy).to(dtype).requires_grad_(False) if config.optim.beta > 0 else None
    root = TokenLogprobs(policy, policy_logprobs)
    if world.distributed:
        if weights_from is not None:
            load_full_weights(weights_from, root)  # into the full fp32 model, before it is split into shards
        shard_policy(root, world, dtype)
    with gathered(root):  # the engine reads the compute dtype off the gathered weights
        engine = Engine(policy, kv_cache_tokens=config.rollout.kv_cache_tokens)
    reward = CapRLReward(reader, reader_tokenizer, reward_config(config, models.reader_template))
    # AdamW over fp32 masters of the policy's weights, whatever dtype the policy computes in (caprl_core.precision);
    # sharded, the fp32 shards are the masters and no copy is made.
    optimizer = MasterWeightOptimizer(
        root, lambda params: torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, _schedule(config))
    return Run(config, output_dir, device, policy, ref_policy, tokenizer, prompter, engine, reward, optimizer,
               scheduler, examples, models.processors, world, root if world.distributed else None)  # fmt: skip
