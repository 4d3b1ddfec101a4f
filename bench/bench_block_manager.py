"""Block-manager bookkeeping cost against pool size: the same use at 1k, 100k and 1M blocks should cost the same.

    .venv/bin/python -m pytest bench/bench_block_manager.py --benchmark-only -s [--benchmark-json=out.json]

Use per round: 64 sequences of 104 tokens (block size 16: 4 full blocks of a prefix every sequence shares, 2 full
blocks of its own, 1 partial block), shaped like a reader call's prompts. Timed, one operation per round:
- "allocate": the 64 sequences, after a previous round freed the same shared prefix (its 4 blocks are prefix-cache
  hits on free blocks: they leave the free list) and with their own blocks new;
- "free": the 64 sequences, every block back to the free list;
- "reset": forget everything after one round of allocate + free (what `Engine.free_kv_cache()` does).
Run the same file against an older checkout (PYTHONPATH=<checkout>) to compare.
"""

from __future__ import annotations

import itertools

import pytest
from conftest import machine

from caprl_core.sampler.block_manager import BlockManager
from caprl_core.sampler.sequence import SamplingParams, Sequence

BLOCK_SIZE, NUM_SEQS, SHARED, OWN = 16, 64, 64, 40
_fresh = itertools.count(10_000)  # token ids never seen before: each round's own blocks are new


def _sequences() -> list[Sequence]:
    shared = list(range(SHARED))
    return [Sequence(i, shared + [next(_fresh) for _ in range(OWN)], SamplingParams()) for i in range(NUM_SEQS)]


def _allocate_all(bm: BlockManager, seqs: list[Sequence]) -> None:
    for seq in seqs:
        bm.allocate(seq)


def _free_all(bm: BlockManager, seqs: list[Sequence]) -> None:
    for seq in seqs:
        bm.free(seq)


def _used(bm: BlockManager) -> BlockManager:
    """bm after one round of use: the shared prefix and 64 sequences' own blocks cached in the free list."""
    bm.reset()
    seqs = _sequences()
    _allocate_all(bm, seqs)
    _free_all(bm, seqs)
    return bm


@pytest.mark.parametrize("op", ["allocate", "free", "reset"])
@pytest.mark.parametrize("num_blocks", [1_000, 100_000, 1_000_000])
def test_block_manager_cost_vs_pool_size(benchmark, num_blocks: int, op: str) -> None:
    bm = BlockManager(num_blocks, BLOCK_SIZE)
    if op == "allocate":

        def setup():
            _used(bm)
            return (bm, _sequences()), {}

        target = _allocate_all
    elif op == "free":

        def setup():
            seqs = _sequences()
            _allocate_all(_used(bm), seqs)
            return (bm, seqs), {}

        target = _free_all
    else:

        def setup():
            return (_used(bm),), {}

        target = BlockManager.reset
    benchmark.pedantic(target, setup=setup, rounds=7, iterations=1)
    blocks = NUM_SEQS * (-(-(SHARED + OWN) // BLOCK_SIZE))
    median_us = benchmark.stats.stats.median * 1e6
    benchmark.extra_info.update({"machine": machine(), "median_us": median_us, "block_refs_per_round": blocks})
    print(f"\n{op} at {num_blocks} blocks: {median_us:.0f} us per round ({blocks} block references)")
