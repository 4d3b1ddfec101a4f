"""The reward phase: the reader scores every caption (`CapRLReward`), the rewards of all ranks are gathered, and
`ops.group_advantages` turns them into advantages within each image's group; fact precision and recall where the
references are the miniature world's captions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from caprl_core import grpo, ops
from caprl_core.config import TrainConfig
from caprl_core.data import Example
from caprl_core.distributed import (
    ONE_PROCESS,
    World,
    all_gather_objects,
)
from caprl_core.reward import CapRLReward
from caprl_core.reward_config import RewardConfig
from caprl_core.reward_prompts import DEFAULT_TEMPLATE, PromptTemplate
from caprl_core.rl.rollout import Rollout
from caprl_core.world.grammar import caption_fact_counts


def reward_config(config: TrainConfig, reader_template: PromptTemplate | None) -> RewardConfig:
    """The reward's configuration from the run's: with --reward-preset recipe the published server's prompt and
    answer letters (`RewardConfig.recipe`), else the reader directory's template or the default one."""
    g = config.reward
    values = dict(num_draws=g.num_draws, mode=g.mode, temperature=g.reader_temperature, seed=config.seed,
                  kv_cache_tokens=config.rollout.reader_kv_cache_tokens)  # fmt: skip
    if g.reward_preset == "recipe":
        return RewardConfig.recipe(**values)
    return RewardConfig(**values, template=reader_template or DEFAULT_TEMPLATE)


def rewards_and_advantages(reward: CapRLReward, ro: Rollout, examples: list[Example], config: TrainConfig,
                           step: int, world: World = ONE_PROCESS, first_image: int = 0,
                           ) -> tuple[torch.Tensor, torch.Tensor, dict]:  # fmt: skip
    """(rewards [n, R] per component, advantages [n], metrics) of this rank's n = len(examples) * G captions, which
    start at image `first_image` of the step's global batch. Component 0 is the reader's accuracy. Question draws
    are keyed by the caption's (or, with shared_draws, the image's) global index; advantages and metrics are
    computed on every rank's captions together, as one process computes them on the whole batch."""
    g, G = config.reward, config.rollout.group_size
    questions = [list(ex.questions) for ex in examples for _ in range(G)]
    first = first_image * G
    keys = [first_image + i // G if g.shared_draws else first + i for i in range(len(questions))]
    # `score` keeps only the reader's few-shot header cached between calls, always computed alone (Engine.prefill's
    # shared_prefix), so the numbers depend on this step's captions only (bit-exact resume). The cache is released
    # right after scoring, as the policy's backward pass needs that memory (update-phase peak 713 MB released vs
    # 1308 MB kept, bench_train, 3B-shaped reader), all but the header's full blocks: a few hundred tokens, copied
    # back into the next step's cache instead of computed again (docs/reward.md, "The reader's KV cache").
    accuracy, details = reward.score(ro.captions, questions, step=step, draw_keys=keys)
    reward.release_kv_cache()
    local = {
        "accuracy": accuracy.float().cpu().tolist(), "length": [len(c.token_ids) for c in ro.completions],
        "caption_tokens": [len(c.token_ids) - (c.finish_reason == "stop") for c in ro.completions],
        "truncated": ro.truncated.tolist(), "captions": ro.captions,
        "references": [ex.caption for ex in examples for _ in range(G)],
        # p/q of each sampled token: the share of the policy's mass that bans, top-k and top-p kept (1 = unfiltered)
        "kept": [math.exp(p - q) for c in ro.completions for p, q in zip(c.policy_logprobs, c.logprobs, strict=True)],
        "computed": details.computed_tokens, "prompt_tokens": details.prompt_tokens,
    }  # fmt: skip
    every = _concat(all_gather_objects(local, world))  # the whole step's captions, in global order
    rewards, advantages, metrics = advantages_and_metrics(every, config, step)
    mine = slice(first, first + len(ro.completions))
    return rewards[mine], advantages[mine], metrics


def _concat(parts: list[dict]) -> dict:
    """Ranks' per-caption lists joined in rank order (= global order); counts summed."""
    return {k: sum(p[k] for p in parts) if isinstance(parts[0][k], int) else [x for p in parts for x in p[k]]
            for k in parts[0]}  # fmt: skip


def advantages_and_metrics(every: dict, config: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rewards [N, R], advantages [N] and the step's reward metrics from the whole batch's per-caption results."""
    g, G = config.reward, config.rollout.group_size
    accuracy = torch.tensor(every["accuracy"], dtype=torch.float32)
    lengths = torch.tensor(every["length"], dtype=torch.float32)
    judged = judge_scores(g.judge, every["caption_tokens"], config.rollout.max_new_tokens)
    columns, weights = [accuracy if judged is None else judged], [1.0]
    if g.length_weight > 0:  # caption tokens without the stop token, as the recipe's server counts them
        caption_tokens = torch.tensor(every["caption_tokens"], dtype=torch.float32)
        columns.append(grpo.caption_length_reward(caption_tokens, g.length_l1, g.length_l2))
        weights.append(g.length_weight)
    rewards = torch.stack(columns, dim=1)  # [N, R]
    # sum: one score, accuracy + weight x R_len, normalised in the group (the recipe's server); else each column alone
    signal = grpo.combined_score(rewards, weights) if g.length_combine == "sum" else rewards  # [N, R'] R' in {1, R}
    if g.shuffle_rewards:  # the control run: each caption gets another caption's rewards
        signal = signal[torch.from_numpy(np.random.default_rng([config.seed, step, 7]).permutation(len(rewards)))]
    decoupled = signal.shape[1] > 1
    advantages = ops.group_advantages(
        signal if decoupled else signal[:, 0], group_size=G, method=g.advantage, scale=g.scale,
        weights=torch.tensor(weights) if decoupled else None,
    )  # fmt: skip
    total = (rewards * torch.tensor(weights)).sum(1)
    flat_groups = (total.view(-1, G).max(1).values == total.view(-1, G).min(1).values).float().mean()
    kept = every["kept"]
    metrics = {
        "sampled_mass": sum(kept) / max(1, len(kept)),
        "reward_mean": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
        "accuracy": float(accuracy.mean()), "zero_adv_groups": float(flat_groups),
        "caption_length": float(lengths.mean()),
        "truncation_rate": float(torch.tensor(every["truncated"], dtype=torch.float32).mean()),
        "reader_tokens_computed": every["computed"], "reader_tokens": every["prompt_tokens"],
    }  # fmt: skip
    if judged is not None:  # "accuracy" stays the reader's, so the judge's effect on it shows
        metrics["judge_score"] = float(judged.mean())
    metrics.update(_fact_metrics(every["captions"], every["references"]))
    return rewards, advantages, metrics


def judge_scores(judge: str, caption_tokens: list[int], max_new_tokens: int) -> torch.Tensor | None:
    """The ablation's judge reward per caption [N] in [0, 1], or None for the CapRL reward (judge "none").
    "length": caption tokens over max_new_tokens, a judge that prefers long captions whatever they say."""
    if judge == "none":
        return None
    if judge == "length":
        return (torch.tensor(caption_tokens, dtype=torch.float32) / max_new_tokens).clamp(max=1.0)
    raise ValueError(f"judge: must be none or length, got {judge!r}")


def _fact_metrics(captions: list[str], references: list[str | None]) -> dict:
    """fact_precision and fact_recall of the captions (micro-averaged) against the facts of their reference captions,
    when every reference is a complete caption of the miniature world's grammar; else nothing."""
    counts = caption_fact_counts(captions, references)
    if counts is None:
        return {}
    true, claims, stated, facts = counts
    return {"fact_precision": true / claims if claims else float("nan"), "fact_recall": stated / facts}
