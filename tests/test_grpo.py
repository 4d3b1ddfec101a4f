"""The GRPO loss (`caprl_core.grpo`) on fixed, hand-picked inputs.

Two oracles:
- a hand-written reference below, explicit loops over tokens in Python floats, for the loss and its gradient
  w.r.t. logp (every aggregation, with and without the k3 KL term, symmetric and DAPO clip-higher epsilons,
  with and without dropping truncated captions);
- TRL's own loss: `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py, trl 1.16, the `_compute_loss` method
  and its `loss_type` branches) called unbound on a stub `self` whose `_get_per_token_logps_and_entropies` returns
  our logp/entropy tensors. Compared: the loss value, its gradient w.r.t. logp, and the metrics both compute
  (clip_ratio/low_mean, high_mean, region_mean, kl, entropy), for these loss-type pairs:
      TRL "grpo"    = our "seq-mean-token-mean"
      TRL "bnpo"    = our "token-mean" (one micro-batch, no gradient accumulation)
      TRL "dapo"    = our "token-mean" (num_items_in_batch = the batch's loss tokens, one process)
      TRL "dr_grpo" = our "constant" (same max_completion_length)
  TRL drops truncated captions by zeroing their rows of completion_mask (grpo_trainer.py, the
  `mask_truncated_completions` block of `_generate_and_score_completions`), so we hand it mask & ~truncated.
  One deliberate difference: TRL's "grpo" keeps captions with no loss tokens in the mean over sequences (they add 0
  but count in the divisor); ours leaves them out, so with dropped captions ours = TRL * B / (captions kept).

The fixed inputs (B = 3 captions, T = 4, ragged lengths 4, 3, 2, the last one truncated):
    ratios    row 0 (A = +1):   1.00  1.25  1.35  0.67     1.25 clips at eps_high 0.2, not at 0.28; 1.35 at both
              row 1 (A = -0.5): 0.74  1.30  0.95  pad      0.74 clips low; 1.30 is above 1 + eps but A < 0: no clip
              row 2 (A = +2):   0.61  1.05  pad   pad      0.61 is below 1 - eps but A > 0: no clip
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from caprl_core import grpo
from caprl_core.grpo import LossConfig, caption_length_reward, policy_loss

OLD = [[-1.2, -0.7, -2.3, -0.4], [-0.9, -1.6, -0.3, 0.0], [-2.0, -0.5, 0.0, 0.0]]
LOG_RATIO = [[0.0, 0.223, 0.3, -0.4], [-0.3, 0.26, -0.05, 0.0], [-0.5, 0.05, 0.0, 0.0]]
REF = [[-1.0, -0.9, -2.0, -0.6], [-1.1, -1.2, -0.35, 0.0], [-1.7, -0.8, 0.0, 0.0]]
ENTROPY = [[0.5, 1.0, 1.5, 0.0], [2.0, 0.25, 0.75, 0.0], [1.25, 3.0, 0.0, 0.0]]
LENGTHS = [4, 3, 2]
ADV = [1.0, -0.5, 2.0]
TRUNCATED = [False, False, True]
MAX_LEN = 6  # the "constant" divisor's length; deliberately not T, so T cannot stand in for it

CONFIGS = [
    dict(aggregation=aggregation, beta=beta, epsilon_high=eps_high, mask_truncated=drop)
    for aggregation in grpo.AGGREGATIONS
    for beta in (0.0, 0.04)
    for eps_high in (None, 0.28)
    for drop in (False, True)
]


def config(**kw) -> LossConfig:
    return LossConfig(epsilon=0.2, max_completion_length=MAX_LEN, **kw)


def inputs(dtype: torch.dtype = torch.float64) -> dict:
    B, T = len(OLD), len(OLD[0])
    old = torch.tensor(OLD, dtype=dtype)
    logp = (torch.tensor(OLD, dtype=torch.float64) + torch.tensor(LOG_RATIO, dtype=torch.float64)).to(dtype)
    mask = torch.arange(T) < torch.tensor(LENGTHS).unsqueeze(1)  # [B, T]
    return dict(logp=logp.requires_grad_(), old_logp=old, advantages=torch.tensor(ADV, dtype=dtype), mask=mask,
                ref_logp=torch.tensor(REF, dtype=dtype), truncated=torch.tensor(TRUNCATED),
                entropy=torch.tensor(ENTROPY, dtype=dtype)) | {"B": B}  # fmt: skip


def run(cfg: LossConfig, x: dict):
    return policy_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"], cfg, ref_logp=x["ref_logp"],
                       truncated=x["truncated"], entropy=x["entropy"])  # fmt: skip


def reference(cfg: LossConfig, x: dict) -> tuple[float, list[list[float]]]:
    """Loss and d loss / d logp by hand, one token at a time, in Python floats (from the tensors' own values)."""
    logp, old, ref, adv = (x[k].detach().tolist() for k in ("logp", "old_logp", "ref_logp", "advantages"))
    lo, hi = 1 - cfg.epsilon, 1 + (cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high)
    rows = [i for i in range(x["B"]) if not (cfg.mask_truncated and TRUNCATED[i])]
    terms = {}  # (i, t) -> (per-token loss, its derivative w.r.t. logp[i][t])
    for i in rows:
        for t in range(LENGTHS[i]):
            r, a = math.exp(logp[i][t] - old[i][t]), adv[i]
            c = min(max(r, lo), hi)
            # min(r a, c a): the unclipped branch moves with logp (d(r a)/d logp = r a); the clipped one is constant
            obj, d_obj = (r * a, r * a) if r * a <= c * a else (c * a, 0.0)
            loss, grad = -obj, -d_obj
            if cfg.beta > 0:
                d = ref[i][t] - logp[i][t]
                loss += cfg.beta * (math.exp(d) - d - 1)
                grad += cfg.beta * (1 - math.exp(d))  # d/d logp of exp(ref - logp) - (ref - logp) - 1
            terms[i, t] = (loss, grad)
    if cfg.aggregation == "token-mean":
        weight = {key: 1 / len(terms) for key in terms}
    elif cfg.aggregation == "seq-mean-token-mean":
        weight = {(i, t): 1 / (LENGTHS[i] * len(rows)) for (i, t) in terms}
    else:
        weight = {key: 1 / (x["B"] * cfg.max_completion_length) for key in terms}
    grad = [[0.0] * len(OLD[0]) for _ in OLD]
    total = 0.0
    for (i, t), (loss, g) in terms.items():
        total += weight[i, t] * loss
        grad[i][t] = weight[i, t] * g
    return total, grad


# fp64: the same formulas in the same order as the reference, so only last-bit rounding differs.
# fp32: ~10 terms of fp32 arithmetic on values of order 1, relative error ~1e-7.
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float64, 1e-12, 1e-12), (torch.float32, 1e-6, 1e-5)])
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_loss_and_grad_match_hand_reference(kw, dtype, atol, rtol):
    cfg, x = config(**kw), inputs(dtype)
    loss, _ = run(cfg, x)
    loss.backward()
    want_loss, want_grad = reference(cfg, x)
    assert loss.dtype == dtype and x["logp"].grad.dtype == dtype
    torch.testing.assert_close(loss, torch.tensor(want_loss, dtype=dtype), atol=atol, rtol=rtol)
    torch.testing.assert_close(x["logp"].grad, torch.tensor(want_grad, dtype=dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "kw, tokens, low, high",
    [
        (dict(), 9, 1, 2),  # high: row 0's 1.25 and 1.35; low: row 1's 0.74
        (dict(epsilon_high=0.28), 9, 1, 1),  # 1.25 is inside [0.8, 1.28]
        (dict(mask_truncated=True), 7, 1, 2),  # row 2 (no clipped tokens) leaves the count
    ],
)
def test_clip_fractions_counted_by_hand(kw, tokens, low, high):
    _, m = run(config(**kw), inputs())
    assert m["num_tokens"].item() == tokens
    assert m["clip_low_fraction"].item() == pytest.approx(low / tokens, abs=1e-7)
    assert m["clip_high_fraction"].item() == pytest.approx(high / tokens, abs=1e-7)
    assert m["clip_fraction"].item() == pytest.approx((low + high) / tokens, abs=1e-7)


@pytest.mark.parametrize("drop", [False, True])
def test_other_metrics_match_hand_reference(drop):
    x = inputs()
    _, m = run(config(beta=0.04, mask_truncated=drop), x)
    tokens = [(i, t) for i in range(3) for t in range(LENGTHS[i]) if not (drop and TRUNCATED[i])]
    mean = lambda f: sum(f(i, t) for i, t in tokens) / len(tokens)
    lr = lambda i, t: LOG_RATIO[i][t]
    new = lambda i, t: OLD[i][t] + LOG_RATIO[i][t]
    want = {
        "ratio_mean": mean(lambda i, t: math.exp(lr(i, t))),
        # KL(old || new) from tokens sampled by old: r = new / old, k3 = r - 1 - log r
        "approx_kl": mean(lambda i, t: math.exp(lr(i, t)) - 1 - lr(i, t)),
        "kl": mean(lambda i, t: math.exp(REF[i][t] - new(i, t)) - (REF[i][t] - new(i, t)) - 1),
        "entropy": mean(lambda i, t: ENTROPY[i][t]),
    }
    for name, value in want.items():
        assert m[name].dtype == torch.float32 and not m[name].requires_grad
        assert m[name].item() == pytest.approx(value, rel=1e-6), name


def test_kl_metric_without_penalty_and_no_optional_metrics():
    x = inputs()
    with_ref, m = run(config(), x)  # beta = 0: ref_logp only reported
    without, m2 = policy_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"], config())
    assert with_ref.item() == without.item()
    assert "kl" in m and "kl" not in m2 and "entropy" not in m2


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_padding_values_are_never_read(aggregation):
    cfg = config(aggregation=aggregation, beta=0.04)
    clean, dirty = inputs(), inputs()
    pad = ~dirty["mask"]
    with torch.no_grad():
        dirty["logp"][pad] = float("nan")
    for name, value in (("old_logp", float("-inf")), ("ref_logp", float("inf")), ("entropy", float("nan"))):
        dirty[name] = dirty[name].masked_fill(pad, value)
    losses = []
    for x in (clean, dirty):
        loss, m = run(cfg, x)
        loss.backward()
        losses.append(loss)
        assert all(torch.isfinite(v) for v in m.values())
    assert losses[0].item() == losses[1].item()
    torch.testing.assert_close(dirty["logp"].grad, clean["logp"].grad, atol=0, rtol=0)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("drop_all", [False, True], ids=["empty-mask", "all-truncated"])
def test_all_masked_batch_gives_zero_loss_and_finite_grads(aggregation, drop_all):
    x = inputs()
    if drop_all:
        x["truncated"] = torch.ones(3, dtype=torch.bool)
    else:
        x["mask"] = torch.zeros_like(x["mask"])
    loss, m = run(config(aggregation=aggregation, beta=0.04, mask_truncated=drop_all), x)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x["logp"].grad, torch.zeros_like(x["logp"]))
    assert all(v.item() == 0.0 for v in m.values())


def test_seq_mean_leaves_out_captions_without_tokens():
    cfg = config(aggregation="seq-mean-token-mean")
    x = inputs()
    want, _ = run(cfg, x)
    y = {k: torch.cat([v, v[:1]]) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    y["mask"][3] = False  # a 4th caption with no tokens
    y["logp"] = y["logp"].detach().requires_grad_()
    got, m = run(cfg, y)
    assert got.item() == pytest.approx(want.item(), rel=1e-14)
    assert m["num_tokens"].item() == 9


def test_low_precision_inputs_are_computed_in_fp32():
    cfg = config(beta=0.04, epsilon_high=0.28)
    x16 = inputs(torch.bfloat16)
    x32 = {k: (v.detach().float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x16.items()}
    x32["logp"].requires_grad_()
    (loss16, m16), (loss32, m32) = run(cfg, x16), run(cfg, x32)
    loss16.backward()
    loss32.backward()
    assert loss16.dtype == torch.float32 and all(v.dtype == torch.float32 for v in m16.values())
    assert loss16.item() == loss32.item()  # the same fp32 math on the same (bf16-representable) values
    assert all(m16[k].item() == m32[k].item() for k in m32)
    assert x16["logp"].grad.dtype == torch.bfloat16
    torch.testing.assert_close(x16["logp"].grad.float(), x32["logp"].grad.to(torch.bfloat16).float(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(epsilon_high=0.1), "epsilon_high"),
        (dict(aggregation="seq-mean"), "aggregation"),
        (dict(beta=-0.1), "beta"),
        (dict(aggregation="constant"), "max_completion_length"),
        (dict(aggregation="constant", max_completion_length=0), "max_completion_length"),
        (dict(max_completion_length=2.5), "max_completion_length"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        LossConfig(**kw)


def test_argument_errors_name_the_argument():
    x = inputs()
    args = (x["logp"], x["old_logp"], x["advantages"], x["mask"])
    with pytest.raises(ValueError, match="^ref_logp:"):
        policy_loss(*args, config(beta=0.1))
    with pytest.raises(ValueError, match="^truncated:"):
        policy_loss(*args, config(mask_truncated=True))
    with pytest.raises(ValueError, match="^advantages:"):
        policy_loss(x["logp"], x["old_logp"], x["advantages"][:2], x["mask"], config())
    with pytest.raises(ValueError, match="^mask:"):
        policy_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"].long(), config())
    with pytest.raises(ValueError, match="^old_logp:"):
        policy_loss(x["logp"], x["old_logp"][:, :3], x["advantages"], x["mask"], config())
    with pytest.raises(ValueError, match="^logp:.*max_completion_length"):
        policy_loss(*args, LossConfig(aggregation="constant", max_completion_length=3))


def test_caption_length_reward():
    lengths = torch.tensor([0, 400, 500, 600, 700])
    got = caption_length_reward(lengths, 400, 600)
    assert got.dtype == torch.float32
    assert got.tolist() == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert caption_length_reward(torch.tensor([450.0]), 400, 600).item() == pytest.approx(0.75)
    for l1, l2 in ((0, 10), (10, 10), (20, 10)):
        with pytest.raises(ValueError, match="^l1, l2:"):
            caption_length_reward(lengths, l1, l2)


# --- against TRL's GRPOTrainer._compute_loss ---------------------------------------------------------------------


def trl_loss(loss_type: str, cfg: LossConfig, x: dict) -> tuple[torch.Tensor, dict]:
    """TRL's `_compute_loss` on our tensors: a stub `self` with exactly the attributes that method reads."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = x["logp"].shape
    mask = (x["mask"] & ~x["truncated"].unsqueeze(1)) if cfg.mask_truncated else x["mask"]
    metrics = {"train": defaultdict(list)}
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (x["logp"], x["entropy"], None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=cfg.beta, loss_type=loss_type, epsilon_low=cfg.clip_low, epsilon_high=cfg.clip_high,
        max_completion_length=cfg.max_completion_length, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t),
        _metrics=metrics,
    )  # fmt: skip
    batch = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": x["advantages"], "old_per_token_logps": x["old_logp"],
        "ref_per_token_logps": x["ref_logp"], "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    loss = GRPOTrainer._compute_loss(stub, None, batch)
    return loss, {name: values[-1] for name, values in metrics["train"].items()}


TRL_PAIRS = [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"), ("dapo", "token-mean"), ("dr_grpo", "constant")]


@pytest.mark.parametrize("beta, eps_high, drop", [(0.0, None, False), (0.04, 0.28, False), (0.04, 0.28, True)])
@pytest.mark.parametrize("loss_type, aggregation", TRL_PAIRS, ids=[p[0] for p in TRL_PAIRS])
def test_matches_trl_compute_loss(loss_type, aggregation, beta, eps_high, drop):
    pytest.importorskip("trl", reason="compares with TRL's GRPOTrainer loss")
    cfg = config(aggregation=aggregation, beta=beta, epsilon_high=eps_high, mask_truncated=drop)
    ours, theirs = inputs(), inputs()
    loss, m = run(cfg, ours)
    loss.backward()
    trl, trl_m = trl_loss(loss_type, cfg, theirs)
    trl.backward()
    # TRL's "grpo" divides by all B captions, empty ones included; ours by the captions that have tokens.
    scale = 3 / 2 if (loss_type == "grpo" and drop) else 1.0
    torch.testing.assert_close(loss, trl * scale, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours["logp"].grad, theirs["logp"].grad * scale, atol=1e-12, rtol=1e-12)
    pairs = {"clip_low_fraction": "clip_ratio/low_mean", "clip_high_fraction": "clip_ratio/high_mean",
             "clip_fraction": "clip_ratio/region_mean", "entropy": "entropy"}  # fmt: skip
    if beta:
        pairs["kl"] = "kl"
    for name, trl_name in pairs.items():
        assert m[name].item() == pytest.approx(trl_m[trl_name], rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize("advantage,scale", [("rloo", "none"), ("grpo", "group")])
def test_recipe_advantages_equal_the_servers_formula(advantage, scale):
    """Under --reward-preset recipe the server's score, accuracy + 0.2 x R_len (R_len = 1 up to 2,048 caption tokens,
    linear to 0 at 3,072; the stop token not counted), is one score, normalised in the group: RLOO = the score minus
    the mean of the group's others; GRPO = (score - group mean) / (unbiased group std + 1e-6). Two groups of 4: equal
    accuracy with lengths 2,100-2,800 (the length term alone decides), and mixed accuracy and lengths."""
    from caprl_core.config_cli import parse_config
    from caprl_core.rl.scoring import advantages_and_metrics

    config, _ = parse_config(["--reward-preset", "recipe", "--group-size", "4", "--advantage", advantage,
                              "--scale", scale])  # fmt: skip
    accuracy = [0.5, 0.5, 0.5, 0.5, 0.25, 0.875, 0.625, 1.0]
    tokens = [2100, 2300, 2500, 2800, 1500, 2048, 3000, 4000]  # caption tokens, stop token excluded
    stopped = [True, False, True, True, False, True, True, False]
    lengths = [n + s for n, s in zip(tokens, stopped, strict=True)]  # what the sampler returns: stop token included
    every = {"accuracy": accuracy, "caption_tokens": tokens, "length": lengths,
             "truncated": [not s for s in stopped], "captions": ["c"] * 8, "references": [None] * 8,
             "kept": [1.0], "computed": 0, "prompt_tokens": 0}  # fmt: skip
    _, advantages, _ = advantages_and_metrics(every, config, step=0)
    score = [a + 0.2 * min(1.0, max(0.0, (3072 - n) / 1024)) for a, n in zip(accuracy, tokens, strict=True)]
    expect = []
    for group in (score[:4], score[4:]):
        mean = sum(group) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / 3)
        for x in group:
            expect.append(x - (sum(group) - x) / 3 if advantage == "rloo" else (x - mean) / (std + 1e-6))
    torch.testing.assert_close(advantages.double(), torch.tensor(expect, dtype=torch.float64), atol=1e-6, rtol=0)
    print(f"\n{advantage}/{scale}: equal-accuracy group's advantages {advantages[:4].tolist()}")


def test_the_length_judge_trains_on_length_and_still_logs_the_readers_accuracy():
    """--judge length (the ablation's hackable reward): the advantage follows caption length alone, whatever the
    reader's accuracy; `accuracy` stays the reader's and `judge_score` is the judge's mean."""
    from caprl_core.config_cli import parse_config
    from caprl_core.rl.scoring import advantages_and_metrics

    config, _ = parse_config(["--group-size", "4", "--max-new-tokens", "32", "--judge", "length", "--scale", "none"])
    accuracy = [1.0, 0.0, 0.5, 0.25]
    tokens = [8, 16, 32, 40]  # 40 > max_new_tokens: the judge's score is capped at 1
    every = {"accuracy": accuracy, "caption_tokens": tokens, "length": tokens, "truncated": [False] * 4,
             "captions": ["c"] * 4, "references": [None] * 4, "kept": [1.0], "computed": 0,
             "prompt_tokens": 0}  # fmt: skip
    rewards, advantages, metrics = advantages_and_metrics(every, config, step=0)
    judged = [0.25, 0.5, 1.0, 1.0]
    torch.testing.assert_close(rewards[:, 0], torch.tensor(judged))
    torch.testing.assert_close(advantages, torch.tensor(judged) - sum(judged) / 4)
    assert metrics["accuracy"] == pytest.approx(sum(accuracy) / 4) and metrics["judge_score"] == pytest.approx(0.6875)
    config, _ = parse_config(["--group-size", "4"])
    assert "judge_score" not in advantages_and_metrics(every, config, step=0)[2]
