"""The update phase: num_iterations passes of micro-batched clipped-GRPO updates, one optimizer step per pass
(`update`); each micro-batch's loss share is taken against the whole batch's counts, over all ranks.
"""

from __future__ import annotations

import torch

from caprl_core import grpo
from caprl_core.config import TrainConfig
from caprl_core.distributed import (
    ONE_PROCESS,
    TokenLogprobs,
    World,
    reduce_floats,
)
from caprl_core.precision import MasterWeightOptimizer
from caprl_core.rl.batches import TrainingBatch, policy_logprobs, training_batch
from caprl_core.rl.rollout import Rollout


def update(policy, ref_policy, optimizer: MasterWeightOptimizer, scheduler, ro: Rollout, advantages: torch.Tensor,
           config: TrainConfig, device: torch.device, *, world: World = ONE_PROCESS,
           root: TokenLogprobs | None = None) -> dict:  # fmt: skip
    """num_iterations passes of micro-batched clipped-GRPO updates; one optimizer step per pass.

    `ro` and `advantages` are this rank's share of the step's batch; `root` (the FSDP root around `policy`, None: a
    plain one) runs the forward. Every micro-batch's loss share is taken against the whole batch's counts over all
    ranks, and FSDP sums the gradients, so N ranks step the one-process gradient.

    The policy computes in its own dtype (the sampler's), and the optimizer steps fp32 masters (caprl_core.precision).
    The ratio's old log-probs: with rollout_correction "none", the sampler's (of the same unfiltered distribution);
    otherwise the trainer's own from the first pass, with `grpo.rollout_correction_weights` correcting for the
    sampler's numbers. `sampler_kl` (k3, sampler -> trainer) and `sampler_max_abs_diff` measure that gap."""
    o, G = config.optim, config.rollout.group_size
    loss_config = grpo.LossConfig(epsilon=o.epsilon, epsilon_high=o.epsilon_high, aggregation=o.aggregation,
                                  max_completion_length=config.rollout.max_new_tokens, beta=o.beta,
                                  mask_truncated=o.mask_truncated)  # fmt: skip
    n = len(ro.completions)
    lengths = torch.tensor([len(c.token_ids) for c in ro.completions], dtype=torch.float32)
    keep = ~ro.truncated if o.mask_truncated else torch.ones(n, dtype=torch.bool)
    totals = reduce_floats({"tokens": float((lengths * keep).sum()), "seqs": float(keep.sum()), "n": n}, world)
    total_tokens, total_seqs = max(1.0, totals["tokens"]), max(1.0, totals["seqs"])
    root = root if root is not None else TokenLogprobs(policy, policy_logprobs)
    sums: dict[str, float] = {}
    first_pass: dict[int, torch.Tensor] = {}  # micro-batch start -> the trainer's log-probs [M, T] at rollout time
    counts = {"update_tokens": 0, "update_images": 0}  # what the policy's forwards ran, over all passes
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; scheduler.step() below sets the next step's
    skipped = 0
    policy.train()
    for iteration in range(o.num_iterations):
        optimizer.zero_grad()
        for start in range(0, n, o.micro_batch_size):
            rows = list(range(start, min(n, start + o.micro_batch_size)))
            batch = training_batch(ro, rows, G, device, policy, o.shared_prefix)
            counts["update_tokens"] += batch.num_tokens
            counts["update_images"] += batch.num_images
            logp, entropy = root(batch, config.rollout.temperature)
            if iteration == 0:
                first_pass[start] = logp.detach()
            loss, m = _micro_batch_loss(logp, entropy, first_pass[start], batch, rows, ro, advantages, config,
                                        loss_config, ref_policy, first=iteration == 0)  # fmt: skip
            share = _share(o.aggregation, rows, lengths, keep, total_tokens, total_seqs, int(totals["n"]))
            (loss * share).backward()
            _accumulate(sums, m, share)
        grad_norm = optimizer.step(o.max_grad_norm)
        skipped += optimizer.last_step_skipped
    scheduler.step()
    policy.eval()
    out = _pass_means(sums, o.num_iterations, world)
    out["grad_norm"] = float(grad_norm)
    out.update({k: int(v) for k, v in reduce_floats(counts, world).items()})
    out["lr"] = lr
    out["skipped_steps"] = skipped  # optimizer steps skipped for a non-finite gradient norm (caprl_core.precision)
    return out


def _micro_batch_loss(
    logp: torch.Tensor, entropy: torch.Tensor, first_logp: torch.Tensor, batch: TrainingBatch, rows: list[int],
    ro: Rollout, advantages: torch.Tensor, config: TrainConfig, loss_config: grpo.LossConfig, ref_policy, *,
    first: bool,
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """The clipped loss of one micro-batch and its metrics, from the policy's log-probs `logp` [M, T] now and on the
    first pass (`first_logp`); `first`: this is the first pass, which also measures the sampler's gap."""
    o, device = config.optim, logp.device
    sampler_logp, mask = batch.sampler_logp, batch.mask
    ref = None
    if ref_policy is not None:
        with torch.no_grad():
            ref, _ = policy_logprobs(ref_policy, batch, config.rollout.temperature)
    m: dict[str, torch.Tensor] = _sampler_gap(first_logp, sampler_logp, mask) if first else {}
    if o.rollout_correction == "none":
        old, weights = sampler_logp, None
    else:
        old = first_logp
        weights, wm = grpo.rollout_correction_weights(old, sampler_logp, mask, mode=o.rollout_correction,
                                                      level=o.rollout_correction_level,
                                                      cap=o.rollout_correction_cap)  # fmt: skip
        m.update(wm)
    loss, lm = grpo.policy_loss(logp, old, advantages[rows].to(device), mask, loss_config, ref_logp=ref,
                                truncated=ro.truncated[rows].to(device), entropy=entropy,
                                weights=weights)  # fmt: skip
    m.update(lm, loss=loss.detach())
    return loss, m


def _accumulate(sums: dict[str, float], metrics: dict, share: float) -> None:
    """Add a micro-batch's metrics, weighted by its loss share (the largest for sampler_max_abs_diff)."""
    for key, value in metrics.items():
        if key == "sampler_max_abs_diff":
            sums[key] = max(sums.get(key, 0.0), float(value))
        else:
            sums[key] = sums.get(key, 0.0) + float(value) * share


def _pass_means(sums: dict[str, float], num_iterations: int, world: World) -> dict[str, float]:
    """The step's metrics over all ranks: sums (max for sampler_max_abs_diff) divided by the passes, except the
    sampler's gap, measured on the first pass only."""
    sums = {
        **reduce_floats({k: v for k, v in sums.items() if k != "sampler_max_abs_diff"}, world),
        **reduce_floats({k: v for k, v in sums.items() if k == "sampler_max_abs_diff"}, world, op="max"),
    }
    per_pass = ("sampler_kl", "sampler_max_abs_diff")
    return {k: v if k in per_pass else v / num_iterations for k, v in sums.items() if k != "num_tokens"}


def _share(aggregation: str, rows: list[int], lengths: torch.Tensor, keep: torch.Tensor, total_tokens: float,
           total_seqs: float, n: int) -> float:  # fmt: skip
    """A micro-batch's share of what the whole batch's aggregation divides by, so that accumulated micro-batch losses
    equal the full batch's loss. ("constant" divides by all rows, truncated ones included, as TRL's dr_grpo does.)"""
    if aggregation == "token-mean":
        return float((lengths[rows] * keep[rows]).sum()) / total_tokens
    if aggregation == "constant":
        return len(rows) / n
    return float(keep[rows].sum()) / total_seqs


def _sampler_gap(train_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the sampler's log-probs are from the trainer's for the same tokens and distribution: the k3 estimate
    of KL(sampler || trainer) and the largest absolute difference. 0 in exact arithmetic."""
    train_logp, sampler_logp = train_logp.double(), sampler_logp.double()  # k3 of ~1e-7 gaps cancels to 0 in fp32
    diff = (train_logp - sampler_logp).abs().masked_fill(~mask, 0.0)
    return {"sampler_kl": grpo.masked_mean(grpo.k3_kl(sampler_logp, train_logp), mask),
            "sampler_max_abs_diff": diff.max() if diff.numel() else torch.zeros(())}  # fmt: skip
