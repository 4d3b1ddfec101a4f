"""Triton kernel of `group_advantages`: group-relative advantages of N samples in one launch, no host sync.

Contract (caprl_core/backends.py): `group_advantages(rewards[N, R], group_index[N] i64 dense in [0, G), num_groups,
method, scale, weights[R], eps) -> adv[N]`; caprl_core.reference.group_advantages is the definition.

Design. Groups are ragged and their ids unsorted; sorting them would cost extra launches, so instead each program
owns BLOCK_G consecutive group ids and finds their members by comparing `group_index` with its ids, one
[BLOCK_N, BLOCK_G, BLOCK_R] one-hot tile at a time. It sweeps the batch three times: (1) count, sum, min and max per
group and column; (2) sum of squared deviations from the group mean (two passes rather than sum of squares, so no
cancellation); (3) the advantages of the rows it owns, weighted and summed over columns, one store per row.
scale="batch" adds two sweeps for the column std over all N, repeated by every program (cheap next to the one-hot
sweeps). Every row belongs to exactly one program, so there are no atomics and the result is deterministic.

Cost: each program does ~3 * N * BLOCK_G * BLOCK_R compare/select/add steps and reads the N x R rewards three times
(from L2 after the first), over ceil(G / BLOCK_G) programs running in parallel. It is meant for the sizes of an RL
step: N up to a few thousand rows (128 images x 8 samples = 1024, G = 128 -> 16 programs of 1024 x 8 one-hot work),
R small (1-4). Any N and G are correct (the sweeps loop over chunks); a very large R makes the tiles large.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _load_tile(Rewards_ptr, Rewards_row_stride, Index_ptr, n0, N, R, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows [n0, n0 + BLOCK_N): their ids, row mask, group index (-1 past N: matches no group) and rewards."""
    rows = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    row_mask = rows < N
    index = tl.load(Index_ptr + rows, mask=row_mask, other=-1)
    offsets = rows.to(tl.int64)[:, None] * Rewards_row_stride + cols[None, :]
    rewards = tl.load(Rewards_ptr + offsets, mask=row_mask[:, None] & (cols < R)[None, :], other=0.0)  # [BN, BR]
    return rows, row_mask, index, rewards


@triton.jit
def _gather(member, values):
    """Per row, the value of its group: member [BN, BG] one-hot, values [BG, BR] -> [BN, BR] (0 outside the block).

    A select-and-sum instead of a product, so an inf in another group's slot cannot leak in as NaN."""
    return tl.sum(tl.where(member[:, :, None], values[None, :, :], 0.0), axis=1)


@triton.jit
def _column_std(
    Rewards_ptr, Rewards_row_stride, Index_ptr, N, R,
    ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Unbiased std of each column over all N rows [BR] (0 when N == 1, as torch gives NaN there)."""
    total = tl.zeros([BLOCK_R], ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        _, _, _, rewards = _load_tile(Rewards_ptr, Rewards_row_stride, Index_ptr, n0, N, R, BLOCK_N, BLOCK_R)
        total += tl.sum(rewards, axis=0)
    mean = total / N
    squares = tl.zeros([BLOCK_R], ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        _, row_mask, _, rewards = _load_tile(Rewards_ptr, Rewards_row_stride, Index_ptr, n0, N, R, BLOCK_N, BLOCK_R)
        centered = tl.where(row_mask[:, None], rewards - mean[None, :], 0.0)
        squares += tl.sum(centered * centered, axis=0)
    return tl.sqrt(squares / tl.maximum(N - 1, 1))


@triton.jit
def _group_stats(
    Rewards_ptr, Rewards_row_stride, Index_ptr, groups, N, R,
    ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Size [BG], mean, unbiased std and "flat" (all equal, or no member) flag [BG, BR] of the groups `groups` [BG]."""
    count = tl.zeros([BLOCK_G], tl.int32)
    total = tl.zeros([BLOCK_G, BLOCK_R], ACC_DTYPE)
    low = tl.full([BLOCK_G, BLOCK_R], float("inf"), ACC_DTYPE)
    high = tl.full([BLOCK_G, BLOCK_R], float("-inf"), ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        _, _, index, rewards = _load_tile(Rewards_ptr, Rewards_row_stride, Index_ptr, n0, N, R, BLOCK_N, BLOCK_R)
        member = index[:, None] == groups[None, :]  # [BN, BG]
        member3, rewards3 = member[:, :, None], rewards[:, None, :]  # [BN, BG, 1], [BN, 1, BR]
        count += tl.sum(member.to(tl.int32), axis=0)
        total += tl.sum(tl.where(member3, rewards3, 0.0), axis=0)
        low = tl.minimum(low, tl.min(tl.where(member3, rewards3, float("inf")), axis=0))
        high = tl.maximum(high, tl.max(tl.where(member3, rewards3, float("-inf")), axis=0))
    mean = total / tl.maximum(count, 1)[:, None]  # [BG, BR]
    squares = tl.zeros([BLOCK_G, BLOCK_R], ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        _, _, index, rewards = _load_tile(Rewards_ptr, Rewards_row_stride, Index_ptr, n0, N, R, BLOCK_N, BLOCK_R)
        member = index[:, None] == groups[None, :]
        centered = rewards - _gather(member, mean)  # [BN, BR]
        squares += tl.sum(tl.where(member[:, :, None], (centered * centered)[:, None, :], 0.0), axis=0)
    std = tl.sqrt(squares / tl.maximum(count - 1, 1)[:, None])
    return count, mean, std, high <= low  # all equal; an empty group has high = -inf < low = inf


@triton.jit
def _group_advantages_kernel(
    Rewards_ptr, Rewards_row_stride, Index_ptr, Weights_ptr, Adv_ptr,
    N, R, eps: tl.float64,
    METHOD: tl.constexpr, SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # eps arrives as fp64 so that fp64 rewards see it exactly; tl.full casts it to the accumulation dtype.
    eps = tl.full([], eps, ACC_DTYPE)
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)  # [BG]; ids >= G (last program) have no members
    cols = tl.arange(0, BLOCK_R)
    weights = tl.load(Weights_ptr + cols, mask=cols < R, other=0.0)  # [BR]
    count, mean, std, flat = _group_stats(
        Rewards_ptr, Rewards_row_stride, Index_ptr, groups, N, R, ACC_DTYPE, BLOCK_N, BLOCK_G, BLOCK_R
    )
    # Per group and column, the factor that multiplies r - mean: n / (n - 1) for rloo, / (std + eps) when scaling,
    # and exactly 0 for a group whose rewards are all equal (r - mean need not round to 0 there).
    mult = tl.full([BLOCK_G, BLOCK_R], 1.0, ACC_DTYPE)
    if METHOD == "rloo":  # r - mean of the others = n / (n - 1) * (r - mean)
        size = count.to(ACC_DTYPE)  # int / int would divide in fp32
        mult = mult * (size / tl.maximum(size - 1.0, 1.0))[:, None]
    # A flat group (and the empty ids past G) divides by 1 instead of its zero std: no 0/0 when eps = 0.
    if SCALE == "group":
        mult = mult / tl.where(flat, 1.0, std + eps)
    elif SCALE == "batch":
        batch_std = _column_std(Rewards_ptr, Rewards_row_stride, Index_ptr, N, R, ACC_DTYPE, BLOCK_N, BLOCK_R)
        mult = mult / tl.where(flat, 1.0, (batch_std + eps)[None, :])
    mult = tl.where(flat, 0.0, mult)
    for n0 in range(0, N, BLOCK_N):
        rows, row_mask, index, rewards = _load_tile(
            Rewards_ptr, Rewards_row_stride, Index_ptr, n0, N, R, BLOCK_N, BLOCK_R
        )
        member = index[:, None] == groups[None, :]  # [BN, BG]
        owned = tl.max(member.to(tl.int32), axis=1) > 0  # [BN]: rows of this program's groups
        adv = (rewards - _gather(member, mean)) * _gather(member, mult)  # [BN, BR]
        tl.store(Adv_ptr + rows, tl.sum(adv * weights[None, :], axis=1), mask=row_mask & owned)


def group_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    num_groups: int,
    method: str,
    scale: str,
    weights: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """rewards [N, R] fp32/fp64 (unit last-dim stride), group_index [N] int64 in [0, num_groups), weights [R] (dtype of
    rewards) -> adv [N] (dtype of rewards). One launch of ceil(G / BLOCK_G) programs; no host synchronisation."""
    n, num_rewards = rewards.shape
    adv = torch.empty(n, dtype=rewards.dtype, device=rewards.device)
    block_r = triton.next_power_of_2(num_rewards)
    # Few groups per program: the one-hot work of a program grows with BLOCK_G, the number of programs shrinks.
    block_g = min(triton.next_power_of_2(num_groups), 8)
    # A tile of <= ~2048 elements: 16 per thread with 4 warps.
    block_n = min(triton.next_power_of_2(n), max(16, 2048 // (block_g * block_r)))
    acc = tl.float64 if rewards.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(num_groups, block_g),)
    _group_advantages_kernel[grid](
        rewards, rewards.stride(0), group_index, weights, adv,
        n, num_rewards, float(eps),
        METHOD=method, SCALE=scale, ACC_DTYPE=acc, BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_R=block_r,
        num_warps=4,
    )  # fmt: skip
    return adv
