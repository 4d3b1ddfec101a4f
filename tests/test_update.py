"""The update step's wiring, checked where a bug would change a number: the ratio's old log-probs (under tis, the
trainer's own first pass; with --num-iterations 2, still the first pass's on the second), metrics averaged per pass,
beta reaching the gradient, the logged learning rate, and a non-finite gradient skipped without stopping the run.
Tiny random models on CPU, fp32."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caprl_core import grpo
from caprl_core import train as train_mod
from caprl_core.config_cli import parse_config
from caprl_core.precision import MasterWeightOptimizer
from caprl_core.rl import batches
from caprl_core.rl import setup as setup_mod
from caprl_core.rl import update as update_mod
from caprl_core.rl.rollout import Rollout, rollout
from caprl_core.rl.setup import setup
from caprl_core.rl.update import update

TINY = ["--policy", "tiny-random", "--reader", "tiny-random", "--images-per-step", "2", "--group-size", "3",
        "--max-new-tokens", "8", "--num-draws", "2", "--synthetic-images", "8", "--progress", "false"]  # fmt: skip


def _setup(tmp_path: Path, *extra: str):
    config, _ = parse_config([*TINY, "--output-dir", str(tmp_path / "run"), *extra])
    run = setup(config)
    ro = rollout(run.engine, run.prompter, run.tokenizer, run.examples[:2], config, step=0)
    advantages = torch.randn(len(ro.completions), generator=torch.Generator().manual_seed(0))
    return run, ro, advantages


def _recording_loss(monkeypatch) -> list[dict]:
    """Every `grpo.policy_loss` call of the update: its log-probs and the old log-probs the ratio used."""
    calls: list[dict] = []
    loss = grpo.policy_loss

    def record(logp, old_logp, *args, **kwargs):
        calls.append({"logp": logp.detach().clone(), "old": old_logp.detach().clone()})
        return loss(logp, old_logp, *args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss", record)
    return calls


def _frozen_optimizer(run) -> MasterWeightOptimizer:
    """An optimizer that steps nothing (SGD at lr 0): every pass sees the same weights."""
    return MasterWeightOptimizer(run.policy, lambda params: torch.optim.SGD(params, lr=0.0))


def test_second_pass_ratio_uses_the_first_pass_log_probs(tmp_path, monkeypatch):
    """--num-iterations 2, two micro-batches per pass: the second pass's old log-probs are the first pass's log-probs
    of the same micro-batch (not its own, which would make every ratio 1), and the weights moved in between."""
    run, ro, advantages = _setup(tmp_path, "--num-iterations", "2", "--micro-batch-size", "3", "--lr", "1e-3")
    calls = _recording_loss(monkeypatch)
    update(run.policy, None, run.optimizer, run.scheduler, ro, advantages, run.config, run.device)
    assert len(calls) == 4  # 2 passes x 2 micro-batches
    for first, second in zip(calls[:2], calls[2:], strict=True):
        assert torch.equal(second["old"], first["logp"])
        assert not torch.equal(second["logp"], second["old"])  # pass 1 stepped: a ratio of 1 would be a bug


def test_metrics_are_averaged_over_passes(tmp_path):
    """With weights that do not move, two passes compute the same numbers twice: their per-pass average equals one
    pass's metrics (a missing division doubles loss, entropy, ratio_mean, ...)."""
    run, ro, advantages = _setup(tmp_path)
    one = update(run.policy, None, _frozen_optimizer(run), run.scheduler, ro, advantages, run.config, run.device)
    run.config.optim.num_iterations = 2
    two = update(run.policy, None, _frozen_optimizer(run), run.scheduler, ro, advantages, run.config, run.device)
    assert two["update_tokens"] == 2 * one["update_tokens"]  # counts are totals over passes
    for key in ("loss", "entropy", "ratio_mean", "approx_kl", "clip_fraction", "is_weight_mean", "sampler_kl"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-12), key


def test_tis_ratio_uses_the_trainers_first_pass_not_the_sampler(tmp_path, monkeypatch):
    """Under the default tis the ratio's old log-probs are the trainer's own first-pass log-probs; the sampler's
    (shifted here by 0.05 per token, a sampler/trainer mismatch) only enter the importance weights, exp(-0.05)."""
    run, ro, advantages = _setup(tmp_path)
    assert run.config.optim.rollout_correction == "tis"
    shifted = [copy.copy(c) for c in ro.completions]
    for c in shifted:
        c.policy_logprobs = [x + 0.05 for x in c.policy_logprobs]
    ro = Rollout(ro.prompts, shifted, ro.captions, ro.truncated)
    calls = _recording_loss(monkeypatch)
    m = update(run.policy, None, run.optimizer, run.scheduler, ro, advantages, run.config, run.device)
    assert calls and all(torch.equal(c["old"], c["logp"]) for c in calls)
    assert m["is_weight_mean"] == pytest.approx(math.exp(-0.05), rel=1e-4)


def _stepped_gradients(run, ro, advantages, ref_policy) -> torch.Tensor:
    """All parameters' gradients at the optimizer step, flattened."""
    optimizer = _frozen_optimizer(run)
    grads: list[torch.Tensor] = []
    step = optimizer.step

    def capture(max_grad_norm=None):
        grads.extend(p.grad.flatten().clone() for p in run.policy.parameters() if p.grad is not None)
        return step(max_grad_norm)

    optimizer.step = capture
    update(run.policy, ref_policy, optimizer, run.scheduler, ro, advantages, run.config, run.device)
    return torch.cat(grads)


def test_beta_changes_the_gradient_against_a_reference_that_differs(tmp_path):
    """The k3 KL's gradient is 0 where the reference equals the policy, so only a reference that differs shows that
    beta reaches the loss: the gradient at beta 0.5 differs from the one at beta 0 (and the KL metric alone, logged
    at any beta, proves nothing)."""
    run, ro, advantages = _setup(tmp_path)
    ref = copy.deepcopy(run.policy).requires_grad_(False)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    without = _stepped_gradients(run, ro, advantages, ref)  # beta 0: the reference is only measured
    run.config.optim.beta = 0.5
    with_kl = _stepped_gradients(run, ro, advantages, ref)
    change = ((with_kl - without).norm() / without.norm()).item()
    assert change > 0.01, change
    same = _stepped_gradients(run, ro, advantages, copy.deepcopy(run.policy).requires_grad_(False))
    assert ((same - without).norm() / without.norm()).item() < 1e-5  # a reference equal to the policy: no change


def _poison_step(monkeypatch, steps: set[int]) -> None:
    """Make the gradient of every micro-batch of the given steps inf/NaN (one micro-batch per step here)."""
    calls = {"n": 0}
    logprobs = batches.policy_logprobs

    def poisoned(policy, batch, temperature):
        logp, entropy = logprobs(policy, batch, temperature)
        if calls["n"] in steps and logp.requires_grad:
            logp.register_hook(lambda g: g * math.inf)
        calls["n"] += 1
        return logp, entropy

    for module in (setup_mod, update_mod):  # where the step looks it up
        monkeypatch.setattr(module, "policy_logprobs", poisoned)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_inf_gradient_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    """--num-iterations 2 end to end, with step 1's gradients made inf: the step is skipped (skipped_steps 1), the
    weights stay finite, the run finishes; the logged lr is the one the step used (warm-up: lr * (step + 1) / 3)."""
    _poison_step(monkeypatch, {2, 3})  # step 1's two passes
    config, _ = parse_config([*TINY, "--steps", "3", "--num-iterations", "2", "--lr", "1e-3", "--warmup-steps", "2",
                              "--checkpoint-every", "1", "--output-dir", str(tmp_path / "run")])  # fmt: skip
    out = train_mod.train(config)
    rows = _metrics(out)
    assert [r["skipped_steps"] for r in rows] == [0, 2, 0]
    assert not math.isfinite(rows[1]["grad_norm"]) and math.isfinite(rows[2]["grad_norm"])
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert all(math.isfinite(r["loss"]) for r in rows)
    before, after = (load_file(out / "checkpoints" / f"step-00000{s}" / "model.safetensors") for s in (0, 1))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step left the weights as they were
    final = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in final.values())
    assert any(not torch.equal(final[k], after[k]) for k in final)  # and the next step trained


def test_consecutive_skips_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _poison_step(monkeypatch, {1, 2, 3})
    out = tmp_path / "run"
    argv = [*TINY, "--steps", "4", "--checkpoint-every", "1", "--max-skipped-steps", "2", "--output-dir", str(out)]
    assert train_mod.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step 2: 2 optimizer steps in a row had a non-finite gradient norm" in err, err
    assert err.endswith(str(out / "checkpoints" / "step-000001"))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000001"
