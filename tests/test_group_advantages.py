"""ops.group_advantages on every backend: against caprl_core.reference in fp64, and against the formulas of TRL and
the CapRL recipe written out by hand on a fixed example.

Run: pytest tests/test_group_advantages.py -k "torch or triton"
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import require_backend

from caprl_core import backends, ops, reference

# The kernels sum in another order than the reference's index_add: a few ulp apart in fp64.
FP64 = dict(rtol=1e-12, atol=1e-12)
METHODS_SCALES = [(m, s) for m in reference.ADVANTAGE_METHODS for s in reference.ADVANTAGE_SCALES]


def advantages(backend: str, rewards: torch.Tensor, **kwargs) -> torch.Tensor:
    """ops.group_advantages run by exactly `backend`: a fallback to another backend fails the test (the fallback
    warning is raised once per process, so the selection is also checked directly)."""
    require_backend(backend, "group_advantages", rewards.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"caprl_core\.group_advantages: backend", category=UserWarning)
        assert backends.select("group_advantages", rewards.device, backend) == backend
        return ops.group_advantages(rewards, backend=backend, **kwargs)


def ragged_batch(device: torch.device, num_rewards: int, dtype=torch.float64):
    """23 samples in 7 unsorted groups with ids 7, -3, 100, ... (sizes 1 to 6), [23, R] rewards.

    Group 100 is flat in every column (its rows must get exactly 0), group -3 has one member, group 5 is flat in
    column 0 only, the others mix 0/1 rewards (as hard MCQ scores) with random ones."""
    gen = torch.Generator().manual_seed(0)
    sizes = {7: 4, -3: 1, 100: 5, 0: 2, 42: 6, 5: 3, -8: 2}
    ids = torch.tensor([g for g, n in sizes.items() for _ in range(n)])
    rewards = torch.rand(len(ids), num_rewards, generator=gen, dtype=torch.float64)
    rewards[ids == 7, 0] = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    rewards[ids == 100] = 0.625
    rewards[ids == 5, 0] = 0.25
    perm = torch.randperm(len(ids), generator=gen)
    return rewards[perm].to(device, dtype), ids[perm].to(device)


@pytest.mark.parametrize("method,scale", METHODS_SCALES)
@pytest.mark.parametrize("eps", [1e-6, 0.0, 0.1])
def test_ragged_groups_with_weights_match_reference(backend, device, method, scale, eps):
    rewards, ids = ragged_batch(device, num_rewards=3)
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64, device=device)
    kwargs = dict(group_ids=ids, method=method, scale=scale, weights=weights, eps=eps)
    out = advantages(backend, rewards, **kwargs)
    expected = reference.group_advantages(rewards, **kwargs)
    assert out.dtype == torch.float64 and out.shape == (rewards.shape[0],)
    torch.testing.assert_close(out, expected, **FP64)
    flat_everywhere = (ids == 100) | (ids == -3)  # zero-variance group, group of one
    assert torch.equal(out[flat_everywhere], torch.zeros_like(out[flat_everywhere]))
    assert bool((out[~flat_everywhere] != 0).all())


@pytest.mark.parametrize("method,scale", METHODS_SCALES)
def test_contiguous_groups_1d_rewards_match_reference(backend, device, method, scale):
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 5, (24,), generator=gen).double() / 4  # 6 groups of 4, ties and flat groups likely
    rewards[8:12] = 1.0
    rewards = rewards.to(device)
    kwargs = dict(group_size=4, method=method, scale=scale, eps=1e-4)
    out = advantages(backend, rewards, **kwargs)
    torch.testing.assert_close(out, reference.group_advantages(rewards, **kwargs), **FP64)
    assert torch.equal(out[8:12], torch.zeros(4, dtype=torch.float64, device=device))


@pytest.mark.parametrize("method,scale", [("rloo", "group"), ("grpo", "batch")])
def test_many_groups_and_rows_match_reference(backend, device, method, scale):
    """More rows and groups than one Triton block holds (the kernel loops over row chunks and group programs)."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(-50, 50, (300,), generator=gen).to(device)
    rewards = (torch.randint(0, 9, (300, 3), generator=gen).double() / 8).to(device)
    weights = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64, device=device)
    kwargs = dict(group_ids=ids, method=method, scale=scale, weights=weights, eps=1e-6)
    out = advantages(backend, rewards, **kwargs)
    torch.testing.assert_close(out, reference.group_advantages(rewards, **kwargs), **FP64)


@pytest.mark.parametrize("method,scale", METHODS_SCALES)
def test_fp32_rewards(backend, device, method, scale):
    rewards, ids = ragged_batch(device, num_rewards=2, dtype=torch.float32)
    kwargs = dict(group_ids=ids, method=method, scale=scale, eps=1e-6)
    out = advantages(backend, rewards, **kwargs)
    assert out.dtype == torch.float32
    # fp32 accumulation: the reference in fp64 on the same (fp32-exact) inputs is within a few fp32 ulp of
    # advantages of size <= ~3; 1e-5 leaves room for a different summation order.
    expected = reference.group_advantages(rewards.double(), **kwargs).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[ids == 100], torch.zeros_like(out[ids == 100]))


@pytest.mark.parametrize("method,scale", METHODS_SCALES)
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_flat_groups_are_exactly_zero(backend, device, method, scale, eps):
    """Zero-variance groups get exactly 0, not r - mean rounded: the mean of three 0.1 is not 0.1 in floating point
    (so r - mean != 0), and with eps = 0 the division by (0 + eps) must not turn into NaN."""
    assert sum([0.1] * 3) / 3 != 0.1 and sum([0.7] * 3) / 3 != 0.7  # the premise, in fp64
    rewards = torch.tensor([0.1] * 3 + [0.7] * 3 + [0.5] * 4 + [0.0], dtype=torch.float64, device=device)
    ids = torch.tensor([3, 3, 3, -1, -1, -1, 8, 8, 8, 8, 9], device=device)
    out = advantages(backend, rewards, group_ids=ids, method=method, scale=scale, eps=eps)
    assert torch.equal(out, torch.zeros(11, dtype=torch.float64, device=device))


@pytest.mark.parametrize("scale", reference.ADVANTAGE_SCALES)
def test_single_sample(backend, device, scale):
    out = advantages(backend, torch.tensor([0.7], device=device), group_size=1, scale=scale)
    assert torch.equal(out, torch.zeros(1, device=device))


def test_unsorted_ids_are_a_permutation_of_sorted_ones(backend, device):
    """Relabelling groups and shuffling rows shuffles the advantages the same way."""
    rewards, ids = ragged_batch(device, num_rewards=1)
    order = torch.argsort(ids, stable=True)
    relabel = {int(g): i for i, g in enumerate(torch.unique(ids))}
    sorted_ids = torch.tensor([relabel[int(g)] for g in ids[order]], device=device)
    out = advantages(backend, rewards, group_ids=ids, method="rloo")
    out_sorted = advantages(backend, rewards[order], group_ids=sorted_ids, method="rloo")
    torch.testing.assert_close(out[order], out_sorted, **FP64)


# Formulas of TRL and the CapRL recipe on a fixed example: two groups of 4, the second one flat.
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]
GROUP_MEAN = 0.5
GROUP_STD = math.sqrt(sum((r - GROUP_MEAN) ** 2 for r in REWARDS[:4]) / 3)  # unbiased, torch.std's default
TRL_EPS = 1e-4  # TRL's GRPOTrainer: (r - mean) / (std + 1e-4)


def _leave_one_out(group: list[float]) -> list[float]:
    """RLOO: each reward minus the mean of the other members of its group."""
    return [r - (sum(group) - r) / (len(group) - 1) for r in group]


def _batch_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


EXPECTED = {
    # TRL GRPOTrainer (scale_rewards="group"): (r - group mean) / (group std + 1e-4); the flat group has r - mean = 0.
    ("grpo", "group"): [(r - GROUP_MEAN) / (GROUP_STD + TRL_EPS) for r in REWARDS[:4]] + [0.0] * 4,
    # RLOO (the CapRL recipe's advantage): r_i - mean of the other G - 1 rewards, no std.
    ("rloo", "none"): _leave_one_out(REWARDS[:4]) + _leave_one_out(REWARDS[4:]),
    # Dr.GRPO: r - group mean, no std.
    ("grpo", "none"): [r - GROUP_MEAN for r in REWARDS[:4]] + [0.0] * 4,
    # TRL scale_rewards="batch": (r - group mean) / (std of all rewards + 1e-4).
    ("grpo", "batch"): [(r - GROUP_MEAN) / (_batch_std(REWARDS) + TRL_EPS) for r in REWARDS[:4]] + [0.0] * 4,
    # RLOO divided by the group std, as GRPO does.
    ("rloo", "group"): [a / (GROUP_STD + TRL_EPS) for a in _leave_one_out(REWARDS[:4])] + [0.0] * 4,
}


def test_fixed_example_numbers():
    """The hand-written expectations themselves, against the numbers worked out on paper."""
    third = 1 / math.sqrt(3)
    assert EXPECTED[("grpo", "group")][:2] == pytest.approx([0.5 / (third + 1e-4), -0.5 / (third + 1e-4)], abs=1e-15)
    assert EXPECTED[("rloo", "none")][:4] == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-15)
    assert _batch_std(REWARDS) == pytest.approx(math.sqrt(1 / 7), abs=1e-15)


@pytest.mark.parametrize("method,scale", sorted(EXPECTED))
# fp32: advantages of size ~1 within a few ulp (6e-8) of the exact value.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
def test_matches_trl_and_caprl_formulas(backend, device, method, scale, dtype, tol):
    rewards = torch.tensor(REWARDS, dtype=dtype, device=device)
    out = advantages(backend, rewards, group_size=4, method=method, scale=scale, eps=TRL_EPS)
    expected = torch.tensor(EXPECTED[(method, scale)], dtype=dtype, device=device)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    assert torch.equal(out[4:], torch.zeros(4, dtype=dtype, device=device))  # the flat group: exactly 0


def test_decoupled_components_are_normalised_separately(backend, device):
    """[N, 2] rewards (e.g. correctness and length): GRPO per column, then weighted sum (GDPO-style)."""
    second = [0.0, 2.0, 4.0, 6.0, 1.0, 1.0, 1.0, 3.0]
    rewards = torch.tensor([REWARDS, second], dtype=torch.float64, device=device).T  # [8, 2]
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64, device=device)
    out = advantages(backend, rewards, group_size=4, weights=weights, eps=TRL_EPS)

    def grpo(group: list[float]) -> list[float]:
        mean = sum(group) / len(group)
        if max(group) == min(group):
            return [0.0] * len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        return [(r - mean) / (std + TRL_EPS) for r in group]

    first_adv = grpo(REWARDS[:4]) + grpo(REWARDS[4:])
    second_adv = grpo(second[:4]) + grpo(second[4:])
    expected = [a + 0.5 * b for a, b in zip(first_adv, second_adv, strict=True)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64, device=device), **FP64)


# The CUDA kernel keeps 40 bytes of state per group in shared memory while they fit, else in a global workspace
# (csrc/cuda/group_advantages.cu: group_advantages_workspace_bytes). The same arithmetic, with its constants:
CU_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "group_advantages.cu"
CU_BYTES_PER_GROUP = 5 * 8  # kBytesPerGroup = 5 * sizeof(double)
CU_DEFAULT_SHARED = 48 * 1024  # kDefaultShared
CU_STATIC_SHARED = (1024 // 32) * 8 + 1024  # kStaticShared = kWarps * sizeof(double) + 1024, kWarps = kThreads / 32


def max_shared_groups(optin_shared_bytes: int) -> int:
    """The most groups whose state the CUDA kernel keeps in shared memory, given the device's opt-in limit."""
    return (max(optin_shared_bytes, CU_DEFAULT_SHARED) - CU_STATIC_SHARED) // CU_BYTES_PER_GROUP


def test_shared_memory_threshold_constants_match_the_cuda_source():
    """The constants above are the .cu file's: an edit there must be mirrored here, or the GPU test below would test
    the shared-memory path twice and the global one never."""
    source = CU_SOURCE.read_text()
    for line in [
        "constexpr int kThreads = 1024;",
        "constexpr size_t kBytesPerGroup = 5 * sizeof(double);",
        "constexpr size_t kDefaultShared = 48 * 1024;",
        "constexpr size_t kStaticShared = kWarps * sizeof(double) + 1024;",
        "const size_t limit = std::max(static_cast<size_t>(optin), kDefaultShared) - kStaticShared;",
    ]:
        assert line in source, f"csrc/cuda/group_advantages.cu changed: {line!r} not found"
    assert max_shared_groups(227 * 1024) == 5779  # H100/H200: the "about 5,700 groups" of the .cu comment


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("extra_groups", [0, 1, 3000], ids=["shared-last", "global-first", "global-many"])
def test_cuda_global_memory_path_matches_reference(device, dtype, extra_groups):
    """Just below, just above and well above the number of groups whose state fits in shared memory: the kernel's
    two storage paths (shared, and the global workspace with L1-bypassing loads) against the reference."""
    optin = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    num_groups = max_shared_groups(optin) + extra_groups
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, num_groups, (4 * num_groups,), generator=gen)
    ids[:num_groups] = torch.randperm(num_groups, generator=gen)  # every group present: G is exactly num_groups
    rewards = torch.randint(0, 9, (len(ids), 2), generator=gen).double() / 8  # ties, flat and single groups
    ids, rewards = ids.to(device), rewards.to(device, dtype)
    weights = torch.tensor([1.0, 0.5], dtype=dtype, device=device)
    for method, scale in [("grpo", "group"), ("rloo", "batch")]:
        kwargs = dict(group_ids=ids, method=method, scale=scale, weights=weights, eps=1e-6)
        out = advantages("cuda", rewards, **kwargs)
        expected = reference.group_advantages(rewards.double(), **{**kwargs, "weights": weights.double()}).to(dtype)
        tol = FP64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)  # as test_fp32_rewards
        torch.testing.assert_close(out, expected, **tol)
