"""Triton kernels of the paged KV cache: `store_kvcache` (write K/V of new tokens into their slots) and
`paged_attention` (causal attention of packed query rows over the cache, through per-sequence block tables).

Contract (caprl_core/sampler/attention.py checks the arguments and defines the op in plain PyTorch):
    k_cache, v_cache: [num_blocks, PAGE_SIZE, Hkv, D], contiguous (possibly a view into a bigger cache tensor);
        key position n of sequence b sits in slot block_tables[b, n // PAGE_SIZE] * PAGE_SIZE + n % PAGE_SIZE.
    store_kvcache(key[T, Hkv, D], value[T, Hkv, D], k_cache, v_cache, slot_mapping[T]): slot -1 = skip the token.
    paged_attention(q[T, Hq, D], k_cache, v_cache, block_tables[B, max_blocks] i32, cu_seqlens_q[B + 1] i32,
        context_lens[B] i32, scale, max_seqlen_q) -> out[T, Hq, D]: query row i of sequence b (rows
        cu_seqlens_q[b]:cu_seqlens_q[b + 1], q_len_b of them) is at position context_lens[b] - q_len_b + i and attends
        to keys 0..position. Query head h reads kv head h // (Hq // Hkv). fp32 accumulation, output in q's dtype.

Design. Both attention kernels share one loop (`_attend`): a [BLOCK_M, D] tile of query rows, each with its own
absolute position, walks the keys in tiles of BLOCK_N positions with a flash-attention online softmax (running max
and sum, in base 2: the scale is folded with log2(e) so the loop uses exp2). Each key tile is gathered through the
block table one position at a time (block id = table[n // PAGE_SIZE]), so any page size works, 1 included, and a
tile may straddle pages; entries of the table past a sequence's last block (-1 padding) are never loaded.
- Prefill / general kernel: one program per (query head, tile of BLOCK_M query rows, sequence). The grid covers
  cdiv(max_seqlen_q, BLOCK_M) tiles for every sequence and programs past a sequence's q_len exit at once, so no
  host-side tile table (and no synchronisation) is needed. The key loop stops after the tile's last query position.
  Heads vary fastest in the grid so the Hq / Hkv heads that read the same K/V tiles run side by side (L2 reuse), and
  tiles run last-first: the tiles late in a prompt see the most keys, starting them first evens out the tail.
- Decode kernel (every q_len <= 1): one program per (kv head, sequence); its M rows are the Hq / Hkv query heads of
  that group (padded to tl.dot's minimum of 16), so each K/V tile is read once per group rather than once per head.
  Decode is bound by reading the cache: 2 * context * Hkv * D elements per sequence per layer.
Pointer offsets are int64 (blocks x block stride overflows int32 for caches over 2 G elements).

Under the Triton 3.9 interpreter tl.dot on bf16 operands is wrong (it multiplies bf16's raw uint16 bits, off by 1e10
on a 16 x 16 product; fp16 is exact; see also kernels/linear_token_logprobs.py), so there bf16 dot operands are upcast
to fp32: the CPU tests check bf16 loads, stores, indexing and softmax, and the rounding of P to bf16 before P @ V
only runs on a GPU (fp16 runs as on a GPU, P rounded to fp16).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from caprl_core import backends

MAX_HEAD_DIM = 256  # a [BLOCK_M, 256] fp32 accumulator per program is the most that stays in registers


@triton.jit
def _store_kvcache_kernel(
    Key_ptr, Value_ptr, K_cache_ptr, V_cache_ptr, Slot_ptr,
    key_stride_t, key_stride_h, key_stride_d, value_stride_t, value_stride_h, value_stride_d,
    cache_stride_block, cache_stride_slot, cache_stride_head, num_kv_heads, head_dim,
    PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """key[t], value[t] [Hkv, D] -> slot slot_mapping[t] of the caches; program t, nothing when the slot is < 0."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_kv_heads)[:, None] & (dims < head_dim)[None, :]  # [BH, BD]
    key = tl.load(Key_ptr + token * key_stride_t + heads[:, None] * key_stride_h + dims[None, :] * key_stride_d, mask)
    value = tl.load(
        Value_ptr + token * value_stride_t + heads[:, None] * value_stride_h + dims[None, :] * value_stride_d, mask
    )
    dst = (slot // PAGE_SIZE) * cache_stride_block + (slot % PAGE_SIZE) * cache_stride_slot
    dst = dst + heads[:, None] * cache_stride_head + dims[None, :]  # [BH, BD]
    tl.store(K_cache_ptr + dst, key, mask=mask)
    tl.store(V_cache_ptr + dst, value, mask=mask)


@triton.jit
def _attend(
    q, q_pos, n_end, Block_table_ptr, K_ptr, V_ptr, cache_stride_block, cache_stride_slot, dims, dim_mask,
    qk_scale, PAGE_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """softmax(q K^T * scale, causal) V for a query tile q [BM, BD] (DOT_DTYPE) whose row r sits at absolute position
    q_pos[r], over the keys 0..n_end-1 of one sequence and one kv head (K_ptr, V_ptr already point at that head).
    Returns the normalised [BM, BD] fp32 output. Every row must see at least one key (q_pos >= 0) to be meaningful;
    a row that sees none gets zeros, not NaN."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 scores
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m)  # noqa: E741
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # [BN] key positions
        key_mask = n < n_end
        block = tl.load(Block_table_ptr + n // PAGE_SIZE, mask=key_mask, other=0).to(tl.int64)
        rows = block * cache_stride_block + (n % PAGE_SIZE) * cache_stride_slot  # [BN] offsets of the keys' slots
        kv_mask = key_mask[:, None] & dim_mask[None, :]
        k = tl.load(K_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
        s = tl.where((n[None, :] <= q_pos[:, None]) & key_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row with no key yet keeps m = -inf; subtracting 0 instead keeps exp2(-inf - -inf) = NaN out.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)  # [BM] rescales what was summed against the old max
        p = tl.exp2(s - m_safe[:, None])  # [BM, BN], 0 where masked
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        v = tl.load(V_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m = m_new
    return acc / tl.where(l > 0, l, 1.0)[:, None]


@triton.jit
def _paged_prefill_kernel(
    Q_ptr, Out_ptr, K_cache_ptr, V_cache_ptr, Block_tables_ptr, Cu_seqlens_q_ptr, Context_lens_ptr,
    q_stride_t, q_stride_h, out_stride_t, out_stride_h, block_table_stride,
    cache_stride_block, cache_stride_slot, cache_stride_head, qk_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (query head, tile, sequence): out rows tile*BM .. tile*BM + BM - 1 of that sequence and head."""
    head = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # last tiles (most keys) first
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(Cu_seqlens_q_ptr + seq)
    q_len = tl.load(Cu_seqlens_q_ptr + seq + 1) - q_start
    i0 = tile * BLOCK_M
    if i0 >= q_len:  # the grid is sized for the longest query: this sequence has no rows here
        return
    context_len = tl.load(Context_lens_ptr + seq)
    i = i0 + tl.arange(0, BLOCK_M)  # [BM] query rows of this sequence
    row_mask = i < q_len
    q_pos = context_len - q_len + i  # [BM] absolute positions
    n_end = context_len - q_len + tl.minimum(i0 + BLOCK_M, q_len)  # keys after the tile's last query are masked
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM  # all True (and folded away) when D is a power of two
    tokens = (q_start + i).to(tl.int64)  # [BM] rows of q / out
    io_mask = row_mask[:, None] & dim_mask[None, :]
    q = tl.load(Q_ptr + tokens[:, None] * q_stride_t + head * q_stride_h + dims[None, :], mask=io_mask, other=0.0)
    kv_offset = (head // GROUP).to(tl.int64) * cache_stride_head
    out = _attend(
        q.to(DOT_DTYPE), q_pos, n_end, Block_tables_ptr + seq * block_table_stride, K_cache_ptr + kv_offset,
        V_cache_ptr + kv_offset, cache_stride_block, cache_stride_slot, dims, dim_mask, qk_scale,
        PAGE_SIZE, DOT_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # [BM, BD]  # fmt: skip
    out_ptrs = Out_ptr + tokens[:, None] * out_stride_t + head * out_stride_h + dims[None, :]
    tl.store(out_ptrs, out.to(Out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _paged_decode_kernel(
    Q_ptr, Out_ptr, K_cache_ptr, V_cache_ptr, Block_tables_ptr, Cu_seqlens_q_ptr, Context_lens_ptr,
    q_stride_t, q_stride_h, out_stride_t, out_stride_h, block_table_stride,
    cache_stride_block, cache_stride_slot, cache_stride_head, qk_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (kv head, sequence): the one query row of the sequence, for the GROUP query heads of this kv head."""
    kv_head = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    q_start = tl.load(Cu_seqlens_q_ptr + seq)
    if tl.load(Cu_seqlens_q_ptr + seq + 1) == q_start:  # a sequence with no query row this step
        return
    context_len = tl.load(Context_lens_ptr + seq)
    g = tl.arange(0, BLOCK_M)  # [BM] rows = query heads of the group
    heads = kv_head * GROUP + g
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM  # all True (and folded away) when D is a power of two
    io_mask = (g < GROUP)[:, None] & dim_mask[None, :]
    token = q_start.to(tl.int64)
    q = tl.load(Q_ptr + token * q_stride_t + heads[:, None] * q_stride_h + dims[None, :], mask=io_mask, other=0.0)
    q_pos = tl.zeros([BLOCK_M], tl.int32) + (context_len - 1)  # every row is the sequence's last position
    kv_offset = kv_head.to(tl.int64) * cache_stride_head
    out = _attend(
        q.to(DOT_DTYPE), q_pos, context_len, Block_tables_ptr + seq * block_table_stride, K_cache_ptr + kv_offset,
        V_cache_ptr + kv_offset, cache_stride_block, cache_stride_slot, dims, dim_mask, qk_scale,
        PAGE_SIZE, DOT_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # [BM, BD]  # fmt: skip
    out_ptrs = Out_ptr + token * out_stride_t + heads[:, None] * out_stride_h + dims[None, :]
    tl.store(out_ptrs, out.to(Out_ptr.dtype.element_ty), mask=io_mask)


def _dot_dtype(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """(tl.dot operand dtype, input_precision). fp32 uses "ieee": tf32 would round q and k to 10 mantissa bits
    (1e-3 relative error in the scores). bf16 goes in as fp32 under the interpreter (see the module docstring)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and backends.triton_interpreter()):
        return tl.float32, "ieee"
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), "tf32"


def _config(decode: bool, dtype: torch.dtype, group: int, head_dim: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages).

    GPU: compiled for sm_90 and checked with ptxas (registers, spills), not timed yet - starting points to tune on an
    H100. 16-bit prefill: the usual flash-attention 64 x 64 tile, 4 warps (~204 registers at D = 128, no spills);
    fp32 prefill: 32 x 32 on 8 warps (4 warps spill ~1 KB per thread at D >= 80: "ieee" dots hold more operands);
    BLOCK_N halves (and 16-bit prefill takes 8 warps) at D = 256. Decode rows are the heads of one group, at least
    16 (tl.dot's minimum); 80 registers at D = 128. 2 stages, so the gathered K/V loads of the next tile overlap the
    current one. Interpreter: 16 x 16 tiles, so that the short contexts of the tests cross several tiles and pages."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    decode_m = max(16, triton.next_power_of_2(group))  # one row per query head of the group
    if backends.triton_interpreter():
        return decode_m if decode else 16, 16, block_d, 4, 1
    wide = dtype != torch.float32
    halve = 2 if block_d > 128 else 1
    if decode:
        return decode_m, (64 if wide else 32) // halve, block_d, 4, 2
    if wide:
        return 64, 64 // halve, block_d, 4 * halve, 2
    return 32, 32 // halve, block_d, 8, 2


def store_kvcache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key, value [T, Hkv, D] (any strides) -> slots slot_mapping[T] (int32/int64, -1 = skip) of k_cache, v_cache
    [num_blocks, PAGE_SIZE, Hkv, D] (contiguous, same strides). Arguments are checked by the caller."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, *key.stride(), *value.stride(),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_kv_heads, head_dim,
        PAGE_SIZE=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
) -> torch.Tensor:
    """q [T, Hq, D] (unit stride along D), caches [num_blocks, PAGE_SIZE, Hkv, D] contiguous, block_tables [B, *],
    cu_seqlens_q [B + 1], context_lens [B] (int32) -> out [T, Hq, D] in q's dtype. Uses the decode kernel when
    max_seqlen_q == 1 (it must be >= every q_len). Arguments are checked by the caller; no host synchronisation."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    num_seqs = context_lens.shape[0]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    group = num_heads // num_kv_heads
    decode = max_seqlen_q == 1
    block_m, block_n, block_d, num_warps, num_stages = _config(decode, q.dtype, group, head_dim)
    dot_dtype, dot_precision = _dot_dtype(q.dtype)
    if decode:
        kernel, grid = _paged_decode_kernel, (num_kv_heads, num_seqs)
    else:
        kernel, grid = _paged_prefill_kernel, (num_heads, triton.cdiv(max_seqlen_q, block_m), num_seqs)
    kernel[grid](
        q, out, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), scale * math.log2(math.e),
        HEAD_DIM=head_dim, GROUP=group, PAGE_SIZE=k_cache.shape[1], DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
