"""Benchmark of group_advantages: the kernel backends against the PyTorch reference.

    .venv/bin/python -m pytest bench/bench_group_advantages.py --benchmark-only [--benchmark-json=out.json]

Shapes: N = 1024 (the CapRL recipe: 128 images x G = 8 captions) and N = 8192, rewards [N] and [N, 3] (decoupled
reward components with weights), RLOO advantages scaled by the group std. Rewards are multiples of 1/8 (a hard MCQ
reward over 8 questions), so zero-variance groups occur as they do in training.

Two levels per backend: "op" is the public `caprl_core.ops.group_advantages` (argument checks included: what a
trainer pays), "kernel" the backend function alone on prepared arguments (the reference function for "torch").
CPU machines run backends "cpu" and "torch"; CUDA machines "triton", "cuda" and "torch" (a backend that cannot
run here is skipped with the reason, never measured through a fallback). Each benchmark records the machine and
the peak extra memory of one call (measured once, outside the timing loop) in extra_info, and asserts that the
benchmarked output matches the fp64 reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import machine, peak_extra_bytes, synced

from caprl_core import backends, ops, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("triton", "cuda", "torch") if DEVICE.type == "cuda" else ("cpu", "torch")
GROUP_SIZE = 8
WEIGHTS = (1.0, 0.5, 0.25)  # per reward component, e.g. accuracy, format, length


def _rewards(n: int, num_rewards: int) -> torch.Tensor:
    """[N] or [N, R] fp32 rewards in {0, 1/8, ..., 1}."""
    gen = torch.Generator().manual_seed(n * 10 + num_rewards)
    rewards = torch.randint(0, 9, (n, num_rewards), generator=gen).float() / 8
    return (rewards[:, 0] if num_rewards == 1 else rewards).to(DEVICE)


def _call(backend: str, level: str, rewards: torch.Tensor, weights: torch.Tensor | None):
    """A no-argument function computing the advantages [N] at the given level."""
    kwargs = dict(group_size=GROUP_SIZE, method="rloo", scale="group", weights=weights, eps=1e-6)
    if level == "op":
        return lambda: ops.group_advantages(rewards, backend=backend, **kwargs)
    if backend == "torch":
        return lambda: reference.group_advantages(rewards, **kwargs)
    n = rewards.shape[0]
    r2 = rewards.reshape(n, -1).contiguous()  # [N, R]
    index = torch.arange(n, device=DEVICE) // GROUP_SIZE  # [N] dense group ids
    w = torch.ones(r2.shape[1], device=DEVICE) if weights is None else weights
    kernels = backends.load(backend)
    return lambda: kernels.group_advantages(r2, index, n // GROUP_SIZE, "rloo", "group", w, 1e-6)


@pytest.mark.parametrize("level", ["op", "kernel"])
@pytest.mark.parametrize("num_rewards", [1, 3])
@pytest.mark.parametrize("n", [1024, 8192])
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_advantages(benchmark, backend: str, n: int, num_rewards: int, level: str) -> None:
    why = backends._why_unavailable(backend, "group_advantages", DEVICE)
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    rewards = _rewards(n, num_rewards)
    weights = torch.tensor(WEIGHTS[:num_rewards], device=DEVICE) if num_rewards > 1 else None
    fn = _call(backend, level, rewards, weights)

    run = synced(fn, DEVICE)

    expected = reference.group_advantages(
        rewards.double(), group_size=GROUP_SIZE, method="rloo", scale="group",
        weights=None if weights is None else weights.double(), eps=1e-6,
    )  # fmt: skip
    # fp32 output of O(1) advantages: a few fp32 ulps from the fp64 definition.
    torch.testing.assert_close(run().double(), expected, rtol=1e-5, atol=1e-5)
    benchmark.extra_info.update(
        machine=machine(), device=str(DEVICE), backend=backend, level=level, n=n, num_rewards=num_rewards,
        group_size=GROUP_SIZE, peak_extra_bytes=peak_extra_bytes(run, DEVICE),
    )  # fmt: skip
    benchmark(run)
