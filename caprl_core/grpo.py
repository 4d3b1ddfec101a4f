"""The GRPO policy loss and its variants, as plain functions on tensors (no model, no trainer).

The trainer (`caprl_core.train`) recomputes the policy's log-probs of the sampled caption tokens and calls
`policy_loss`; everything here is differentiable tensor math, testable on hand-picked numbers.

Shapes: B captions, T caption tokens (right-padded), `mask[B, T]` True on real caption tokens.

Per token t of caption i, with A_i the caption's advantage (one per caption, from `ops.group_advantages`):

    r_it      = exp(logp_it - old_logp_it)                          importance ratio to the sampler's policy
    J_it      = min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)    PPO's clipped surrogate
    k3_it     = exp(ref_it - logp_it) - (ref_it - logp_it) - 1      k3 estimate of KL(policy || reference)
    loss_it   = -J_it + beta * k3_it

GRPO (Shao et al. 2024, "DeepSeekMath", eq. 3) uses this surrogate with eps_low = eps_high and the k3 KL term
(Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html), averaged over each
sequence's tokens and then over sequences. DAPO (Yu et al. 2025) raises the upper clip ("clip-higher",
eps_high = 0.28 with eps_low = 0.2), averages over all tokens of the batch at once so long captions are not
down-weighted per token, and drops truncated samples from the loss ("overlong filtering"). Dr.GRPO (Liu et al.
2025, "Understanding R1-Zero-Like Training: A Critical Perspective") divides by a constant, B * the maximum
completion length, which removes the length bias of per-sequence means.

The aggregations over the loss mask M (the caption mask, minus truncated captions when `mask_truncated`):

    "seq-mean-token-mean":  mean over captions with >= 1 token of (sum_t M_it loss_it / sum_t M_it)   (GRPO)
    "token-mean":           sum_it M_it loss_it / sum_it M_it                                          (DAPO)
    "constant":             sum_it M_it loss_it / (B * max_completion_length)                          (Dr.GRPO)

An all-masked batch gives loss 0 (not NaN) and zero gradients. Values at padding positions are never read (they
may be -inf or NaN). The math runs in fp32 (fp64 for fp64 inputs); metrics come back as detached fp32 scalars.
Nothing here reads a tensor back to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from caprl_core import _checks as check

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "constant")


@dataclass(frozen=True, slots=True)
class LossConfig:
    epsilon: float = 0.2  # lower clip: ratios below 1 - epsilon stop pushing negative-advantage tokens down
    epsilon_high: float | None = None  # upper clip; None = epsilon (DAPO's clip-higher: 0.28)
    aggregation: str = "token-mean"  # one of AGGREGATIONS
    max_completion_length: int | None = None  # the divisor's length for "constant" (required there)
    beta: float = 0.0  # weight of the k3 KL penalty to the reference policy; 0 = no reference needed
    mask_truncated: bool = False  # drop captions that hit the length limit from the loss (DAPO)

    def __post_init__(self) -> None:
        if not _finite("epsilon", self.epsilon) > 0:
            raise ValueError(f"epsilon: expected a finite number > 0, got {self.epsilon}")
        if self.epsilon_high is not None and not _finite("epsilon_high", self.epsilon_high) >= self.epsilon:
            raise ValueError(f"epsilon_high: expected None or a number >= epsilon ({self.epsilon}), "
                             f"got {self.epsilon_high}")  # fmt: skip
        check.choice("aggregation", self.aggregation, AGGREGATIONS)
        if not _finite("beta", self.beta) >= 0:
            raise ValueError(f"beta: expected a finite number >= 0, got {self.beta}")
        if self.max_completion_length is not None:
            check.positive_int("max_completion_length", self.max_completion_length)
        elif self.aggregation == "constant":
            raise ValueError("max_completion_length: required (an int >= 1) with aggregation='constant'")

    @property
    def clip_low(self) -> float:
        return self.epsilon

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is True (over everything, or along `dim`); 0 where nothing is selected.

    Unselected entries are never read, so they may be NaN or inf (`torch.where`, not a multiplication)."""
    picked = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    count = mask.sum(dtype=x.dtype) if dim is None else mask.sum(dim, dtype=x.dtype)
    total = picked.sum() if dim is None else picked.sum(dim)
    return total / count.clamp_min(1)


def k3_kl(logp_sampled: torch.Tensor, logp_other: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(p || q) from tokens sampled from p (Schulman 2020): with r = q/p,
    k3 = r - 1 - log r = exp(logp_other - logp_sampled) - (logp_other - logp_sampled) - 1.

    Unbiased for samples from p, never negative, lower variance than -log r. GRPO's penalty is
    `k3_kl(logp, ref_logp)` (DeepSeekMath eq. 4)."""
    log_r = logp_other - logp_sampled
    return torch.exp(log_r) - log_r - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str,
              max_completion_length: int | None = None) -> torch.Tensor:  # fmt: skip
    """Reduce a per-token loss [B, T] over mask [B, T] to a scalar, as the module docstring defines."""
    if aggregation == "token-mean":
        return masked_mean(per_token, mask)
    if aggregation == "seq-mean-token-mean":
        per_seq = masked_mean(per_token, mask, dim=1)  # [B]; 0 for captions without tokens
        present = mask.any(dim=1)  # [B]
        return per_seq.sum() / present.sum(dtype=per_seq.dtype).clamp_min(1)
    if aggregation == "constant":
        if max_completion_length is None:
            raise ValueError("max_completion_length: required with aggregation='constant'")
        total = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum()
        return total / (per_token.shape[0] * max_completion_length)
    raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    *,
    ref_logp: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO loss (scalar, differentiable w.r.t. `logp`) and detached fp32 metrics.

    logp [B, T]: the current policy's log-probs of the caption tokens (with grad).
    old_logp [B, T]: the sampler's log-probs at rollout time (treated as constants).
    advantages [B]: one per caption. mask [B, T] bool: True on caption tokens.
    ref_logp [B, T]: the frozen reference's log-probs; required when config.beta > 0. When given with beta == 0 it
        adds nothing to the loss but is still reported as the `kl` metric.
    truncated [B] bool: captions that hit the length limit; required when config.mask_truncated.
    entropy [B, T]: per-token policy entropy, only for the `entropy` metric.
    weights [B, T]: per-token importance weights on the clipped surrogate (not on the KL term), treated as constants:
        the rollout correction of `rollout_correction_weights`. None = 1.

    Metrics, all over the loss mask (truncated captions excluded when config.mask_truncated):
    clip_fraction / clip_low_fraction / clip_high_fraction: share of tokens where the clip is active, i.e. the
        gradient is cut (ratio < 1 - eps_low with A < 0, or ratio > 1 + eps_high with A > 0);
    approx_kl: mean k3 estimate of KL(old || current) from the sampled tokens, `k3_kl(old_logp, logp)`
        = exp(logp - old) - (logp - old) - 1 (the tokens come from the old policy, so this is the unbiased pairing);
    kl: mean `k3_kl(logp, ref_logp)` (when ref_logp is given); entropy: mean entropy (when given);
    ratio_mean: mean ratio; num_tokens: number of tokens in the loss.
    """
    _check_inputs(logp, old_logp, advantages, mask, config, ref_logp, truncated, entropy)
    if weights is not None:
        check.shape("weights", check.floating("weights", weights), tuple(logp.shape), "[B, T] like logp")
        check.same_device([("logp", logp), ("weights", weights)])
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    mask = _loss_mask(mask, truncated if config.mask_truncated else None)
    logp, old_logp = _clean(logp, mask, dtype), _clean(old_logp, mask, dtype).detach()
    adv = advantages.detach().to(dtype).unsqueeze(1)  # [B, 1]

    log_ratio = logp - old_logp  # [B, T]
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - config.clip_low, 1 + config.clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # [B, T]
    if weights is not None:
        per_token = per_token * _clean(weights, mask, dtype).detach()
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, _clean(ref_logp, mask, dtype).detach())
        if config.beta > 0:
            per_token = per_token + config.beta * kl
    loss = aggregate(per_token, mask, config.aggregation, config.max_completion_length)

    metrics = _clip_metrics(ratio.detach(), adv, mask, config)
    metrics["approx_kl"] = masked_mean(k3_kl(old_logp, logp.detach()), mask)
    metrics["ratio_mean"] = masked_mean(ratio.detach(), mask)
    metrics["num_tokens"] = mask.sum(dtype=dtype)
    if kl is not None:
        metrics["kl"] = masked_mean(kl.detach(), mask)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.detach().to(dtype), mask)
    return loss, {name: value.float() for name, value in metrics.items()}


def _clip_metrics(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, config: LossConfig) -> dict:
    low = (ratio < 1 - config.clip_low) & (adv < 0)  # [B, T]
    high = (ratio > 1 + config.clip_high) & (adv > 0)
    as_float = lambda x: x.to(ratio.dtype)
    return {
        "clip_fraction": masked_mean(as_float(low | high), mask),
        "clip_low_fraction": masked_mean(as_float(low), mask),
        "clip_high_fraction": masked_mean(as_float(high), mask),
    }


def _loss_mask(mask: torch.Tensor, truncated: torch.Tensor | None) -> torch.Tensor:
    """The tokens the loss uses: the caption mask, without truncated captions when those are dropped."""
    return mask if truncated is None else mask & ~truncated.unsqueeze(1)


def _clean(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the compute dtype with 0 at positions outside the mask.

    Padding may hold -inf or NaN; replacing it before exp() keeps the backward pass finite too (a NaN or inf
    behind a later torch.where would still turn its zero gradient into NaN)."""
    return torch.where(mask, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def _check_inputs(logp, old_logp, advantages, mask, config, ref_logp, truncated, entropy) -> None:
    if not isinstance(config, LossConfig):
        raise ValueError(f"config: expected a LossConfig, got {type(config).__name__}")
    check.ndim("logp", check.floating("logp", logp), 2)
    B, T = logp.shape
    check.shape("old_logp", check.floating("old_logp", old_logp), (B, T), "[B, T] like logp")
    check.shape("advantages", check.floating("advantages", advantages), (B,), "[B], one per caption")
    check.shape("mask", check.tensor("mask", mask), (B, T), "[B, T] like logp")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected dtype torch.bool, got {mask.dtype}")
    if config.beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp: required when beta > 0 (beta={config.beta})")
    if ref_logp is not None:
        check.shape("ref_logp", check.floating("ref_logp", ref_logp), (B, T), "[B, T] like logp")
    if config.mask_truncated and truncated is None:
        raise ValueError("truncated: required when mask_truncated=True")
    if truncated is not None:
        check.shape("truncated", check.tensor("truncated", truncated), (B,), "[B], one per caption")
        if truncated.dtype != torch.bool:
            raise ValueError(f"truncated: expected dtype torch.bool, got {truncated.dtype}")
    if entropy is not None:
        check.shape("entropy", check.floating("entropy", entropy), (B, T), "[B, T] like logp")
    if config.aggregation == "constant" and T > config.max_completion_length:
        raise ValueError(f"logp: {T} caption tokens per row exceed max_completion_length="
                         f"{config.max_completion_length}, the constant the loss divides by")  # fmt: skip
    pairs = [("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask),
             ("ref_logp", ref_logp), ("truncated", truncated), ("entropy", entropy)]  # fmt: skip
    check.same_device(pairs)


ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence")


def rollout_correction_weights(
    train_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, *, mode: str, level: str = "token",
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Importance weights [B, T] that correct for the sampler and the trainer computing different probabilities
    for the same policy (GPU decode kernels vs the training forward never agree bit for bit), and detached metrics.

    train_logp [B, T]: the trainer's log-probs of the sampled tokens at rollout time (no grad needed);
    sampler_logp [B, T]: the sampler's log-probs of the same tokens under the same (unfiltered) distribution.
    rho = exp(train_logp - sampler_logp) per token (level="token"), or exp(sum over the caption) for all its
    tokens (level="sequence"). mode "tis": truncated IS, w = min(rho, cap); "mis": masked IS, w = rho where
    rho <= cap, else 0 (the token or the caption leaves the loss); "none": w = 1. These are the modes TRL / ms-swift
    call token_truncate / token_mask / sequence_truncate / sequence_mask (ms-swift's default threshold is 2.0), and
    verl's rollout_is / rollout_rs (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"). Metrics: is_weight_mean, is_masked_fraction (share of tokens with weight 0), all over `mask`.
    """
    check.choice("mode", mode, ROLLOUT_CORRECTIONS)
    check.choice("level", level, CORRECTION_LEVELS)
    if not _finite("cap", cap) > 0:
        raise ValueError(f"cap: expected a number > 0, got {cap}")
    check.shape(
        "sampler_logp", check.floating("sampler_logp", sampler_logp), tuple(train_logp.shape), "like train_logp"
    )
    dtype = torch.float64 if train_logp.dtype == torch.float64 else torch.float32
    log_rho = _clean(train_logp.detach(), mask, dtype) - _clean(sampler_logp, mask, dtype)  # [B, T], 0 off-mask
    if level == "sequence":
        log_rho = log_rho.sum(1, keepdim=True).expand_as(log_rho)
    rho = torch.exp(log_rho.clamp_max(80.0))  # exp(80) is finite in fp32; anything that large is capped anyway
    if mode == "none":
        weights = torch.ones_like(rho)
    elif mode == "tis":
        weights = rho.clamp_max(cap)
    else:
        weights = torch.where(rho <= cap, rho, torch.zeros((), dtype=dtype, device=rho.device))
    metrics = {
        "is_weight_mean": masked_mean(weights, mask).float(),
        "is_masked_fraction": masked_mean((weights == 0).to(dtype), mask).float(),
    }
    return weights, metrics


def caption_length_reward(lengths: torch.Tensor, l1: int, l2: int) -> torch.Tensor:
    """Per-caption length reward [N] (fp32) from token counts [N]: 1 up to l1 tokens, falling linearly to 0 at
    l2, 0 beyond. An optional extra reward column that discourages padding captions past a useful length."""
    check.tensor("lengths", lengths)
    if not 0 < _finite("l1", l1) < _finite("l2", l2):
        raise ValueError(f"l1, l2: expected 0 < l1 < l2, got l1={l1}, l2={l2}")
    n = lengths.to(torch.float32)
    return ((l2 - n) / (l2 - l1)).clamp(0.0, 1.0)


def combined_score(rewards: torch.Tensor, weights) -> torch.Tensor:
    """[N, 1] = rewards [N, R] weighted by `weights` [R] and summed: the one score the recipe's server returns
    (accuracy + 0.2 x R_len), to be normalised in the group as a whole rather than column by column."""
    check.tensor("rewards", rewards)
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if rewards.dim() != 2 or weights.shape != (rewards.shape[1],):
        raise ValueError(f"rewards, weights: expected [N, R] and [R], got {list(rewards.shape)} and "
                         f"{list(weights.shape)}")  # fmt: skip
    return (rewards.float() * weights).sum(1, keepdim=True)
