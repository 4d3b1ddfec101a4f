"""Triton kernels of `token_logprobs`: log_softmax(logits / T)[target] (and the entropy) in one pass over the vocab.

One program per token row. The forward streams the row in BLOCK_V chunks with an online logsumexp, so a
151,936-wide row never has to fit in registers; the backward recomputes the softmax from the saved lse (no [N, V]
probabilities are kept between the passes). Contract: caprl_core/backends.py; definition: caprl_core/reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from caprl_core import backends


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    logits_row_stride,
    targets_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    V,
    temperature: tl.float64,
    ignore_index,
    ACC_DTYPE: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * row_stride overflows int32 at V = 151,936
    # T arrives as fp64 (a plain float arg would be fp32, off by 1e-8 for fp64 inputs) and is used in ACC_DTYPE.
    # Adding it to an fp64 zero is the one spelling that also keeps full precision under the interpreter.
    temperature = (tl.zeros((), tl.float64) + temperature).to(ACC_DTYPE)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    keep = target != ignore_index

    # Running max m, s = sum exp(z - m) and t = sum exp(z - m) * (z - m). t is kept relative to the running max
    # so that entropy = log s - t / s never subtracts two large numbers (lse - E[z] would, for large logits).
    m = tl.full((), float("-inf"), ACC_DTYPE)
    s = tl.zeros((), ACC_DTYPE)
    t = tl.zeros((), ACC_DTYPE)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(ACC_DTYPE) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Shift by 0 while every logit so far is -inf (masked vocabulary entries): exp(-inf - (-inf)) is NaN, and a
        # leading all -inf chunk would poison s and t. The chunk then adds nothing (e = 0, alpha = 0, s stays 0).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_shift)  # 0 while s is still 0 (m = -inf)
        e = tl.exp(z - m_shift)  # 0 on padding lanes and -inf logits
        if RETURN_ENTROPY:
            # Rescale t to the new max. Both guards keep 0 * inf (= NaN) out: lanes without mass (padding, -inf
            # logits) have z - m_shift = -inf and count as 0 log 0 = 0, and m - m_shift = -inf while s = 0.
            z_shifted = tl.where(e > 0, z - m_shift, 0.0)
            t = alpha * (t + tl.where(s > 0, m - m_shift, 0.0) * s) + tl.sum(e * z_shifted, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new

    tl.store(lse_ptr + row, m + tl.log(s))
    safe_target = tl.where(keep, target, 0)  # ignore_index may be negative: never read with it
    z_target = tl.load(row_ptr + safe_target, mask=keep, other=0.0).to(ACC_DTYPE) / temperature
    # (z - m) - log s, not z - lse: lse rounds to half an ulp of its magnitude (1.5e-5 at |lse| = 300 in fp32),
    # while z - m is exact for nearby values, as in torch.log_softmax.
    tl.store(logp_ptr + row, tl.where(keep, (z_target - m) - tl.log(s), 0.0))
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(keep, tl.log(s) - t / s, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    logits_row_stride,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    grad_logits_row_stride,
    V,
    temperature: tl.float64,
    ignore_index,
    ACC_DTYPE: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temperature = (tl.zeros((), tl.float64) + temperature).to(ACC_DTYPE)
    row_ptr = logits_ptr + row * logits_row_stride
    grad_row_ptr = grad_logits_ptr + row * grad_logits_row_stride
    target = tl.load(targets_ptr + row)
    keep = target != ignore_index
    lse = tl.load(lse_ptr + row)
    g_logp = tl.zeros((), ACC_DTYPE)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row).to(ACC_DTYPE)
    g_ent = tl.zeros((), ACC_DTYPE)
    entropy = tl.zeros((), ACC_DTYPE)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(ACC_DTYPE)
        entropy = tl.load(entropy_ptr + row).to(ACC_DTYPE)

    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC_DTYPE) / temperature
        # p = exp(z - lse) carries lse's rounding as a relative error (~6e-8 * |lse| in fp32): the saved lse is all
        # the backward has (re-reading the row for its max would cost a third pass over [N, V]).
        logp = tl.where(mask, z - lse, 0.0)  # padding lanes: finite garbage (never stored) instead of exp overflow
        p = tl.exp(logp)
        # d logp_target / dz = onehot - p;  d entropy / dz = -p * (log p + entropy)
        grad_z = g_logp * (tl.where(cols == target, 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            # p = 0 at -inf logits: their term is 0, not 0 * -inf = NaN
            grad_z -= g_ent * p * (tl.where(p > 0, logp, 0.0) + entropy)
        grad = tl.where(keep, grad_z / temperature, 0.0)  # exactly 0 on ignored rows, even for inf logits
        tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). One row per program is memory bound: a 4,096-wide chunk (16 fp32 values per thread at
    8 warps; ptxas for sm_90: 40 registers, 136 for fp64 with entropy, no spills) keeps enough loads in flight
    without spilling, and the many rows of a launch fill the GPU. The interpreter runs each chunk as a few numpy
    calls plus fixed Python overhead: chunks as wide as possible, but about 4 per row so that tests cross chunk
    boundaries (the online logsumexp) even at small V."""
    if backends.triton_interpreter():
        return min(16384, max(16, triton.next_power_of_2(triton.cdiv(vocab, 4)))), 4
    block_v = min(triton.next_power_of_2(vocab), 4096)
    return block_v, (8 if block_v >= 4096 else 4)


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def token_logprobs_fwd(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, return_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits [N, V] (unit stride along V, any row stride), targets [N] int64 -> (logp [N], lse [N], entropy [N] or
    None), in fp32 (fp64 for fp64 logits). lse is logsumexp(logits / T), kept for the backward."""
    n, vocab = logits.shape
    targets = targets.contiguous()  # a strided 1-D view reshapes to itself: the kernel indexes targets[row]
    torch_acc, tl_acc = _acc(logits.dtype)
    logp = torch.empty(n, dtype=torch_acc, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else None
    block_v, num_warps = _launch_config(vocab)
    _token_logprobs_fwd_kernel[(n,)](
        logits, logits.stride(0), targets, logp, lse, entropy if return_entropy else logp, vocab,
        temperature, ignore_index,
        ACC_DTYPE=tl_acc, RETURN_ENTROPY=return_entropy, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return logp, lse, entropy


def token_logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. logits [N, V], in the dtype of logits
    (contiguous). lse, entropy, grad_logp, grad_entropy: [N] in the accumulation dtype; None gradients mean 0."""
    n, vocab = logits.shape
    targets = targets.contiguous()
    _, tl_acc = _acc(logits.dtype)
    grad_logits = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
    has_grad_entropy = grad_entropy is not None
    if has_grad_entropy and entropy is None:
        raise ValueError("entropy: expected the saved entropy [N] when grad_entropy is given, got None")
    block_v, num_warps = _launch_config(vocab)
    _token_logprobs_bwd_kernel[(n,)](
        logits, logits.stride(0), targets, lse, entropy if has_grad_entropy else lse,
        lse if grad_logp is None else grad_logp, grad_entropy if has_grad_entropy else lse,
        grad_logits, grad_logits.stride(0), vocab, temperature, ignore_index,
        ACC_DTYPE=tl_acc, HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=has_grad_entropy,
        BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return grad_logits
