"""The log-prob contract between the sampler and the trainer, and the rollout correction on top of it.

The sampler records each token's log-prob under the unfiltered policy (`Completion.policy_logprobs`: before banned
tokens, top-k and top-p); the trainer's fused kernel computes that same distribution. So at step 0, before any
update, the ratio is 1 up to float error whatever the sampling filters (CPU fp32, tiny random models).
"""

from __future__ import annotations

import math

import pytest
import torch

from caprl_core import grpo
from caprl_core.config_cli import parse_config
from caprl_core.rl.rollout import rollout
from caprl_core.rl.setup import setup
from caprl_core.rl.update import update

# The tiny random pair: its flat next-token distributions make the sampling filters remove real mass.
TINY = ["--policy", "tiny-random", "--reader", "tiny-random", "--images-per-step", "2", "--group-size", "4",
        "--max-new-tokens", "12", "--num-draws", "2", "--synthetic-images", "8", "--progress", "false"]  # fmt: skip


@pytest.mark.parametrize(
    "sampling",
    [[], ["--top-p", "0.9"], ["--top-p", "0.8", "--temperature", "0.7"], ["--top-k", "20"]],
    ids=["defaults", "top-p-0.9", "top-p-0.8-T-0.7", "top-k-20"],
)
def test_step_0_ratio_is_one_whatever_the_sampling_filters(tmp_path, sampling):
    """Uncorrected ratio (rollout_correction none: trainer / sampler) at step 0: within 1e-4 of 1, approx_kl <= 1e-6.
    Before the contract (the sampler's filtered log-probs as old log-probs) this setup measured ratio_mean 0.992
    (defaults: the banned vision tokens), 0.894 (top-p 0.9) and 0.794 (top-p 0.8, T 0.7)."""
    config, _ = parse_config([*TINY, *sampling, "--rollout-correction", "none", "--output-dir", str(tmp_path)])
    run = setup(config)
    ro = rollout(run.engine, run.prompter, run.tokenizer, run.examples[:2], config, step=0)
    kept = [math.exp(p - q) for c in ro.completions for p, q in zip(c.policy_logprobs, c.logprobs, strict=True)]
    advantages = torch.randn(len(ro.completions), generator=torch.Generator().manual_seed(0))
    m = update(run.policy, None, run.optimizer, run.scheduler, ro, advantages, config, run.device)
    print(
        f"{sampling}: ratio_mean {m['ratio_mean']:.7f} approx_kl {m['approx_kl']:.2e} "
        f"sampler_kl {m['sampler_kl']:.2e} max |diff| {m['sampler_max_abs_diff']:.2e} kept mass {min(kept):.3f}"
    )
    assert abs(m["ratio_mean"] - 1) <= 1e-4
    assert m["approx_kl"] <= 1e-6 and m["sampler_kl"] <= 1e-6 and m["sampler_max_abs_diff"] <= 1e-4
    assert m["clip_fraction"] == 0
    if sampling:  # the filters really removed mass: the sampling distribution differs from the policy's
        assert min(kept) < 0.99


# --- the weights on fixed numbers -------------------------------------------------------------------------------

TRAIN = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, 0.0]])
SAMPLER = torch.tensor([[-1.0, -3.0, -0.4], [-0.3, -1.0, 0.0]])  # log rho = [[0, 1, -0.1], [0, -3, (pad)]]
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_token_level_truncated_and_masked_weights():
    rho = torch.exp(TRAIN - SAMPLER)
    w, m = grpo.rollout_correction_weights(TRAIN, SAMPLER, MASK, mode="tis", level="token", cap=2.0)
    expect = torch.tensor([[1.0, 2.0, math.exp(-0.1)], [1.0, math.exp(-3.0), 0.0]])
    torch.testing.assert_close(w * MASK, expect)
    assert m["is_masked_fraction"] == 0
    w, m = grpo.rollout_correction_weights(TRAIN, SAMPLER, MASK, mode="mis", level="token", cap=2.0)
    expect = torch.where(rho <= 2.0, rho, 0.0) * MASK
    torch.testing.assert_close(w * MASK, expect)
    assert w[0, 1] == 0 and m["is_masked_fraction"].item() == pytest.approx(1 / 5)
    w, _ = grpo.rollout_correction_weights(TRAIN, SAMPLER, MASK, mode="none")
    assert torch.equal(w, torch.ones_like(w))


def test_sequence_level_weights_share_one_ratio_per_caption():
    w, _ = grpo.rollout_correction_weights(TRAIN, SAMPLER, MASK, mode="tis", level="sequence", cap=2.0)
    row0, row1 = math.exp(0.9), math.exp(-3.0)  # exp(sum of log rho over each caption's tokens)
    torch.testing.assert_close(w[0], torch.full((3,), min(row0, 2.0)))
    torch.testing.assert_close(w[1, :2], torch.full((2,), row1))
    w, m = grpo.rollout_correction_weights(TRAIN, SAMPLER, MASK, mode="mis", level="sequence", cap=2.0)
    assert torch.equal(w[0], torch.zeros(3))  # e^0.9 = 2.46 > cap: the whole caption leaves the loss
    torch.testing.assert_close(w[1, :2], torch.full((2,), row1))
    assert m["is_masked_fraction"].item() == pytest.approx(3 / 5)


def test_weights_scale_the_surrogate_not_the_kl():
    logp = TRAIN.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -0.5])
    config = grpo.LossConfig(beta=0.1)
    ref = TRAIN - 0.2
    weights = torch.tensor([[0.5, 2.0, 1.0], [1.0, 0.0, 1.0]])
    loss, _ = grpo.policy_loss(logp, TRAIN, adv, MASK, config, ref_logp=ref, weights=weights)
    # at logp == old the ratio is 1 (inside the clip): surrogate -w*A per token, KL k3 per token, token-mean over 5
    k3 = grpo.k3_kl(TRAIN, ref)
    expect = ((-weights * adv[:, None] + 0.1 * k3) * MASK).sum() / 5
    torch.testing.assert_close(loss, expect)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode"):
        grpo.rollout_correction_weights(TRAIN, SAMPLER, MASK, mode="is")
    with pytest.raises(ValueError, match="level"):
        grpo.rollout_correction_weights(TRAIN, SAMPLER, MASK, mode="tis", level="batch")
    with pytest.raises(ValueError, match="cap"):
        grpo.rollout_correction_weights(TRAIN, SAMPLER, MASK, mode="tis", cap=0)
    with pytest.raises(ValueError, match="sampler_logp"):
        grpo.rollout_correction_weights(TRAIN, SAMPLER[:1], MASK, mode="tis")
    with pytest.raises(ValueError, match="weights"):
        grpo.policy_loss(TRAIN, TRAIN, torch.zeros(2), MASK, grpo.LossConfig(), weights=torch.ones(2, 2))
