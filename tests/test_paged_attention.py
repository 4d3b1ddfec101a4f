"""Paged KV-cache attention (caprl_core.sampler.attention): store_kvcache and paged_attention on the "triton" and
"torch" backends against the per-sequence PyTorch reference, and the reference against dense causal attention.

Batches mix decode rows (q_len 1), prefills from scratch, prefills after a cached prefix and sequences with no query
row; block tables are random permutations of block ids padded with -1; the caches are layer views of one
[2, L, num_blocks, page_size, Hkv, D] tensor filled with NaN, so a read of any slot that holds no key of the context
(unused blocks, the tail of a sequence's last block, the other layer) turns the output into NaN and fails the test.
On CPU the Triton kernels run under the interpreter (tests/conftest.py), with shapes small enough for that.

Run: pytest tests/test_paged_attention.py [-k triton]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from caprl_core import backends
from caprl_core.sampler import attention, attention_torch

# fp32: the kernels sum exp2 / dot products in another order than the reference: a few ulp of O(1) outputs.
FP32 = dict(atol=1e-5, rtol=1e-5)
# Low precision: the output is rounded to the dtype (half an ulp: 3.9e-3 for bf16, 4.9e-4 for fp16 at |x| in [1, 2);
# measured max errors 7.8e-3 and 9.8e-4 at |x| ~ 2), and the probabilities are rounded to it before P @ V as
# flash-attention does (fp16 everywhere, bf16 on a GPU only: another ~ulp, averaged over the keys).
LOW_PRECISION = {torch.bfloat16: dict(atol=1e-2, rtol=1e-2), torch.float16: dict(atol=2e-3, rtol=2e-3)}
NUM_LAYERS = 2
MIXED = [
    (1, 13),
    (21, 21),
    (11, 37),
    (1, 1),
    (0, 6),
    (3, 17),
    (40, 70),
]  # (q_len, context_len): decode, prefill, prefix, ...
DECODE = [(1, 1), (1, 5), (1, 16), (1, 17), (1, 40)]


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, page_size, Hkv, D], a layer view of `cache`
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, -1 padded
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    keys: list[torch.Tensor]  # per sequence, the dense [context_len, Hkv, D] keys written into the cache
    values: list[torch.Tensor]
    cache: torch.Tensor  # [2, L, num_blocks, page_size, Hkv, D]

    def args(self) -> tuple:
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.cu_seqlens_q, self.context_lens


def make_batch(
    seqs: list[tuple[int, int]],
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    page_size: int = 4,
    dtype: torch.dtype = torch.float32,
    device: torch.device = DEVICE,
    seed: int = 0,
    layer: int = 1,
) -> Batch:
    """A batch of (q_len, context_len) sequences whose contexts sit in randomly permuted blocks of a NaN cache."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(context / page_size) for _, context in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    ids = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((len(seqs), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    shape = (2, NUM_LAYERS, num_blocks, page_size, num_kv_heads, head_dim)
    cache = torch.full(shape, float("nan"), dtype=dtype)
    keys, values, start = [], [], 0
    for b, (_, context) in enumerate(seqs):
        block_tables[b, : blocks_per_seq[b]] = ids[start : start + blocks_per_seq[b]]
        start += blocks_per_seq[b]
        k, v = (torch.randn(context, num_kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
        positions = torch.arange(context)
        blocks = block_tables[b, positions // page_size].long()
        cache[0, layer, blocks, positions % page_size] = k
        cache[1, layer, blocks, positions % page_size] = v
        keys.append(k.to(device))
        values.append(v.to(device))
    q_lens = torch.tensor([q_len for q_len, _ in seqs])
    q = torch.randn(int(q_lens.sum()), num_heads, head_dim, generator=gen).to(device, dtype)
    cu_seqlens_q = F.pad(q_lens.cumsum(0), (1, 0)).to(device, torch.int32)
    context_lens = torch.tensor([context for _, context in seqs], dtype=torch.int32, device=device)
    cache = cache.to(device)
    return Batch(q, cache[0, layer], cache[1, layer], block_tables.to(device), cu_seqlens_q, context_lens, keys,
                 values, cache)  # fmt: skip


@pytest.fixture(params=["triton", "torch"])
def attn_backend(request) -> str:
    """A backend that must run as asked: skipped with the reason when it cannot run here, never a fallback."""
    why = attention._why_unavailable(request.param, DEVICE, torch.float32, 4, 16)
    if why is not None:
        pytest.skip(f"{request.param} backend unavailable: {why}")
    return request.param


def run(backend: str, batch: Batch, scale: float = 0.25, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="caprl_core paged attention: backend")  # a fallback fails the test
        return attention.paged_attention(*batch.args(), scale, backend=backend, **kwargs)


def reference(batch: Batch, scale: float = 0.25) -> torch.Tensor:
    return attention_torch.paged_attention_reference(*batch.args(), scale)


# ------------------------------------------------------------------------------------- the reference, anchored
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (2, 2)])
def test_reference_matches_dense_causal_sdpa(device, num_heads, num_kv_heads):
    """Each sequence's rows equal the last q_len rows of dense causal attention over its whole context, computed by
    F.scaled_dot_product_attention(is_causal=True) on contiguous K/V (queries of the cached prefix made up)."""
    batch = make_batch(MIXED, num_heads, num_kv_heads, device=device, dtype=torch.float64)
    out = reference(batch)
    gen = torch.Generator().manual_seed(1)
    starts = batch.cu_seqlens_q.tolist()
    for b, (q_len, context) in enumerate(MIXED):
        prefix_q = torch.randn(context - q_len, num_heads, 16, generator=gen, dtype=torch.float64).to(device)
        full_q = torch.cat([prefix_q, batch.q[starts[b] : starts[b + 1]]])  # [context, Hq, D]
        dense = F.scaled_dot_product_attention(
            full_q.transpose(0, 1), batch.keys[b].transpose(0, 1), batch.values[b].transpose(0, 1),
            is_causal=True, scale=0.25, enable_gqa=True,
        ).transpose(0, 1)  # [context, Hq, D]  # fmt: skip
        torch.testing.assert_close(out[starts[b] : starts[b + 1]], dense[context - q_len :], atol=1e-12, rtol=1e-12)
    # The premise that makes this check bite: a prefix row attending to its new keys only would differ.
    third = slice(starts[2], starts[3])
    new_only = F.scaled_dot_product_attention(
        batch.q[third].transpose(0, 1), batch.keys[2][-11:].transpose(0, 1), batch.values[2][-11:].transpose(0, 1),
        is_causal=True, scale=0.25, enable_gqa=True,
    ).transpose(0, 1)  # fmt: skip
    assert (out[third] - new_only).abs().max() > 0.1


# ------------------------------------------------------------------------------------- paged_attention
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (2, 2)])
def test_mixed_batch_matches_reference(attn_backend, device, page_size, num_heads, num_kv_heads):
    batch = make_batch(MIXED, num_heads, num_kv_heads, page_size=page_size, device=device, seed=page_size)
    out = run(attn_backend, batch)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    torch.testing.assert_close(out, reference(batch), **FP32)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (8, 1), (2, 2), (32, 1)])  # 32: a group over 16 rows
def test_decode_batch_matches_reference(attn_backend, device, page_size, num_heads, num_kv_heads):
    """Every q_len == 1 with max_seqlen_q=1: the decode kernel / the torch decode path."""
    batch = make_batch(DECODE, num_heads, num_kv_heads, page_size=page_size, device=device, seed=10 + page_size)
    torch.testing.assert_close(run(attn_backend, batch, max_seqlen_q=1), reference(batch), **FP32)


def test_decode_with_idle_sequences(attn_backend, device):
    """max_seqlen_q=1 while some sequences have no query row this step (T < B)."""
    batch = make_batch([(1, 5), (0, 9), (1, 17), (0, 1)], page_size=4, device=device, seed=4)
    torch.testing.assert_close(run(attn_backend, batch, max_seqlen_q=1), reference(batch), **FP32)


def test_decode_rows_through_the_general_path(attn_backend, device):
    """max_seqlen_q=2 on a decode batch: the prefill kernel / padded torch path with one row per sequence."""
    batch = make_batch(DECODE, page_size=4, device=device, seed=3)
    torch.testing.assert_close(run(attn_backend, batch, max_seqlen_q=2), reference(batch), **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision(attn_backend, device, dtype):
    batch = make_batch(MIXED, 4, 2, page_size=4, dtype=dtype, device=device, seed=5)
    out = run(attn_backend, batch)
    assert out.dtype == dtype
    # The reference reads the same rounded inputs and computes in fp32: only the kernels' own rounding remains.
    torch.testing.assert_close(out.float(), reference(batch).float(), **LOW_PRECISION[dtype])


def test_head_dim_not_a_power_of_two(attn_backend, device):
    """D = 80 (masked up to 128 in the kernels)."""
    batch = make_batch(MIXED[:3], 4, 2, head_dim=80, page_size=4, device=device, seed=6)
    torch.testing.assert_close(run(attn_backend, batch, scale=80**-0.5), reference(batch, 80**-0.5), **FP32)


def test_strided_query(attn_backend, device):
    """q as the transpose of a [1, Hq, T, D] tensor (what a Hugging Face attention function receives)."""
    batch = make_batch(MIXED, page_size=4, device=device, seed=7)
    batch.q = batch.q.transpose(0, 1).contiguous().unsqueeze(0)[0].transpose(0, 1)  # [T, Hq, D] view, strides permuted
    assert not batch.q.is_contiguous()
    torch.testing.assert_close(run(attn_backend, batch), reference(batch), **FP32)


def test_no_query_rows(attn_backend, device):
    batch = make_batch([(0, 5), (0, 3)], device=device)
    assert run(attn_backend, batch).shape == (0, 4, 16)


def test_torch_path_reuses_a_precomputed_gather_index(device):
    """One `build_gather_slots` per step serves every layer: both layers of the cache, same metadata."""
    batch = make_batch(MIXED, page_size=4, device=device, layer=0)
    batch.cache[:, 1] = -2 * batch.cache[:, 0]  # layer 1: other K/V (NaN where layer 0 has no key) in the same slots
    slots = attention.build_gather_slots(batch.block_tables, batch.context_lens, page_size=4)
    assert slots.shape == (len(MIXED), 70) and slots.dtype == torch.int64
    outputs = []
    for layer in range(NUM_LAYERS):
        batch.k_cache, batch.v_cache = batch.cache[0, layer], batch.cache[1, layer]
        outputs.append(attention.paged_attention(*batch.args(), 0.25, backend="torch", gather_slots=slots))
        torch.testing.assert_close(outputs[-1], reference(batch), **FP32)
    assert (outputs[0] - outputs[1]).abs().max() > 0.1


@pytest.mark.gpu  # deselected (and counted as such) without CUDA: the interpreter would take minutes
@pytest.mark.parametrize("page_size", [16, 256])
def test_real_shapes_gpu(page_size):
    """Qwen2.5-like heads (Hq 16, Hkv 2, D 128) in bf16; 24 sequences of up to 900 tokens, decode and prefill."""
    gen = torch.Generator().manual_seed(0)
    contexts = torch.randint(1, 900, (24,), generator=gen).tolist()
    # every third sequence decodes, the others prefill q_len in [1, context] new tokens after a cached prefix
    q_lens = [1 if i % 3 == 0 else int(torch.randint(1, c + 1, (1,), generator=gen)) for i, c in enumerate(contexts)]
    batch = make_batch(list(zip(q_lens, contexts, strict=True)), 16, 2, 128, page_size, torch.bfloat16, DEVICE)
    out = run("triton", batch, scale=128**-0.5)
    torch.testing.assert_close(out.float(), reference(batch, 128**-0.5).float(), **LOW_PRECISION[torch.bfloat16])
    decode = make_batch([(1, c) for c in contexts], 16, 2, 128, page_size, torch.bfloat16, DEVICE)
    out = run("triton", decode, scale=128**-0.5, max_seqlen_q=1)
    torch.testing.assert_close(out.float(), reference(decode, 128**-0.5).float(), **LOW_PRECISION[torch.bfloat16])


# ------------------------------------------------------------------------------------- store_kvcache
@pytest.mark.parametrize("store_backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_store_kvcache(device, store_backend, page_size, dtype):
    """Tokens land in their slots; slot -1 and every other slot (and the other layer) keep their contents."""
    if store_backend == "triton" and attention._why_unavailable("triton", device, torch.float32, 4, 16):
        pytest.skip("triton backend unavailable here")
    gen = torch.Generator().manual_seed(page_size)
    num_blocks, num_kv_heads, head_dim, num_tokens = 9, 2, 8, 7
    cache = torch.randn(2, NUM_LAYERS, num_blocks, page_size, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    before = cache.clone()
    # key, value as the transpose of [1, Hkv, T, D]: non-contiguous [T, Hkv, D] views
    key, value = (
        torch.randn(1, num_kv_heads, num_tokens, head_dim, generator=gen).to(device, dtype)[0].transpose(0, 1)
        for _ in range(2)
    )
    slots = torch.randperm(num_blocks * page_size, generator=gen)[:num_tokens]
    slots[[1, 4]] = -1
    attention.store_kvcache(key, value, cache[0, 1], cache[1, 1], slots.to(device), backend=store_backend)
    expected = before.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[0, 1, slot // page_size, slot % page_size] = key[t]
            expected[1, 1, slot // page_size, slot % page_size] = value[t]
    assert torch.equal(cache, expected)
    assert int((cache != before).any(dim=(-1, -2)).sum()) == 2 * (num_tokens - 2)  # exactly the written slots moved


# ------------------------------------------------------------------------------------- dispatch and errors
def test_default_backend_by_device():
    assert attention.select_backend(torch.device("cpu"), torch.float32, 16, 128) == "torch"
    if torch.cuda.is_available():
        assert attention.select_backend(torch.device("cuda"), torch.bfloat16, 16, 128) == "triton"


def test_flash_attn_falls_back_with_one_warning(monkeypatch):
    """flash-attn 2 needs pages of a multiple of 256 (and CUDA, and the package): otherwise Triton, warned once."""
    monkeypatch.setattr(attention, "_warned", set())
    device = torch.device("cpu") if backends.triton_interpreter() else DEVICE
    with pytest.warns(UserWarning, match="'flash_attn' unavailable .* using 'triton'"):
        assert attention.select_backend(device, torch.bfloat16, 16, 128, "flash_attn") == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention.select_backend(device, torch.bfloat16, 16, 128, "flash_attn") == "triton"
    assert "multiple of 256" in attention._why_unavailable("flash_attn", torch.device("cuda"), torch.bfloat16, 16, 128)


def test_environment_variable_picks_the_backend(monkeypatch):
    monkeypatch.setenv(attention.ENV_VAR, "reference")
    assert attention.select_backend(torch.device("cpu"), torch.float32, 16, 128) == "reference"
    monkeypatch.setenv(attention.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=attention.ENV_VAR):
        attention.select_backend(torch.device("cpu"), torch.float32, 16, 128)


def _mutate(batch: Batch, field: str, value) -> tuple:
    args = dict(zip(("q", "k_cache", "v_cache", "block_tables", "cu_seqlens_q", "context_lens"), batch.args(),
                    strict=True))  # fmt: skip
    args[field] = value(args[field]) if callable(value) else value
    return tuple(args.values())


BAD_ATTENTION_INPUTS = [
    ("q", lambda q: q[0], "q: expected a 3-D"),
    ("q", lambda q: q.double(), "q: expected a dtype"),
    ("q", lambda q: q[:, :3], "q: expected a number of heads divisible"),
    ("q", lambda q: q[..., :8], "k_cache: expected head dim 8"),
    ("k_cache", lambda k: k.half(), "k_cache: expected dtype torch.float32"),
    ("v_cache", lambda v: v[:, :2].contiguous(), "v_cache: expected shape"),
    ("k_cache", lambda k: k.transpose(0, 1), "k_cache: expected a contiguous"),
    ("block_tables", lambda t: t.long(), "block_tables: expected dtype torch.int32"),
    ("cu_seqlens_q", lambda c: c[:-1], "cu_seqlens_q: expected shape"),
    ("context_lens", lambda c: c[:-1], "context_lens: expected shape"),
    ("context_lens", lambda c: c.to("meta"), "context_lens: expected device"),
    # metadata values (check_metadata=True)
    ("context_lens", lambda c: torch.where(c == 37, 10, c).int(), "context_lens: expected q_len <= context_len"),
    ("context_lens", lambda c: c + 100, "context_lens: expected q_len <= context_len <= "),
    ("cu_seqlens_q", lambda c: c.flip(0), "cu_seqlens_q: expected non-decreasing"),
    ("block_tables", lambda t: torch.where(t == t.max(), 10**6, t).int(), "block_tables: expected block ids"),
    ("block_tables", lambda t: torch.where(t == t[2, 0], -1, t).int(), "block_tables: expected block ids"),
]


@pytest.mark.parametrize("field,bad,match", BAD_ATTENTION_INPUTS)
def test_bad_attention_inputs_are_named(field, bad, match):
    batch = make_batch(MIXED, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=match):
        attention.paged_attention(*_mutate(batch, field, bad), 0.25)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(scale=0.0), "scale"), (dict(scale=float("nan")), "scale"), (dict(max_seqlen_q=-1), "max_seqlen_q"),
     (dict(max_seqlen_q=2), "max_seqlen_q: expected >= every query length"),
     (dict(gather_slots=torch.zeros(2, 3, dtype=torch.int64)), "gather_slots: expected an int64"),
     (dict(gather_slots=torch.zeros(len(MIXED), 69, dtype=torch.int64)), "gather_slots: expected >= 70 columns"),
     (dict(backend="cuda"), "backend")],
)  # fmt: skip
def test_bad_attention_options_are_named(kwargs, match):
    batch = make_batch(MIXED, device=torch.device("cpu"))
    kwargs = {"scale": 0.25, **kwargs}
    with pytest.raises(ValueError, match=match):
        attention.paged_attention(*batch.args(), **kwargs)


@pytest.mark.parametrize(
    "field,bad,match",
    [("key", lambda x: x.double(), "key: expected dtype"), ("value", lambda x: x[:, :1], "value: expected shape"),
     ("slot_mapping", lambda s: s[:-1], "slot_mapping: expected shape"),
     ("slot_mapping", lambda s: s.float(), "slot_mapping: expected an integer"),
     ("slot_mapping", lambda s: s + 1000, r"slot_mapping: expected values in \[0, 20\)"),
     ("k_cache", lambda k: k[..., :4].contiguous(), "v_cache: expected shape"),
     ("key", lambda x: x[..., :4], "key: expected shape")],
)  # fmt: skip
def test_bad_store_inputs_are_named(field, bad, match):
    cache = torch.zeros(2, 5, 4, 2, 8)
    args = dict(key=torch.randn(3, 2, 8), value=torch.randn(3, 2, 8), k_cache=cache[0], v_cache=cache[1],
                slot_mapping=torch.tensor([0, -1, 7]))  # fmt: skip
    args[field] = bad(args[field])
    with pytest.raises(ValueError, match=match):
        attention.store_kvcache(**args)


def test_torch_path_groups_uneven_prefills(device):
    """One long prefill among many short ones: the CPU path splits the batch into padding groups (else it pads every
    sequence to the longest query); the answer must not change, and the grouping must really happen."""
    seqs = [(300, 340)] + [(3 + i % 5, 300 + i) for i in range(24)] + [(1, 50), (1, 400)]
    assert len(attention_torch._padding_groups([q for q, _ in seqs], [c for _, c in seqs])) > 1
    batch = make_batch(seqs, page_size=4, device=device)
    torch.testing.assert_close(run("torch", batch), reference(batch), **FP32)
