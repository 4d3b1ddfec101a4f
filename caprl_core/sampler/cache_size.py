"""How big the engine's paged KV cache may be: a fixed size from the caller, or a share of the memory free now, and
how many blocks a call needs. The engine allocates the cache (caprl_core.sampler.engine); this module only counts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from caprl_core.sampler.sequence import Sequence


def fixed_blocks(num_kv_blocks, kv_cache_tokens, fraction, block_size: int) -> int | None:
    """The fixed cache size in blocks, or None when it follows need (the arguments checked: at most one given)."""
    given = [n for n, v in (("num_kv_blocks", num_kv_blocks), ("kv_cache_tokens", kv_cache_tokens),
                            ("kv_cache_memory_fraction", fraction)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise ValueError(f"give at most one of num_kv_blocks, kv_cache_tokens, kv_cache_memory_fraction, got {given}")
    if num_kv_blocks is not None:
        if not (isinstance(num_kv_blocks, int) and num_kv_blocks >= 1):
            raise ValueError(f"num_kv_blocks must be an integer >= 1, got {num_kv_blocks!r}")
        return num_kv_blocks
    if kv_cache_tokens is not None:
        if not (isinstance(kv_cache_tokens, int) and kv_cache_tokens >= 1):
            raise ValueError(f"kv_cache_tokens must be an integer >= 1, got {kv_cache_tokens!r}")
        return -(-kv_cache_tokens // block_size)
    if fraction is not None and not (0 < fraction <= 1):
        raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction!r}")
    return None


def free_bytes(device: torch.device) -> int:
    """Memory free on `device` now; on CUDA what the caching allocator holds unused counts as free, on CPU
    MemAvailable."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return mem_available_bytes()


def blocks_needed(seqs: list[Sequence], block_size: int, max_len: int) -> int:
    """Blocks for every sequence at its maximum length with nothing shared: enough never to preempt."""
    total = 0
    for seq in seqs:
        if seq.prefill_only:
            total += -(-len(seq) // block_size)
        else:
            total += seq.params.n * -(-min(len(seq) + seq.params.max_new_tokens, max_len) // block_size)
    return total


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; give kv_cache_tokens or num_kv_blocks")
