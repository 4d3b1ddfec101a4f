"""fp32 master weights (caprl_core.precision): a bf16 policy learns at the recipe's lr 1e-6 like an fp32 one, its
masters survive a checkpoint, and a resumed bf16 run continues bit for bit. bf16 runs on CPU, slowly: tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caprl_core.config_cli import parse_config
from caprl_core.precision import MasterWeightOptimizer
from caprl_core.rl.rollout import rollout
from caprl_core.rl.setup import setup
from caprl_core.rl.update import update
from caprl_core.train import train

TINY = ["--images-per-step", "2", "--group-size", "3", "--max-new-tokens", "8", "--num-draws", "2",
        "--synthetic-images", "8", "--progress", "false"]  # fmt: skip


def _adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def test_fp32_parameters_are_their_own_masters_and_bf16_ones_get_copies():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(torch.bfloat16))
    opt = MasterWeightOptimizer(model, _adamw(1e-3))
    pairs = list(opt.master_state())
    assert [m is p for p, m in pairs] == [True, True, False, False]
    assert all(m.dtype == torch.float32 for _, m in pairs) and opt.has_copies
    state = opt.state_dict()
    assert [m is None for m in state["masters"]] == [True, True, False, False]


def test_small_updates_accumulate_in_the_masters_not_in_bf16():
    """At lr 1e-6 a bf16 weight of magnitude ~0.1 cannot move by one step (its spacing is ~5e-4); the master can."""
    torch.manual_seed(0)
    direct = torch.nn.Linear(64, 64).to(torch.bfloat16)
    mixed = torch.nn.Linear(64, 64).to(torch.bfloat16)
    mixed.load_state_dict(direct.state_dict())
    start = mixed.weight.detach().float().clone()
    plain = torch.optim.AdamW(direct.parameters(), lr=1e-6, weight_decay=0.0)
    opt = MasterWeightOptimizer(mixed, _adamw(1e-6))
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    for _ in range(20):
        for model, step in ((direct, plain.step), (mixed, lambda: opt.step(None))):
            model.zero_grad(set_to_none=True)
            model(x).float().pow(2).mean().backward()
            step()
    master = dict(opt.master_state())[mixed.weight]
    master_changed = (master != start).float().mean().item()
    direct_changed = (direct.weight.float() != start).float().mean().item()
    assert master_changed >= 0.99
    assert direct_changed < 0.5  # the bug the masters fix: most bf16 weights never move
    assert torch.equal(mixed.weight, master.to(torch.bfloat16))  # the model holds the rounded masters


def _micro_batch_grads(k: int) -> tuple[torch.nn.Linear, list[torch.Tensor], torch.Tensor]:
    """A bf16 Linear(256, 256), k micro-batches, and the fp32 sum of their bf16 weight gradients taken one by one."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).to(torch.bfloat16)
    xs = [torch.randn(16, 256, dtype=torch.bfloat16) for _ in range(k)]
    expected = torch.zeros(256, 256)
    for x in xs:
        model.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        expected += model.weight.grad.float()
    model.zero_grad(set_to_none=True)
    return model, xs, expected


@pytest.mark.parametrize("k", [8, 32, 128])
def test_micro_batch_gradients_accumulate_in_fp32_on_the_masters(k):
    """Summed in the bf16 p.grad the accumulated gradient was off by 0.0035 / 0.0061 / 0.0112 (relative) for 8 / 32
    / 128 micro-batches; on the masters it is the fp32 sum itself (measured 0.0), and p.grad is freed each time."""
    model, xs, expected = _micro_batch_grads(k)
    opt = MasterWeightOptimizer(model, _adamw(1e-3))
    for x in xs:
        model(x).float().pow(2).mean().backward()
        assert model.weight.grad is None
    master = dict(opt.master_state())[model.weight]
    assert ((master.grad - expected).norm() / expected.norm()).item() <= 1e-6
    opt.step(1.0)
    assert all(m.grad is None and p.grad is None for p, m in opt.master_state())  # freed once stepped


def test_a_non_finite_gradient_skips_the_step_and_the_next_one_steps():
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    opt = MasterWeightOptimizer(model, _adamw(1e-2))
    before = [m.detach().clone() for _, m in opt.master_state()]
    model(torch.randn(2, 8, dtype=torch.bfloat16)).float().sum().backward()
    dict(opt.master_state())[model.weight].grad[0, 0] = float("inf")
    assert not torch.isfinite(opt.step(1.0))
    assert opt.last_step_skipped and opt.consecutive_skips == 1
    assert all(torch.equal(m, b) for (_, m), b in zip(opt.master_state(), before, strict=True))
    assert all(m.grad is None for _, m in opt.master_state())  # the bad gradient does not leak into the next step
    model(torch.randn(2, 8, dtype=torch.bfloat16)).float().sum().backward()
    assert torch.isfinite(opt.step(1.0)) and not opt.last_step_skipped and opt.consecutive_skips == 0
    assert not torch.equal(dict(opt.master_state())[model.weight], before[0])


def test_float16_is_refused_naming_the_dtype():
    with pytest.raises(ValueError, match="float16 .*bfloat16"):
        MasterWeightOptimizer(torch.nn.Linear(4, 3).to(torch.float16), _adamw(1e-3))
    with pytest.raises(ValueError, match="--dtype: float16 trains without loss scaling; use bfloat16"):
        parse_config(["--dtype", "float16"])


def test_a_state_without_masters_rebuilds_them_from_fp32_weights():
    """A torchrun (or fp32) run's state has no master copies: a bf16 process takes the checkpoint's fp32 weights."""
    fp32 = torch.nn.Linear(4, 3)
    state = MasterWeightOptimizer(fp32, _adamw(1e-3)).state_dict()
    bf16 = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = MasterWeightOptimizer(bf16, _adamw(1e-3))
    with pytest.raises(ValueError, match="master 0: the checkpoint holds neither"):
        opt.load_state_dict(state)
    opt.load_state_dict(state, lambda: [p.detach() for p in fp32.parameters()])
    assert all(torch.equal(m, p) for (_, m), p in zip(opt.master_state(), fp32.parameters(), strict=True))
    assert torch.equal(bf16.weight, fp32.weight.to(torch.bfloat16))


def _run(tmp_path: Path, dtype: str, *extra: str):
    config, _ = parse_config([*TINY, "--dtype", dtype, "--lr", "1e-6", "--warmup-steps", "0", "--output-dir",
                              str(tmp_path / dtype), *extra])  # fmt: skip
    return setup(config)


def test_bf16_policy_masters_track_an_fp32_run_at_lr_1e_6(tmp_path):
    """20 updates at lr 1e-6 on the same captions and advantages: the bf16 policy's fp32 masters move like the
    fp32 policy's weights (same sign of change nearly everywhere, the same size), and >= 99% of them change."""
    fp32, bf16 = _run(tmp_path, "float32"), _run(tmp_path, "bfloat16")
    assert not fp32.optimizer.has_copies and bf16.optimizer.has_copies
    ro = rollout(fp32.engine, fp32.prompter, fp32.tokenizer, fp32.examples[:2], fp32.config, step=0)
    advantages = torch.randn(len(ro.completions), generator=torch.Generator().manual_seed(0))
    start = {name: p.detach().float().clone() for name, p in fp32.policy.named_parameters()}
    for _ in range(20):
        for run in (fp32, bf16):
            update(run.policy, None, run.optimizer, run.scheduler, ro, advantages, run.config, run.device)
    d_fp32 = torch.cat([(p.detach() - start[n]).flatten() for n, p in fp32.policy.named_parameters()])
    masters = [m for _, m in bf16.optimizer.master_state()]
    # The masters start from the bf16-rounded initial weights: measure their change from there.
    d_mixed = torch.cat([(m.detach() - p0.to(torch.bfloat16).float()).flatten()
                         for p0, m in zip(start.values(), masters, strict=True)])  # fmt: skip
    moved = d_fp32 != 0  # weights with a gradient (embedding rows of unused tokens get none, in either run)
    changed = (d_mixed[moved] != 0).float().mean().item()
    agree = (torch.sign(d_mixed[moved]) == torch.sign(d_fp32[moved])).float().mean().item()
    rel = ((d_mixed - d_fp32).norm() / d_fp32.norm()).item()
    print(
        f"fp32 weights moved {moved.float().mean():.4f}; of those, masters changed {changed:.4f}, "
        f"sign agreement {agree:.4f}, relative difference {rel:.4f}"
    )
    assert changed >= 0.99
    # Tolerance: bf16 forward/backward noise changes some gradient signs, so Adam's ~lr-sized steps differ there;
    # measured on this setup (the shipped start policy as rebuilt for issue 25): 0.9898 sign agreement, 0.170 relative
    # difference of the 20-step deltas, 100% of the weights the fp32 run moved changed in the masters (the build
    # before: 0.9934, 0.121). The bounds leave a little room for thread-count noise and no more: a learning rate 1.3x
    # off in the bf16 run gives a relative difference of 0.352 on this build (sign agreement 0.9899).
    assert agree >= 0.985 and rel <= 0.22


def test_resumed_bf16_run_continues_bit_identically(tmp_path):
    args = [*TINY, "--dtype", "bfloat16", "--lr", "1e-6", "--warmup-steps", "0", "--checkpoint-every", "2"]
    whole, _ = parse_config([*args, "--steps", "4", "--output-dir", str(tmp_path / "whole")])
    train(whole)
    first, _ = parse_config([*args, "--steps", "2", "--output-dir", str(tmp_path / "split")])
    train(first)
    second, _ = parse_config([*args, "--steps", "4", "--output-dir", str(tmp_path / "split")])
    train(second, resume=True)
    a, b = tmp_path / "whole/checkpoints/step-000003", tmp_path / "split/checkpoints/step-000003"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert next(iter(wa.values())).dtype == torch.bfloat16  # the model's dtype, as Hugging Face users expect
    sa, sb = load_file(a / "trainer_state/optimizer.safetensors"), load_file(b / "trainer_state/optimizer.safetensors")
    masters = [k for k in sa if k.startswith("masters.")]
    assert masters and all(sa[k].dtype == torch.float32 for k in masters)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("bad", ["shape", "count"])
def test_loading_a_state_that_does_not_fit_names_the_problem(bad):
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = MasterWeightOptimizer(model, _adamw(1e-3))
    state = opt.state_dict()
    if bad == "shape":
        state["masters"][0] = torch.zeros(2, 2)
        match = "master 0: shape"
    else:
        state["masters"] = state["masters"][:1]
        match = "masters"
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
