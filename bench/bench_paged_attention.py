"""Benchmark of paged_attention (caprl_core.sampler.attention): the Triton kernels and the batched PyTorch path on a
paged KV cache, against attention over a contiguous (unpaged) cache.

    .venv/bin/python -m pytest bench/bench_paged_attention.py --benchmark-only [--benchmark-json=out.json]

Shapes (GPU): "decode" - 64 sequences, one query row each, contexts uniform in [256, 1024]; "prefill" - 8 sequences of
512 new tokens after a cached 256-token prefix. Qwen2.5-like heads Hq 16, Hkv 2, D 128, bf16, pages of 16 tokens
scattered by a random permutation of the blocks. CPU machines run the same layouts scaled down (Hq 4, Hkv 2, D 64,
fp32, contexts in [64, 256]): what the engine's CPU path sees with the tiny test models.

Contenders:
- "triton": the kernels, called through the op with check_metadata=False (the engine checks the metadata once per
  step, not once per layer). Skipped on CPU: under TRITON_INTERPRET=1 its time measures the interpreter.
- "torch": paged_attention_torch with the gather index built outside the timing (the engine builds it once per step
  and reuses it across layers), i.e. gather K/V + one masked scaled_dot_product_attention.
- "sdpa_contiguous": F.scaled_dot_product_attention on K/V already laid out contiguously as [B, Hkv, S, D], padded
  to the longest context with a boolean mask, the Hq / Hkv query heads of a kv head folded into the query rows (so
  K/V are not repeated and no GQA support is needed): the cost without a paged cache, the baseline to match.
extra_info: the machine, the shape, and `gbps`: the bytes of K/V that attention must read (sum of the contexts x Hkv
x D x 2 tensors) plus q and out, over the median time - the unit for decode, which is bound by reading the cache.
Every contender's output is checked against the reference (outside the timing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from conftest import machine, synced

from caprl_core.sampler import attention, attention_torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = (16, 2, 128) if GPU else (4, 2, 64)
PAGE_SIZE = 16
DTYPE = torch.bfloat16 if GPU else torch.float32
CONTENDERS = ("triton", "torch", "sdpa_contiguous")
TOL = dict(atol=1e-2, rtol=1e-2) if GPU else dict(atol=1e-5, rtol=1e-5)  # bf16 output rounding / fp32 sum order


@dataclass
class Problem:
    args: tuple  # q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens
    max_seqlen_q: int
    dense_q: torch.Tensor  # [B, Hkv, G * M, D] the queries, the G heads of a kv head as rows
    dense_k: torch.Tensor  # [B, Hkv, S, D] the same keys, contiguous and padded
    dense_v: torch.Tensor
    dense_mask: torch.Tensor  # [B, 1, G * M, S]
    bytes_moved: int


def _seqs(shape: str) -> list[tuple[int, int]]:
    """(q_len, context_len) per sequence."""
    gen = torch.Generator().manual_seed(0)
    if shape == "decode":
        low, high, num_seqs = (256, 1024, 64) if GPU else (64, 256, 16)
        return [(1, int(c)) for c in torch.randint(low, high + 1, (num_seqs,), generator=gen)]
    prefix, new, num_seqs = (256, 512, 8) if GPU else (32, 64, 4)
    return [(new, prefix + new)] * num_seqs


@cache
def _problem(shape: str) -> Problem:
    seqs = _seqs(shape)
    gen = torch.Generator().manual_seed(1)
    blocks_per_seq = [math.ceil(c / PAGE_SIZE) for _, c in seqs]
    num_blocks = sum(blocks_per_seq)
    ids = torch.randperm(num_blocks, generator=gen).int()
    block_tables = torch.full((len(seqs), max(blocks_per_seq)), -1, dtype=torch.int32)
    offsets = torch.tensor([0, *blocks_per_seq]).cumsum(0).tolist()
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = ids[offsets[b] : offsets[b] + n]
    caches = torch.randn(2, num_blocks, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(DEVICE, DTYPE)
    q_lens = torch.tensor([q for q, _ in seqs])
    context_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32)
    q = torch.randn(int(q_lens.sum()), NUM_HEADS, HEAD_DIM, generator=gen).to(DEVICE, DTYPE)
    cu_seqlens_q = F.pad(q_lens.cumsum(0), (1, 0)).int()
    block_tables, cu_seqlens_q, context_lens = (x.to(DEVICE) for x in (block_tables, cu_seqlens_q, context_lens))
    slots = attention.build_gather_slots(block_tables, context_lens, PAGE_SIZE)  # [B, S]
    # [B, Hkv, S, D]; the slots past a context repeat the sequence's key 0, masked off
    dense_k, dense_v = (c.flatten(0, 1)[slots].transpose(1, 2).contiguous() for c in caches)
    # Every sequence of a shape has the same q_len M here, so q is [B, M, Hq, D] without padding.
    num_seqs, max_q, group = len(seqs), int(q_lens.max()), NUM_HEADS // NUM_KV_HEADS
    dense_q = q.view(num_seqs, max_q, NUM_KV_HEADS, group, HEAD_DIM).permute(0, 2, 3, 1, 4).reshape(
        num_seqs, NUM_KV_HEADS, group * max_q, HEAD_DIM
    )  # fmt: skip
    keys = torch.arange(slots.shape[1], device=DEVICE)  # [S]
    positions = (context_lens.long() - max_q)[:, None] + torch.arange(max_q, device=DEVICE)  # [B, M]
    mask = keys[None, None, :] <= positions[:, :, None]  # [B, M, S]
    dense_mask = mask[:, None].expand(-1, group, -1, -1).reshape(num_seqs, 1, group * max_q, -1)  # [B, 1, G * M, S]
    itemsize = caches.element_size()
    bytes_moved = (2 * int(context_lens.sum()) * NUM_KV_HEADS * HEAD_DIM + 2 * q.numel()) * itemsize
    args = (q, caches[0], caches[1], block_tables, cu_seqlens_q, context_lens)
    return Problem(args, max_q, dense_q, dense_k, dense_v, dense_mask, bytes_moved)


def _call(contender: str, pb: Problem):
    scale = HEAD_DIM**-0.5
    if contender == "triton":
        return lambda: attention.paged_attention(
            *pb.args, scale, pb.max_seqlen_q, backend="triton", check_metadata=False
        )
    if contender == "torch":
        slots = attention.build_gather_slots(pb.args[3], pb.args[5], PAGE_SIZE)
        return lambda: attention_torch.paged_attention_torch(*pb.args, scale, pb.max_seqlen_q, gather_slots=slots)
    num_seqs, group = pb.dense_q.shape[0], NUM_HEADS // NUM_KV_HEADS

    def sdpa() -> torch.Tensor:
        out = F.scaled_dot_product_attention(pb.dense_q, pb.dense_k, pb.dense_v, pb.dense_mask, scale=scale)
        out = out.view(num_seqs, NUM_KV_HEADS, group, pb.max_seqlen_q, HEAD_DIM).permute(0, 3, 1, 2, 4)
        return out.reshape(-1, NUM_HEADS, HEAD_DIM)  # [T, Hq, D]

    return sdpa


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("shape", ["decode", "prefill"])
def test_paged_attention(benchmark, shape: str, contender: str) -> None:
    if contender == "triton":
        if not GPU:
            pytest.skip("triton on CPU runs under the interpreter: its timing would measure the interpreter")
        why = attention._why_unavailable("triton", DEVICE, DTYPE, PAGE_SIZE, HEAD_DIM)
        if why is not None:
            pytest.skip(f"triton backend unavailable: {why}")
    pb = _problem(shape)
    run = synced(_call(contender, pb), DEVICE)
    expected = attention_torch.paged_attention_reference(*pb.args, HEAD_DIM**-0.5)
    torch.testing.assert_close(run().float(), expected.float(), **TOL)
    num_seqs = pb.args[5].shape[0]
    benchmark.extra_info.update(
        machine=machine(), device=str(DEVICE), contender=contender, shape=shape, dtype=str(DTYPE),
        num_seqs=num_seqs, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, page_size=PAGE_SIZE,
        max_seqlen_q=pb.max_seqlen_q, total_context=int(pb.args[5].sum()), bytes_moved=pb.bytes_moved,
    )  # fmt: skip
    benchmark(run)
    if benchmark.stats is not None:  # None under --benchmark-disable: one untimed call
        median = benchmark.stats.stats.median
        benchmark.extra_info["gbps"] = pb.bytes_moved / median / 1e9
        print(f"\npaged_attention {shape} {contender}: {median * 1e6:.1f} us, {pb.bytes_moved / median / 1e9:.1f} GB/s")
