"""`KeptPrefix`: a shared prefix's full KV blocks copied aside across a release (or a growth) of the engine's cache,
and put back into the next cache exactly where computing the prefix alone would leave them (`Engine.release_kv_cache`,
`Engine.prefill(shared_prefix=...)`). The reward reader's few-shot header, a few hundred tokens, is then computed once
per run instead of once per step, with the same bits, so results equal recomputing it.
"""

from __future__ import annotations

import torch

from caprl_core.sampler.block_manager import BlockManager


class KeptPrefix:
    """At most one prefix's blocks: `prefix` (token ids), `kv` [2, layers, blocks, block_size, kv_heads, head_dim]."""

    def __init__(self) -> None:
        self.prefix: list[int] | None = None
        self.kv: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() if self.kv is not None else 0

    def forget_unless(self, prefix: list[int] | None) -> None:
        """Drop what is kept unless it is `prefix`'s."""
        if self.prefix != prefix:
            self.prefix, self.kv = None, None

    def keep(self, prefix: list[int], kv_cache: torch.Tensor, block_manager: BlockManager) -> None:
        """Copy aside `prefix`'s full blocks from `kv_cache` if the prefix cache holds every one of them and no copy is
        kept yet (one kept and not copied back since is the computation alone)."""
        if self.prefix == prefix and self.kv is not None:
            return
        num_full = len(prefix) // block_manager.block_size
        blocks = block_manager.cached_prefix_blocks(prefix) if block_manager.prefix_caching else []
        if num_full == 0 or len(blocks) < num_full:
            return
        self.prefix, self.kv = prefix, kv_cache.index_select(2, torch.tensor(blocks, device=kv_cache.device))

    def restore(self, prefix: list[int], kv_cache: torch.Tensor, block_manager: BlockManager) -> list[int]:
        """On an empty block manager: put `prefix`'s kept blocks back into `kv_cache`, as computing it alone would
        leave them (`BlockManager.restore_prefix`); their ids, or [] when nothing of this prefix is kept."""
        if self.prefix != prefix or self.kv is None:
            return []
        blocks = block_manager.restore_prefix(prefix)
        if len(blocks) == self.kv.shape[2]:
            kv_cache.index_copy_(2, torch.tensor(blocks, device=self.kv.device), self.kv)
            self.prefix, self.kv = None, None  # in the cache now; a release copies it aside again
            return blocks
        block_manager.reset()  # no room for it: compute it
        return []
