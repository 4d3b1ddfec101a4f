"""Fixed-size KV blocks: free list, reference counts, prefix cache, forking.

Bookkeeping only (no torch): block ids index the engine's cache tensors, and the one operation that touches K/V
(copying the partial last block at a fork) is returned to the engine as (src, dst, num_tokens) to perform.

Prefix cache. Every full block gets a hash chained over all blocks before it (prefix hash + its token ids + the
digests of images overlapping it), so equal hashes mean equal prefixes. A block whose reference count drops to 0
goes back to the free list but keeps its hash and contents until it is handed out again; a later sequence with the
same prefix takes it back instead of recomputing it. Hashes are registered when a block is allocated, before its
K/V is computed: sequences in the same prefill batch can then share it, which is sound because every layer writes
the whole batch's K/V before any sequence attends. The last token of a sequence is never taken from the cache, as
its forward pass is what produces the next token's logits (or the prefill hidden state).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from caprl_core.sampler.sequence import Sequence


def block_hash(prefix_hash: int, token_ids: list[int], key: bytes) -> int:
    """64-bit hash of a full block given the hash of everything before it (-1 for the first block)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(prefix_hash.to_bytes(8, "little", signed=True))
    h.update(array("q", token_ids).tobytes())
    h.update(key)
    return int.from_bytes(h.digest(), "little", signed=True)


class BlockView(NamedTuple):
    """A read-only snapshot of one block's bookkeeping (for tests and debugging)."""

    block_id: int
    ref_count: int
    hash: int | None  # set once the block is full
    token_ids: tuple[int, ...]  # of a hashed block: checked on a hit, so a hash collision cannot alias KV


@dataclass
class _Plan:
    """What allocating a sequence would do: per block, its hash (None past the cacheable part) and a cached block
    to reuse (or None)."""

    hashes: list[int | None]
    hits: list[int | None]
    num_free_needed: int

    @property
    def num_cached_blocks(self) -> int:
        n = 0
        for hit in self.hits:
            if hit is None:
                break
            n += 1
        return n


class BlockManager:
    """`num_blocks` blocks of `block_size` token slots each. With prefix_caching=False no block is ever shared
    through the cache (forks still share their prompt's blocks).

    Every operation costs what it touches, whatever `num_blocks` is. Blocks are handed out in order: first the
    never-used ones (ids `num_used_ever`.. upward, implicit: nothing is stored for them), then freed ones, oldest
    first (an ordered dict, so a prefix hit takes its block out of the free list in O(1)). Per-block state (reference
    count, hash, tokens) lives in lists that grow with the ids used so far, so `reset` is O(blocks used since the last
    reset). Before this, reset rebuilt a Python object per block (0.26-0.46 s for the 297,870-block default cache of
    the tiny models, twice a training step) and a prefix hit scanned the free deque (issue 15).
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.hash_to_block: dict[int, int] = {}
        self._ref_counts: list[int] = []  # [num_used_ever], by block id
        self._hashes: list[int | None] = []
        self._tokens: list[tuple[int, ...]] = []
        self._freed: OrderedDict[int, None] = OrderedDict()  # used blocks back in the free list, oldest first

    @property
    def num_used_ever(self) -> int:
        """Blocks handed out at least once since the last reset (ids 0 .. num_used_ever - 1)."""
        return len(self._ref_counts)

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used_ever + len(self._freed)

    @property
    def free_ids(self) -> list[int]:
        """The free list in hand-out order (O(num_blocks): for tests and debugging)."""
        return [*range(self.num_used_ever, self.num_blocks), *self._freed]

    @property
    def blocks(self) -> _BlockList:
        """Read-only per-block state: `blocks[i]` is a `BlockView` (for tests and debugging)."""
        return _BlockList(self)

    def block(self, block_id: int) -> BlockView:
        if block_id < self.num_used_ever:
            i = block_id
            return BlockView(i, self._ref_counts[i], self._hashes[i], self._tokens[i])
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block_id {block_id} not in [0, {self.num_blocks})")
        return BlockView(block_id, 0, None, ())

    # --- allocation -------------------------------------------------------------------------------------------

    def plan(self, seq: Sequence) -> _Plan:
        """What allocating `seq` now would take: pass it to `can_allocate` / `allocate` (one hashing pass)."""
        return self._plan(seq)

    def _plan(self, seq: Sequence) -> _Plan:
        bs, n = self.block_size, seq.num_blocks(self.block_size)
        # Only full blocks that end before the last token may come from the cache (module docstring).
        cacheable = (len(seq) - 1) // bs if self.prefix_caching else 0
        hashes: list[int | None] = []
        hits: list[int | None] = []
        prefix, missed, needed = -1, False, 0
        for i in range(n):
            tokens = seq.block_tokens(i, bs)
            h = block_hash(prefix, tokens, seq.block_key(i, bs)) if len(tokens) == bs else None
            hit = None
            if i < cacheable and not missed and h is not None:
                bid = self.hash_to_block.get(h)
                if bid is not None and self._tokens[bid] == tuple(tokens):
                    hit = bid
            missed = missed or hit is None
            if hit is None or self._ref_counts[hit] == 0:
                needed += 1  # a fresh block, or a cached one that must leave the free list
            hashes.append(h)
            hits.append(hit)
            prefix = h if h is not None else prefix
        return _Plan(hashes, hits, needed)

    def num_cached_tokens(self, seq: Sequence, plan: _Plan | None = None) -> int:
        """How many leading tokens of `seq` a prefill now would take from the cache."""
        return (plan or self._plan(seq)).num_cached_blocks * self.block_size

    def can_allocate(self, seq: Sequence, reserve: int = 0, plan: _Plan | None = None) -> bool:
        """Whether `seq` fits with `reserve` more free blocks left over (for the copies a fork will make)."""
        return (plan or self._plan(seq)).num_free_needed + reserve <= self.num_free

    def allocate(self, seq: Sequence, plan: _Plan | None = None) -> int:
        """Give `seq` its block table (prefix-cache hits first); returns the number of cached tokens. `plan` must
        come from `plan(seq)` with nothing allocated or freed since."""
        assert not seq.block_table, f"sequence {seq.seq_id} already has blocks"
        plan = plan or self._plan(seq)
        if plan.num_free_needed > self.num_free:
            raise RuntimeError("BlockManager.allocate without can_allocate: out of blocks")
        refs = self._ref_counts
        for i, (h, hit) in enumerate(zip(plan.hashes, plan.hits, strict=True)):
            if hit is not None:
                if refs[hit] == 0:
                    del self._freed[hit]
                refs[hit] += 1
                bid = hit
            else:
                bid = self._take_free()
                if h is not None:
                    self._register(bid, h, seq.block_tokens(i, self.block_size))
            seq.block_table.append(bid)
        seq.num_cached_tokens = plan.num_cached_blocks * self.block_size
        return seq.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks that nobody uses go back to the free list (keeping their hash)."""
        refs = self._ref_counts
        for bid in reversed(seq.block_table):
            refs[bid] -= 1
            assert refs[bid] >= 0, f"block {bid} freed twice"
            if refs[bid] == 0:
                self._freed[bid] = None
        seq.block_table = []
        seq.num_cached_tokens = 0

    # --- decode -----------------------------------------------------------------------------------------------

    def needs_block(self, seq: Sequence) -> bool:
        """Whether writing `seq`'s last token needs a new block."""
        return len(seq.block_table) < seq.num_blocks(self.block_size)

    def can_append(self, seq: Sequence) -> bool:
        return not self.needs_block(seq) or self.num_free >= 1

    def append_slot(self, seq: Sequence) -> None:
        """Make room for `seq`'s last token (whose K/V this step writes); hash the block it completes."""
        if self.needs_block(seq):
            seq.block_table.append(self._take_free())
        bs = self.block_size
        if len(seq) % bs == 0:
            i = len(seq) // bs - 1
            prefix = self._hashes[seq.block_table[i - 1]] if i > 0 else -1
            if prefix is not None:  # the chain is unbroken (always, unless a shared block was never hashed)
                tokens = seq.block_tokens(i, bs)
                h = block_hash(prefix, tokens, seq.block_key(i, bs))
                self._register(seq.block_table[i], h, tokens)

    # --- forking ----------------------------------------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int, int] | None:
        """Share `parent`'s full blocks with `child`; give it a copy of the partial last block.

        Returns (src_block, dst_block, num_tokens) for the engine to copy K/V, or None when there is no partial block.
        """
        assert not child.block_table
        bs = self.block_size
        num_full = len(parent) // bs
        for bid in parent.block_table[:num_full]:
            self._ref_counts[bid] += 1
            child.block_table.append(bid)
        child.num_cached_tokens = parent.num_cached_tokens
        partial = len(parent) - num_full * bs
        if partial == 0:
            return None
        bid = self._take_free()
        child.block_table.append(bid)
        return parent.block_table[num_full], bid, partial

    # --- keeping one prefix across calls -----------------------------------------------------------------------

    def cached_prefix_blocks(self, token_ids: list[int]) -> list[int]:
        """Ids of the leading full blocks of the text prefix `token_ids` that the prefix cache holds, in order."""
        bs, prefix, out = self.block_size, -1, []
        for i in range(len(token_ids) // bs):
            tokens = token_ids[i * bs : (i + 1) * bs]
            h = block_hash(prefix, tokens, b"")
            bid = self.hash_to_block.get(h)
            if bid is None or self._tokens[bid] != tuple(tokens):
                break
            out.append(bid)
            prefix = h
        return out

    def restore_prefix(self, token_ids: list[int]) -> list[int]:
        """Leave the blocks as a prefill of the text prompt `token_ids` alone, on an empty manager, leaves them:
        ceil(len / block_size) fresh blocks, the full ones registered in the prefix cache, all freed last block
        first. Returns the full blocks' ids, in order: the caller writes their K/V (saved from an earlier cache of the
        same prefix) before the next step; the partial block is never read (it has no hash). The same state as the
        computing path, so the next allocations take the same blocks. Nothing is done with prefix caching off, or
        when fewer blocks are free than the prefix takes."""
        bs, prefix, out = self.block_size, -1, []
        if not self.prefix_caching or -(-len(token_ids) // bs) > self.num_free:
            return out
        for i in range(-(-len(token_ids) // bs)):
            tokens = token_ids[i * bs : (i + 1) * bs]
            bid = self._take_free()
            if len(tokens) == bs:
                prefix = block_hash(prefix, tokens, b"")
                self._register(bid, prefix, tokens)
            out.append(bid)
        for bid in reversed(out):  # as `free` releases a sequence's blocks
            self._ref_counts[bid] = 0
            self._freed[bid] = None
        return out[: len(token_ids) // bs]

    def forget_cached(self, keep: Collection[int] = ()) -> None:
        """Forget the contents of every free block except those in `keep`: prefix lookups no longer find them.
        Blocks in use keep their hashes. O(blocks used since the last reset)."""
        keep = set(keep)
        for bid in self._freed:
            h = self._hashes[bid]
            if h is None or bid in keep:
                continue
            if self.hash_to_block.get(h) == bid:
                del self.hash_to_block[h]
            self._hashes[bid], self._tokens[bid] = None, ()

    # --- internals --------------------------------------------------------------------------------------------

    def _take_free(self) -> int:
        """A free block id with reference count 1 and no hash: a never-used one if any, else the oldest freed."""
        if self.num_used_ever < self.num_blocks:
            self._ref_counts.append(1)
            self._hashes.append(None)
            self._tokens.append(())
            return self.num_used_ever - 1
        if not self._freed:
            raise RuntimeError("out of KV blocks (the scheduler must check before allocating)")
        bid, _ = self._freed.popitem(last=False)
        assert self._ref_counts[bid] == 0
        h = self._hashes[bid]
        if h is not None and self.hash_to_block.get(h) == bid:
            del self.hash_to_block[h]  # its old contents are about to be overwritten
        self._hashes[bid], self._tokens[bid] = None, ()
        self._ref_counts[bid] = 1
        return bid

    def _register(self, bid: int, h: int, tokens: list[int]) -> None:
        if not self.prefix_caching:
            return
        self._hashes[bid], self._tokens[bid] = h, tuple(tokens)
        self.hash_to_block[h] = bid

    def reset(self, num_blocks: int | None = None) -> None:
        """Forget everything (after a failed step, the cache contents cannot be trusted), optionally with a new pool
        size. O(blocks used since the last reset), not O(num_blocks)."""
        if num_blocks is not None:
            if not (isinstance(num_blocks, int) and num_blocks >= 1):
                raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
            self.num_blocks = num_blocks
        self.hash_to_block.clear()
        self._ref_counts.clear()
        self._hashes.clear()
        self._tokens.clear()
        self._freed.clear()


class _BlockList:
    """`BlockManager.blocks`: indexable and iterable like the list of blocks, built on demand."""

    def __init__(self, manager: BlockManager) -> None:
        self._manager = manager

    def __len__(self) -> int:
        return self._manager.num_blocks

    def __getitem__(self, block_id: int) -> BlockView:
        return self._manager.block(block_id)

    def __iter__(self) -> Iterator[BlockView]:
        return (self._manager.block(i) for i in range(self._manager.num_blocks))
