"""The PyTorch implementations of paged attention (see caprl_core.sampler.attention for the contract): the
reference, a per-sequence loop that the tests trust, and the "torch" path, batched, the default for CPU tensors.
Neither checks its arguments: caprl_core.sampler.attention does, before dispatching here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------- reference
def store_kvcache_reference(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key[t], value[t] [Hkv, D] into slot slot_mapping[t], one token at a time; slot -1 leaves the cache alone."""
    page_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // page_size, slot % page_size] = key[token]
            v_cache[slot // page_size, slot % page_size] = value[token]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
) -> torch.Tensor:
    """The definition, one sequence at a time: gather its keys through the block table, repeat kv heads for GQA,
    mask causally aligned to the bottom right (row i at position context_len - q_len + i), softmax in fp32 (fp64 for
    fp64 inputs, which only the reference takes: the tests anchor it to dense attention in fp64). max_seqlen_q is
    accepted for a signature common to every backend, and unused."""
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    acc = torch.promote_types(q.dtype, torch.float32)
    starts = cu_seqlens_q.tolist()
    out = torch.zeros_like(q)
    for b, context_len in enumerate(context_lens.tolist()):
        rows = slice(starts[b], starts[b + 1])
        q_len = starts[b + 1] - starts[b]
        if q_len == 0:
            continue
        positions = torch.arange(context_len, device=q.device)  # [S]
        blocks = block_tables[b, positions // page_size].long()  # [S]
        k = k_cache[blocks, positions % page_size].repeat_interleave(group, dim=1).to(acc)  # [S, Hq, D]
        v = v_cache[blocks, positions % page_size].repeat_interleave(group, dim=1).to(acc)
        scores = torch.einsum("qhd,khd->hqk", q[rows].to(acc), k) * scale  # [Hq, q_len, S]
        q_positions = context_len - q_len + torch.arange(q_len, device=q.device)  # [q_len]
        causal = positions[None, :] <= q_positions[:, None]  # [q_len, S]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out[rows] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------- torch path
def store_kvcache_torch(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """store_kvcache as one indexed write per cache (the slots of one call are distinct, so the order is moot)."""
    page_size = k_cache.shape[1]
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep].long()
    k_cache[slots // page_size, slots % page_size] = key[keep]
    v_cache[slots // page_size, slots % page_size] = value[keep]


def build_gather_slots(
    block_tables: torch.Tensor, context_lens: torch.Tensor, page_size: int, max_context_len: int | None = None
) -> torch.Tensor:
    """[B, S] int64 cache slot of key n of sequence b for n < context_lens[b]; past the context, the slot of the
    sequence's key 0 (a slot that holds a written, finite key: an unwritten one may hold NaN, and a masked score
    still meets its V row in P @ V, 0 * NaN = NaN). S = max_context_len, by default max(context_lens). It depends
    only on the step's metadata, not on the layer: build it once per step and pass it to every layer's call."""
    if max_context_len is None:
        max_context_len = int(context_lens.max()) if context_lens.numel() else 0
    positions = torch.arange(max_context_len, device=block_tables.device)  # [S]
    columns = (positions // page_size).clamp(max=max(block_tables.shape[1] - 1, 0))
    slots = block_tables[:, columns].long() * page_size + positions % page_size  # [B, S]; garbage past the context
    first = torch.where(context_lens > 0, block_tables[:, 0].long() * page_size, 0)  # [B]; 0: no key, no row to serve
    return torch.where(positions[None, :] < context_lens[:, None], slots, first[:, None])


def _padding_groups(q_lens: list[int], context_lens: list[int], slack: float = 2.0) -> list[list[int]]:
    """Sequences grouped (by ascending q_len) so that padding each group to its longest query and context costs at
    most `slack` x its real query-key work (plus a little, so tiny groups merge). One padded batch over a prefill
    where one prompt has 700 new tokens and 200 others have 40 would otherwise do ~17x the work."""
    order = sorted(range(len(q_lens)), key=lambda b: (q_lens[b], context_lens[b]))
    groups: list[list[int]] = []
    group: list[int] = []
    real = max_q = max_ctx = 0
    for b in order:
        q, c = q_lens[b], context_lens[b]
        new_real, new_q, new_ctx = real + q * c, max(max_q, q), max(max_ctx, c)
        if group and (len(group) + 1) * new_q * new_ctx > slack * new_real + 4096:
            groups.append(group)
            group, new_real, new_q, new_ctx = [], q * c, q, c
        group.append(b)
        real, max_q, max_ctx = new_real, new_q, new_ctx
    if group:
        groups.append(group)
    return groups


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
    gather_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched PyTorch: gather every sequence's K/V padded to the longest context S with one index tensor
    (`gather_slots` [B, S] from `build_gather_slots`, built here when None), then one scaled_dot_product_attention
    call with a boolean mask. The Hq / Hkv query heads of a kv head are folded into the query rows, so K/V are never
    repeated for GQA. Decode (every q_len == 1) skips padding the queries: row b is sequence b."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = context_lens.shape[0], k_cache.shape[2]
    group = num_heads // num_kv_heads
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # [B]
    if max_seqlen_q is None:
        max_seqlen_q = int(q_lens.max()) if num_seqs else 0
    if num_tokens == 0 or max_seqlen_q == 0:
        return torch.zeros_like(q)
    if gather_slots is None:
        gather_slots = build_gather_slots(block_tables, context_lens, k_cache.shape[1])
    num_keys = gather_slots.shape[1]  # S
    keys = torch.arange(num_keys, device=q.device)  # [S]
    # index_select, not advanced indexing: 5-10x faster on CPU (measured: B 16, S 256, Hkv 2, D 64, fp32).
    k, v = (
        cache.flatten(0, 1).index_select(0, gather_slots.flatten()).view(num_seqs, num_keys, num_kv_heads, head_dim)
        for cache in (k_cache, v_cache)
    )  # [B, S, Hkv, D]
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, S, D]
    if max_seqlen_q == 1 and num_tokens == num_seqs:
        mask = (keys[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, S]
        out = F.scaled_dot_product_attention(
            q.reshape(num_seqs, num_kv_heads, group, head_dim), k, v, mask, scale=scale
        )
        return out.reshape(num_tokens, num_heads, head_dim)
    if q.device.type == "cpu" and num_seqs > 1:
        groups = _padding_groups(q_lens.tolist(), context_lens.tolist())
        if len(groups) > 1:
            return _paged_attention_grouped(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                            gather_slots, groups)  # fmt: skip
    rows = torch.arange(max_seqlen_q, device=q.device)  # [M]
    row_valid = (rows[None, :] < q_lens[:, None]).flatten()  # [B * M]
    tokens = (cu_seqlens_q[:-1, None] + rows).flatten().masked_fill_(~row_valid, 0)  # [B * M]; padding reads row 0
    # Padding rows sit past the context and see >= 1 key, so no row of the mask is all False (SDPA would give NaN).
    q_positions = (context_lens - q_lens)[:, None] + rows  # [B, M]
    mask = keys[None, None, :] <= q_positions[:, :, None]  # [B, M, S]
    shape5 = (num_seqs, max_seqlen_q, num_kv_heads, group, head_dim)
    q_pad = q.index_select(0, tokens).view(shape5).permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, -1, head_dim)
    mask = mask[:, None, None].expand(-1, -1, group, -1, -1).reshape(num_seqs, 1, -1, num_keys)  # [B, 1, G * M, S]
    out = F.scaled_dot_product_attention(q_pad, k, v, mask, scale=scale)  # [B, Hkv, G * M, D]
    out = out.view(num_seqs, num_kv_heads, group, max_seqlen_q, head_dim).permute(0, 3, 1, 2, 4)  # [B, M, Hkv, G, D]
    # The real rows, in (sequence, row) order, are tokens 0..T-1 in order (cu_seqlens_q runs from 0 to T).
    return out.reshape(-1, num_heads, head_dim).index_select(0, row_valid.nonzero().squeeze(1))  # [T, Hq, D]


def _paged_attention_grouped(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, gather_slots,
                             groups: list[list[int]]) -> torch.Tensor:  # fmt: skip
    """paged_attention_torch one padding group at a time (CPU prefill with very uneven query lengths)."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    starts, ends = cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()
    for group in groups:
        rows = torch.cat([torch.arange(starts[b], ends[b]) for b in group]).to(q.device)
        index = torch.tensor(group, device=q.device)
        lens = torch.tensor([ends[b] - starts[b] for b in group], dtype=cu_seqlens_q.dtype)
        cu = torch.zeros(len(group) + 1, dtype=cu_seqlens_q.dtype)
        cu[1:] = lens.cumsum(0)
        ctx = context_lens[index]
        width = int(ctx.max())
        slots = gather_slots[index, :width] if gather_slots is not None else None
        out[rows] = paged_attention_torch(
            q[rows], k_cache, v_cache, block_tables[index], cu.to(q.device), ctx, scale,
            max_seqlen_q=int(lens.max()), gather_slots=slots,
        )  # fmt: skip
    return out
