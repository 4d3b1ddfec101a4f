"""Triton kernels of `linear_token_logprobs`: log_softmax((hidden @ weight.T + bias) / T)[target] without the
[N, V] logits.

Logits only ever exist as [BLOCK_N, BLOCK_V] tiles in registers, computed by `tl.dot` over H in BLOCK_H chunks.
Forward: a grid of (token blocks, vocab splits); each program walks its vocab range with an online logsumexp and
writes partial (max, sum, entropy sum, target logit) per token, which the launcher merges across splits (splits
only exist to fill the GPU when there are few token blocks). Backward, deterministic (no atomics, so the same
inputs give bit-identical gradients): one kernel over token blocks (x vocab splits) recomputes the logits and
accumulates grad_hidden = dZ @ W; another over vocab blocks recomputes them again and accumulates
grad_weight = dZ^T @ h and grad_bias = colsum(dZ). Each program owns the output rows it writes.

Cost: forward 2NVH FLOPs. Backward 8NVH: 2 x 2NVH logit recomputes + 2NVH for each gradient matmul. A fused
backward with atomic adds would need 6NVH; the extra 2NVH recompute (+33%) buys determinism and no fp32 atomics
on [N, H] and [V, H]. Memory beyond the inputs: fp32 [V, H] and [num_splits, N, H] accumulators in the backward
(num_splits * N is at most about 2 x SMs x BLOCK_N rows when splits are used), never O(N x V).
Contract: caprl_core/backends.py; definition: caprl_core/reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from caprl_core import backends


@triton.jit
def _logits_tile(
    hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr, rows, cols, N, V, H, temperature,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """z = (hidden[rows] @ weight[cols].T + bias[cols]) / T: a [BLOCK_N, BLOCK_V] tile in ACC_DTYPE (rows and cols
    are int64 index vectors; out-of-range rows and cols read zeros)."""
    row_mask = rows < N
    col_mask = cols < V
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC_DTYPE)
    for start in range(0, H, BLOCK_H):
        k = start + tl.arange(0, BLOCK_H)
        k_mask = k < H
        h = tl.load(
            hidden_ptr + rows[:, None] * hidden_row_stride + k[None, :],
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_H]  # fmt: skip
        w_t = tl.load(
            weight_ptr + cols[None, :] * weight_row_stride + k[:, None],
            mask=col_mask[None, :] & k_mask[:, None], other=0.0,
        )  # [BLOCK_H, BLOCK_V]  # fmt: skip
        acc = tl.dot(h.to(DOT_DTYPE), w_t.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)[None, :]
    return acc / temperature


@triton.jit
def _dlogits_tile(
    z, rows, cols, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, N, V, temperature,
    ignore_index, ACC_DTYPE: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
):  # fmt: skip
    """d loss / d logits for a tile z [BLOCK_N, BLOCK_V] of logits / T; exactly 0 on ignored or padding rows and on
    padding columns."""
    row_mask = rows < N
    target = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    valid = (row_mask & (target != ignore_index))[:, None] & (cols < V)[None, :]
    logp = tl.where(valid, z - lse[:, None], 0.0)  # padding: finite garbage (masked below), not an exp overflow
    p = tl.exp(logp)
    dz = tl.zeros_like(z)
    if HAS_GRAD_LOGP:  # d logp_target / dz = onehot - p
        g_logp = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0)
        dz += g_logp[:, None] * (tl.where(cols[None, :] == target[:, None], 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:  # d entropy / dz = -p * (log p + entropy); 0 where p = 0 (-inf logits), not 0 * -inf
        g_ent = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        dz -= g_ent[:, None] * p * (tl.where(p > 0, logp, 0.0) + entropy[:, None])
    return tl.where(valid, dz / temperature, 0.0)


@triton.jit
def _linear_token_logprobs_fwd_kernel(
    hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr, targets_ptr,
    max_ptr, sum_ptr, ent_sum_ptr, target_logit_ptr, N, V, H, tiles_per_split, temperature: tl.float64,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Partial softmax statistics of token block program_id(0) over vocab split program_id(1); each output is
    [num_splits, N]: running max m, s = sum exp(z - m), t = sum exp(z - m) * (z - m), and the target's z (0 when
    the target is outside this split)."""
    # T arrives as fp64 (a plain float arg would be fp32, off by 1e-8 for fp64 inputs) and is used in ACC_DTYPE.
    # Adding it to an fp64 zero is the one spelling that also keeps full precision under the interpreter.
    temperature = (tl.zeros((), tl.float64) + temperature).to(ACC_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    row_mask = rows < N
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), ACC_DTYPE)
    s = tl.zeros((BLOCK_N,), ACC_DTYPE)
    t = tl.zeros((BLOCK_N,), ACC_DTYPE)
    target_z = tl.zeros((BLOCK_N,), ACC_DTYPE)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        z = _logits_tile(
            hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr, rows, cols, N, V, H, temperature,
            ACC_DTYPE, DOT_DTYPE, DOT_PRECISION, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # [BLOCK_N, BLOCK_V]  # fmt: skip
        col_mask = (cols < V)[None, :]
        z = tl.where(col_mask, z, float("-inf"))
        target_z += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # Shift by 0 while a row's logits so far are all -inf (a bias of -inf masks vocabulary entries):
        # exp(-inf - (-inf)) is NaN. Such a tile adds nothing (e = 0, alpha = 0, s stays 0).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_shift)  # 0 while s is still 0 (m = -inf)
        e = tl.exp(z - m_shift[:, None])  # 0 on padding columns and -inf logits
        if RETURN_ENTROPY:
            # t is relative to the running max so that entropy = log s - t / s never cancels large numbers.
            # The guards keep 0 * inf out: columns without mass (padding, -inf logits) count as 0 log 0 = 0, and
            # m - m_shift = -inf while s = 0.
            z_shifted = tl.where(e > 0, z - m_shift[:, None], 0.0)
            t = alpha * (t + tl.where(s > 0, m - m_shift, 0.0) * s) + tl.sum(e * z_shifted, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    out = split * N + rows
    tl.store(max_ptr + out, m, mask=row_mask)
    tl.store(sum_ptr + out, s, mask=row_mask)
    tl.store(target_logit_ptr + out, target_z, mask=row_mask)
    if RETURN_ENTROPY:
        tl.store(ent_sum_ptr + out, t, mask=row_mask)


@triton.jit
def _linear_token_logprobs_bwd_hidden_kernel(
    hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr, targets_ptr, lse_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr, grad_hidden_ptr, N, V, H, tiles_per_split, temperature: tl.float64,
    ignore_index, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """grad_hidden[split, rows] = sum over this split's vocab tiles of dZ @ W, into [num_splits, N, H] (ACC_DTYPE).
    The [BLOCK_N, H] accumulator does not fit in registers, so it lives in global memory; this program is its only
    writer, hence no atomics."""
    temperature = (tl.zeros((), tl.float64) + temperature).to(ACC_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    row_mask = rows < N
    out_ptr = grad_hidden_ptr + (split * N + rows[:, None]) * H
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        z = _logits_tile(
            hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr, rows, cols, N, V, H, temperature,
            ACC_DTYPE, DOT_DTYPE, DOT_PRECISION, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        dz = _dlogits_tile(
            z, rows, cols, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, N, V, temperature,
            ignore_index, ACC_DTYPE, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY,
        )  # [BLOCK_N, BLOCK_V]  # fmt: skip
        # Same rounding as a native low-precision backward: dZ enters the tensor-core matmul in the input dtype.
        dz = dz.to(weight_ptr.dtype.element_ty).to(DOT_DTYPE)
        for h_start in range(0, H, BLOCK_H):
            k = h_start + tl.arange(0, BLOCK_H)
            k_mask = k < H
            w = tl.load(
                weight_ptr + cols[:, None] * weight_row_stride + k[None, :],
                mask=(cols < V)[:, None] & k_mask[None, :], other=0.0,
            )  # [BLOCK_V, BLOCK_H]  # fmt: skip
            out_mask = row_mask[:, None] & k_mask[None, :]
            acc = tl.dot(dz, w.to(DOT_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            if v_start > v_begin:  # the first tile initialises the accumulator: no memset, no read
                acc += tl.load(out_ptr + k[None, :], mask=out_mask, other=0.0)
            tl.store(out_ptr + k[None, :], acc, mask=out_mask)


@triton.jit
def _linear_token_logprobs_bwd_weight_kernel(
    hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr, targets_ptr, lse_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr, grad_weight_ptr, grad_bias_ptr, N, V, H, temperature: tl.float64,
    ignore_index, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """grad_weight[cols] = dZ^T @ h over all tokens, into [V, H] (ACC_DTYPE), and grad_bias[cols] = colsum(dZ).
    Vocab block program_id(0) is the only writer of its rows: no atomics."""
    temperature = (tl.zeros((), tl.float64) + temperature).to(ACC_DTYPE)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    out_ptr = grad_weight_ptr + cols[:, None] * H
    grad_bias = tl.zeros((BLOCK_V,), ACC_DTYPE)
    for n_start in range(0, N, BLOCK_N):
        rows = n_start + tl.arange(0, BLOCK_N).to(tl.int64)
        z = _logits_tile(
            hidden_ptr, hidden_row_stride, weight_ptr, weight_row_stride, bias_ptr, rows, cols, N, V, H, temperature,
            ACC_DTYPE, DOT_DTYPE, DOT_PRECISION, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        dz = _dlogits_tile(
            z, rows, cols, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, N, V, temperature,
            ignore_index, ACC_DTYPE, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY,
        )  # [BLOCK_N, BLOCK_V]  # fmt: skip
        if HAS_BIAS:
            grad_bias += tl.sum(dz, axis=0)
        dz_t = tl.trans(dz.to(hidden_ptr.dtype.element_ty).to(DOT_DTYPE))  # [BLOCK_V, BLOCK_N]
        for h_start in range(0, H, BLOCK_H):
            k = h_start + tl.arange(0, BLOCK_H)
            k_mask = k < H
            h = tl.load(
                hidden_ptr + rows[:, None] * hidden_row_stride + k[None, :],
                mask=(rows < N)[:, None] & k_mask[None, :], other=0.0,
            )  # [BLOCK_N, BLOCK_H]  # fmt: skip
            out_mask = col_mask[:, None] & k_mask[None, :]
            acc = tl.dot(dz_t, h.to(DOT_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            if n_start > 0:  # the first token tile initialises the accumulator
                acc += tl.load(out_ptr + k[None, :], mask=out_mask, other=0.0)
            tl.store(out_ptr + k[None, :], acc, mask=out_mask)
    if HAS_BIAS:
        tl.store(grad_bias_ptr + cols, grad_bias, mask=col_mask)


def _config(kernel: str, dtype: torch.dtype, vocab: int, hidden: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) of `kernel` ("fwd", "bwd_hidden", "bwd_weight").

    GPU, fp16/bf16 - compiled for sm_90 and checked with ptxas (shared memory, registers), but not timed yet: starting
    points to tune on an H100. The forward is a matmul with a softmax epilogue once per tile: the usual 128 x 128 x 64
    tensor-core tile, 3 stages (96 KB shared, 185 registers, no spills). The backward kernels read-modify-write an
    fp32 [BLOCK, H] accumulator in global memory once per step of their reduction (over V for grad_hidden, over N
    for grad_weight): (reduced block) / 2 FLOPs per byte of that traffic, so the reduced side is 256 long and the
    owned side 64; BLOCK_H 32 keeps them at 255 registers with an 8-byte stack (64 spills 48 bytes). fp32 ("ieee")
    and fp64 dots run on FMA units with operands staged in shared memory: small tiles (fp64 at 128 x 64 x 3 stages
    would need 384 KB). Interpreter: each block op is a numpy call plus ~1 ms of Python (every tl.sum or helper call
    re-patches triton.language), so tiles are as wide as possible (up to 4,096 columns) but still about 4 per vocab,
    so tests cross tile and split boundaries; BLOCK_N stays at tl.dot's minimum of 16 as test shapes have few tokens."""
    block_h = min(64, max(16, triton.next_power_of_2(hidden)))
    if backends.triton_interpreter():
        return 16, min(4096, max(16, triton.next_power_of_2(triton.cdiv(vocab, 4)))), block_h, 4, 1
    if dtype == torch.float64:
        return 32, 32, min(block_h, 32), 4, 2
    if dtype == torch.float32:
        return 64, 64, min(block_h, 32), 8, 2  # 4 warps spill ~4 KB per thread in bwd_weight
    if kernel == "fwd":
        return 128, 128, block_h, 8, 3
    block_n, block_v = (64, 256) if kernel == "bwd_hidden" else (256, 64)
    return block_n, block_v, min(block_h, 32), 8, 3


def _num_splits(num_row_blocks: int, num_v_tiles: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, tiles_per_split): split the vocab so that token blocks x splits fills the GPU about twice over.
    Every split gets at least one tile. Under the interpreter two splits, so the merge path is always exercised."""
    if backends.triton_interpreter() or device.type != "cuda":
        wanted = 2
    else:
        wanted = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, num_row_blocks)
    tiles_per_split = triton.cdiv(num_v_tiles, max(1, min(wanted, num_v_tiles)))
    return triton.cdiv(num_v_tiles, tiles_per_split), tiles_per_split


def _dtypes(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype, tl.dtype, str]:
    """(accumulator dtype in torch and in triton, dtype of the tl.dot operands, tl.dot input_precision).

    fp32 operands use "ieee": the default tf32 rounds them to 10 mantissa bits (1e-3 relative error, far from the
    1e-5 the op promises). fp16/bf16 keep the default (it only concerns fp32 operands). The Triton 3.9 interpreter
    stores bf16 as uint16 and its tl.dot multiplies those raw bits, so under it bf16 operands go in as fp32: bf16 x
    bf16 products are exact in fp32, which is what the tensor cores compute too, up to the summation order."""
    if dtype == torch.float64:
        return torch.float64, tl.float64, tl.float64, "ieee"
    if dtype == torch.float32 or (dtype == torch.bfloat16 and backends.triton_interpreter()):
        return torch.float32, tl.float32, tl.float32, "ieee"
    return torch.float32, tl.float32, (tl.float16 if dtype == torch.float16 else tl.bfloat16), "tf32"


def linear_token_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V, H] (unit stride along H, any row strides), bias [V] or None, targets [N] int64
    -> (logp [N], lse [N], entropy [N] or None) in fp32 (fp64 for fp64 inputs)."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    targets = targets.contiguous()  # a strided 1-D view reshapes to itself: the kernel indexes targets[row]
    torch_acc, tl_acc, dot_dtype, dot_precision = _dtypes(hidden.dtype)
    block_n, block_v, block_h, num_warps, num_stages = _config("fwd", hidden.dtype, vocab, h)
    num_splits, tiles_per_split = _num_splits(triton.cdiv(n, block_n), triton.cdiv(vocab, block_v), hidden.device)
    # [4, num_splits, N]: running max, sum of exp, entropy sum, target logit, per split
    partial = torch.empty((4, num_splits, n), dtype=torch_acc, device=hidden.device)
    _linear_token_logprobs_fwd_kernel[(triton.cdiv(n, block_n), num_splits)](
        hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight, targets,
        partial[0], partial[1], partial[2], partial[3], n, vocab, h, tiles_per_split, temperature,
        ACC_DTYPE=tl_acc, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision, HAS_BIAS=bias is not None,
        RETURN_ENTROPY=return_entropy, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    # Merge the splits: rescale each split's sums to the global max. A split whose logits are all -inf (a bias of
    # -inf over its columns) has max -inf and sum 0: scale 0, and its shift is taken as 0 so that it adds
    # 0 * 0, not -inf * 0 = NaN, to the entropy sum.
    split_max, split_sum, split_t, split_target = partial  # each [num_splits, N]
    row_max = split_max.amax(0)
    scale = torch.exp(split_max - row_max)
    total = (split_sum * scale).sum(0)
    lse = row_max + torch.log(total)
    keep = targets != ignore_index
    # (z - max) - log(sum), not z - lse: lse rounds to half an ulp of its magnitude, z - max is exact nearby.
    logp = torch.where(keep, (split_target.sum(0) - row_max) - torch.log(total), 0.0)
    entropy = None
    if return_entropy:
        shift = torch.where(split_sum > 0, split_max - row_max, 0.0)
        t = (scale * (split_t + shift * split_sum)).sum(0)
        entropy = torch.where(keep, torch.log(total) - t / total, 0.0)
    return logp, lse, entropy


def linear_token_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of sum(grad_logp * logp + grad_entropy * entropy) -> (grad_hidden [N, H], grad_weight [V, H],
    grad_bias [V] or None) in the input dtypes. lse, entropy, grad_*: [N] in the accumulation dtype; None grads
    mean 0. Accumulates in fp32 (fp64 for fp64 inputs): for bf16 inputs that is an fp32 [V, H] buffer."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    targets = targets.contiguous()
    torch_acc, tl_acc, dot_dtype, dot_precision = _dtypes(hidden.dtype)
    if grad_entropy is not None and entropy is None:
        raise ValueError("entropy: expected the saved entropy [N] when grad_entropy is given, got None")
    grad_weight = torch.empty((vocab, h), dtype=torch_acc, device=hidden.device)
    grad_bias = torch.empty(vocab, dtype=torch_acc, device=hidden.device) if bias is not None else None
    flags = dict(
        ACC_DTYPE=tl_acc, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision, HAS_BIAS=bias is not None,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
    )  # fmt: skip
    inputs = (
        hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight, targets, lse,
        entropy if entropy is not None else lse, grad_logp if grad_logp is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
    )  # fmt: skip

    block_n, block_v, block_h, num_warps, num_stages = _config("bwd_hidden", hidden.dtype, vocab, h)
    num_splits, tiles_per_split = _num_splits(triton.cdiv(n, block_n), triton.cdiv(vocab, block_v), hidden.device)
    grad_hidden = torch.empty((num_splits, n, h), dtype=torch_acc, device=hidden.device)  # per split, summed below
    _linear_token_logprobs_bwd_hidden_kernel[(triton.cdiv(n, block_n), num_splits)](
        *inputs, grad_hidden, n, vocab, h, tiles_per_split, temperature, ignore_index, **flags,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip

    block_n, block_v, block_h, num_warps, num_stages = _config("bwd_weight", hidden.dtype, vocab, h)
    _linear_token_logprobs_bwd_weight_kernel[(triton.cdiv(vocab, block_v),)](
        *inputs, grad_weight, grad_bias if grad_bias is not None else grad_weight, n, vocab, h, temperature,
        ignore_index, **flags, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    grad_hidden = grad_hidden[0] if num_splits == 1 else grad_hidden.sum(0)
    return (
        grad_hidden.to(hidden.dtype),
        grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
