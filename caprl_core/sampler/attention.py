"""Paged KV-cache attention for the sampler: write K/V of new tokens into cache slots, and attend over the cache.

The cache of one layer is `k_cache`, `v_cache` [num_blocks, page_size, Hkv, D], contiguous (a view such as
`cache[0, layer]` of a [2, L, num_blocks, page_size, Hkv, D] tensor is fine). Slot s is `(s // page_size,
s % page_size)`. Sequence b's key at position n lives in slot `block_tables[b, n // page_size] * page_size +
n % page_size`; table entries past its last block may be -1 and are never read.

    store_kvcache(key[T, Hkv, D], value[T, Hkv, D], k_cache, v_cache, slot_mapping[T]) -> None   (slot -1: skip)
    paged_attention(q[T, Hq, D], k_cache, v_cache, block_tables[B, max_blocks] i32, cu_seqlens_q[B + 1] i32,
                    context_lens[B] i32, scale, max_seqlen_q=None) -> out[T, Hq, D]

Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] (q_len_b of them, possibly 0); its row i is at
position context_lens[b] - q_len_b + i and attends causally to keys 0..position. One op covers decode (q_len 1),
prefill and prefill after a cached prefix; the step's own K/V are stored before attention runs. Query head h reads
kv head h // (Hq / Hkv). Softmax in fp32; the output has q's dtype (fp16, bf16 or fp32).

Implementations ("backend"): "triton" (kernels/paged_attention.py; the default for CUDA tensors), "flash_attn"
(optional: only when flash-attn imports and the page size is a multiple of 256, flash-attn 2's paged-KV rule,
Dao-AILab/flash-attention#828), "torch" (batched PyTorch, the default for CPU tensors) and "reference" (a
per-sequence loop, the definition the tests trust); the last two live in caprl_core.sampler.attention_torch.
`backend=` or the environment variable CAPRL_ATTENTION_BACKEND picks one; one that cannot run falls back
(flash_attn -> triton -> torch) with a single warning.

Arguments are checked on the host before any launch (ValueError naming the argument). The checks of the metadata's
values (query lengths vs context lengths, block ids in range, slots in range) read it back to the host: the engine
calls `check_paged_metadata` once per step and passes `check_metadata=False` to every layer's call, and likewise
builds the torch path's gather index once per step with `build_gather_slots` and passes it as `gather_slots`.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from caprl_core import _checks, backends
from caprl_core.sampler.attention_torch import (
    build_gather_slots,
    paged_attention_reference,
    paged_attention_torch,
    store_kvcache_reference,
    store_kvcache_torch,
)

__all__ = ["build_gather_slots", "check_paged_metadata", "paged_attention", "select_backend", "store_kvcache"]

BACKENDS = ("triton", "flash_attn", "torch", "reference")
ENV_VAR = "CAPRL_ATTENTION_BACKEND"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLASH_ATTN_PAGE_MULTIPLE = 256  # flash-attn 2 checks `page_block_size % 256 == 0` for a paged KV cache
_FALLBACK = {"flash_attn": "triton", "triton": "torch"}
_warned: set[tuple[str, str, str]] = set()


# ----------------------------------------------------------------------------------------------- checks
def _check_cache(k_cache: object, v_cache: object, dtype_of: tuple[str, torch.Tensor]) -> None:
    """Both caches 4-D, contiguous, of one shape, in the dtype of `dtype_of` (name, tensor)."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.floating(name, cache)
        _checks.ndim(name, cache, 4)
        _checks.same_dtype(name, cache, *dtype_of)
        if not cache.is_contiguous():
            layout = "a contiguous [num_blocks, page_size, Hkv, D] tensor"
            raise ValueError(f"{name}: expected {layout}, got strides {cache.stride()}")
    _checks.shape("v_cache", v_cache, k_cache.shape, "the shape of k_cache")


def _check_int32(name: str, x: object, ndim: int) -> torch.Tensor:
    x = _checks.tensor(name, x)
    _checks.ndim(name, x, ndim)
    if x.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32, got {x.dtype}")
    return x


def _check_store(key, value, k_cache, v_cache, slot_mapping) -> None:
    _check_cache(k_cache, v_cache, ("k_cache", k_cache))
    num_kv_heads, head_dim = k_cache.shape[2:]
    for name, x in (("key", key), ("value", value)):
        _checks.floating(name, x)
        _checks.ndim(name, x, 3)
        _checks.shape(name, x, (x.shape[0], num_kv_heads, head_dim), "[T, Hkv, D] of the cache")
        _checks.same_dtype(name, x, "k_cache", k_cache)
    _checks.shape("value", value, key.shape, "the shape of key")
    slot_mapping = _checks.integer("slot_mapping", slot_mapping)
    _checks.shape("slot_mapping", slot_mapping, (key.shape[0],), "one slot per token of key")
    names = ("k_cache", "v_cache", "key", "value", "slot_mapping")
    _checks.same_device(list(zip(names, (k_cache, v_cache, key, value, slot_mapping), strict=True)))


def _check_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_seqlen_q, gather_slots):
    _checks.floating("q", q)
    _checks.ndim("q", q, 3)
    if q.dtype not in DTYPES:
        raise ValueError(f"q: expected a dtype in {DTYPES}, got {q.dtype}")
    _check_cache(k_cache, v_cache, ("q", q))
    num_heads, head_dim = q.shape[1:]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: expected head dim {head_dim} (the last dim of q), got {k_cache.shape[3]}")
    if num_heads % k_cache.shape[2] != 0:
        what = f"a number of heads divisible by the {k_cache.shape[2]} kv heads of k_cache"
        raise ValueError(f"q: expected {what}, got {num_heads}")
    num_seqs = _check_int32("block_tables", block_tables, 2).shape[0]
    _checks.shape("context_lens", _check_int32("context_lens", context_lens, 1), (num_seqs,), "B = block_tables rows")
    _checks.shape("cu_seqlens_q", _check_int32("cu_seqlens_q", cu_seqlens_q, 1), (num_seqs + 1,), "B + 1")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
    if max_seqlen_q is not None and (type(max_seqlen_q) is not int or max_seqlen_q < 0):
        raise ValueError(f"max_seqlen_q: expected None or an int >= 0, got {max_seqlen_q!r}")
    names = ("q", "k_cache", "v_cache", "block_tables", "cu_seqlens_q", "context_lens")
    pairs = list(zip(names, (q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens), strict=True))
    if gather_slots is not None:
        _checks.tensor("gather_slots", gather_slots)
        _checks.ndim("gather_slots", gather_slots, 2)
        if gather_slots.dtype != torch.int64 or gather_slots.shape[0] != num_seqs:
            got = f"{gather_slots.dtype} {tuple(gather_slots.shape)}"
            raise ValueError(f"gather_slots: expected an int64 [B={num_seqs}, S] tensor, got {got}")
        pairs.append(("gather_slots", gather_slots))
    _checks.same_device(pairs)


def check_paged_metadata(
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    num_tokens: int,
    num_blocks: int,
    page_size: int,
    max_seqlen_q: int | None = None,
) -> None:
    """ValueError unless the step's metadata is consistent: cu_seqlens_q runs from 0 to num_tokens without going
    down, 0 <= q_len <= context_len <= what the block table covers, the blocks holding each context have ids in
    [0, num_blocks), and max_seqlen_q (if given) >= every q_len. Reads the metadata back to the host (a sync)."""
    tables, cu, contexts = block_tables.cpu().long(), cu_seqlens_q.cpu().long(), context_lens.cpu().long()
    q_lens = cu.diff()
    if int(cu[0]) != 0 or int(cu[-1]) != num_tokens or bool((q_lens < 0).any()):
        raise ValueError(f"cu_seqlens_q: expected non-decreasing offsets from 0 to T={num_tokens}, got {cu.tolist()}")
    capacity = tables.shape[1] * page_size
    for b in ((q_lens > contexts) | (contexts > capacity)).nonzero().flatten().tolist()[:1]:
        expected = f"q_len <= context_len <= {capacity} (block_tables width x page_size)"
        got = f"q_len {int(q_lens[b])}, context_len {int(contexts[b])} for sequence {b}"
        raise ValueError(f"context_lens: expected {expected}, got {got}")
    used = torch.arange(tables.shape[1]) < ((contexts + page_size - 1) // page_size)[:, None]  # [B, max_blocks]
    bad = used & ((tables < 0) | (tables >= num_blocks))
    if bool(bad.any()):
        b, j = bad.nonzero()[0].tolist()
        expected = f"block ids in [0, {num_blocks}) for the blocks holding a context"
        raise ValueError(f"block_tables: expected {expected}, got {int(tables[b, j])} at [{b}, {j}]")
    if max_seqlen_q is not None and q_lens.numel() and int(q_lens.max()) > max_seqlen_q:
        raise ValueError(f"max_seqlen_q: expected >= every query length, got {max_seqlen_q} < {int(q_lens.max())}")


# ----------------------------------------------------------------------------------------------- dispatch
def _why_unavailable(name: str, device: torch.device, dtype: torch.dtype, page_size: int, head_dim: int) -> str | None:
    if name == "flash_attn":
        if device.type != "cuda":
            return f"flash-attn needs CUDA tensors, got {device.type}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs fp16/bf16, got {dtype}"
        if page_size % FLASH_ATTN_PAGE_MULTIPLE != 0:
            return f"flash-attn 2 needs a page size that is a multiple of 256, got {page_size}"
        if head_dim % 8 != 0 or head_dim > 256:
            return f"flash-attn needs a head dim that is a multiple of 8 and at most 256, got {head_dim}"
        try:
            import flash_attn  # noqa: F401
        except Exception as e:  # ImportError, or a wheel built for another torch raising anything else
            return f"flash_attn does not import ({e})"
    if name == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and backends.triton_interpreter()):
            return f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
        if backends._triton_importable() is not None:
            return backends._triton_importable()
        from caprl_core.kernels.paged_attention import MAX_HEAD_DIM

        if head_dim > MAX_HEAD_DIM:
            return f"the Triton kernels support head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    return None


def select_backend(
    device: torch.device, dtype: torch.dtype, page_size: int, head_dim: int, backend: str | None = None
) -> str:
    """The backend that runs: `backend`, else $CAPRL_ATTENTION_BACKEND, else "triton" on CUDA and "torch" on CPU;
    one that cannot run these inputs falls back along flash_attn -> triton -> torch, warning once per reason."""
    requested = backend or os.environ.get(ENV_VAR) or None
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"{'backend' if backend else ENV_VAR}: expected one of {BACKENDS}, got {requested!r}")
    start = requested or ("triton" if device.type == "cuda" else "torch")
    name = start
    while (why := _why_unavailable(name, device, dtype, page_size, head_dim)) is not None:
        fallback = _FALLBACK[name]
        if (name, fallback, why) not in _warned:
            _warned.add((name, fallback, why))
            message = f"caprl_core paged attention: backend {name!r} unavailable ({why}); using {fallback!r}"
            warnings.warn(message, stacklevel=3)
        name = fallback
    return name


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str | None = None,
    check_metadata: bool = True,
) -> None:
    """Write key[t], value[t] [T, Hkv, D] (any strides) into slot slot_mapping[t] [T] (int32/int64; -1 = skip) of
    k_cache, v_cache [num_blocks, page_size, Hkv, D], in place. "flash_attn" stores with the Triton kernel (a plain
    scatter, flash-attn has none of its own). check_metadata: check the slots' range (a host sync)."""
    _check_store(key, value, k_cache, v_cache, slot_mapping)
    if check_metadata:
        _checks.index_range("slot_mapping", slot_mapping, k_cache.shape[0] * k_cache.shape[1], ignore=-1)
    if (backend or os.environ.get(ENV_VAR)) == "flash_attn":
        backend = "triton"
    name = select_backend(k_cache.device, k_cache.dtype, k_cache.shape[1], k_cache.shape[3], backend)
    if name == "triton":
        from caprl_core.kernels import paged_attention as kernels

        kernels.store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    elif name == "torch":
        store_kvcache_torch(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kvcache_reference(key, value, k_cache, v_cache, slot_mapping)


def _paged_attention_flash_attn(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_seqlen_q):
    """flash-attn 2 on the same cache layout: flash_attn_with_kvcache for decode, flash_attn_varlen_func (causal is
    bottom-right aligned there, as here) otherwise. Untested here: flash-attn has no wheel for the CI machines."""
    import flash_attn

    if max_seqlen_q == 1 and q.shape[0] == context_lens.shape[0]:
        kwargs = dict(cache_seqlens=context_lens, block_table=block_tables, softmax_scale=scale, causal=True)
        return flash_attn.flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, **kwargs).squeeze(1)
    cu_seqlens_k = F.pad(context_lens.cumsum(0, dtype=torch.int32), (1, 0))
    return flash_attn.flash_attn_varlen_func(
        q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, int(context_lens.max()),
        softmax_scale=scale, causal=True, block_table=block_tables,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
    backend: str | None = None,
    gather_slots: torch.Tensor | None = None,
    check_metadata: bool = True,
) -> torch.Tensor:
    """Causal attention of the packed queries q [T, Hq, D] over the paged cache -> out [T, Hq, D] (see the module
    docstring). max_seqlen_q: the longest query (computed from cu_seqlens_q, a host sync, when None); 1 selects the
    decode kernels. gather_slots: the torch backend's [B, S >= max(context_lens)] int64 gather index
    (`build_gather_slots`), ignored by the others. check_metadata: check the metadata's values first
    (`check_paged_metadata`, a host sync)."""
    _check_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_seqlen_q, gather_slots)
    num_blocks, page_size = k_cache.shape[:2]
    if check_metadata:
        check_paged_metadata(block_tables, cu_seqlens_q, context_lens, q.shape[0], num_blocks, page_size, max_seqlen_q)
        longest = int(context_lens.max()) if context_lens.numel() else 0
        if gather_slots is not None and gather_slots.shape[1] < longest:
            raise ValueError(
                f"gather_slots: expected >= {longest} columns (the longest context), got {gather_slots.shape[1]}"
            )
    name = select_backend(q.device, q.dtype, page_size, q.shape[2], backend)
    if name == "torch":
        metadata = (block_tables, cu_seqlens_q, context_lens)
        return paged_attention_torch(q, k_cache, v_cache, *metadata, scale, max_seqlen_q, gather_slots)
    if name == "reference":
        return paged_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if context_lens.numel() else 0
    if name == "flash_attn":
        metadata = (block_tables, cu_seqlens_q, context_lens)
        return _paged_attention_flash_attn(q, k_cache, v_cache, *metadata, scale, max_seqlen_q)
    from caprl_core.kernels import paged_attention as kernels

    q = q if q.stride(-1) == 1 else q.contiguous()  # the kernels read q rows with unit stride along D
    metadata = (block_tables, cu_seqlens_q, context_lens)
    return kernels.paged_attention(q, k_cache, v_cache, *metadata, float(scale), max_seqlen_q)
