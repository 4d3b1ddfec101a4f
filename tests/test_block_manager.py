"""BlockManager: allocation counts, the prefix cache (chained hashes, last token never cached, freed blocks kept until
reused, image digests), decode appends, forks, frees, and a randomized run that checks the invariants after every
operation. Pure bookkeeping: no model, no torch."""

from __future__ import annotations

import random

import pytest

from caprl_core.sampler import block_manager
from caprl_core.sampler.block_manager import BlockManager, block_hash
from caprl_core.sampler.sequence import ImageSpan, MultimodalPrompt, SamplingParams, Sequence

BS = 4  # block size of most tests: small enough to write prompts out by hand


def make_seq(seq_id: int, tokens: list[int], mm: MultimodalPrompt | None = None) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams(), mm=mm)


def chain_hashes(seq: Sequence, block_size: int) -> list[int]:
    """Expected hash of every full block of `seq`, computed from its tokens alone."""
    hashes, prefix = [], -1
    for i in range(len(seq) // block_size):
        prefix = block_hash(prefix, seq.block_tokens(i, block_size), seq.block_key(i, block_size))
        hashes.append(prefix)
    return hashes


def image_prompt(digest: bytes, start: int, end: int) -> MultimodalPrompt:
    return MultimodalPrompt(None, None, None, 0, [ImageSpan(start, end, digest)])


# --- allocation -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, blocks", [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (10, 3), (12, 3)])
def test_allocate_takes_ceil_len_over_block_size_blocks(length, blocks):
    bm = BlockManager(10, BS)
    seq = make_seq(1, list(range(100, 100 + length)))
    assert bm.allocate(seq) == 0
    assert len(seq.block_table) == blocks
    assert len(set(seq.block_table)) == blocks
    assert bm.num_free == 10 - blocks
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    # Every full block is hashed with the chained hash of its tokens; a partial one is not.
    full = length // BS
    assert [bm.blocks[b].hash for b in seq.block_table[:full]] == chain_hashes(seq, BS)
    assert all(bm.blocks[b].hash is None for b in seq.block_table[full:])


def test_allocate_without_room_raises_and_changes_nothing():
    bm = BlockManager(2, BS)
    seq = make_seq(1, list(range(9)))  # 3 blocks
    assert not bm.can_allocate(seq)
    with pytest.raises(RuntimeError):
        bm.allocate(seq)
    assert bm.num_free == 2 and seq.block_table == []


def test_can_allocate_with_reserve():
    bm = BlockManager(4, BS)
    seq = make_seq(1, list(range(6)))  # 2 blocks
    assert bm.can_allocate(seq, reserve=2)
    assert not bm.can_allocate(seq, reserve=3)


def test_can_allocate_counts_cached_free_blocks_as_needed_but_not_live_ones():
    tokens = list(range(9))  # blocks: full, full, partial
    bm = BlockManager(3, BS)
    a = make_seq(1, tokens)
    bm.allocate(a)
    bm.free(a)
    # Two cached blocks sit in the free list: taking them back still uses free-list entries, so all 3 are needed.
    b = make_seq(2, tokens)
    assert bm.num_cached_tokens(b) == 8
    assert bm.can_allocate(b, reserve=0)
    assert not bm.can_allocate(b, reserve=1)
    # With the cached blocks held by a live sequence, a sharer needs only its fresh last block.
    bm = BlockManager(4, BS)
    bm.allocate(make_seq(1, tokens))
    c = make_seq(2, tokens[:8] + [77])
    assert bm.num_free == 1
    assert bm.can_allocate(c, reserve=0)
    assert not bm.can_allocate(c, reserve=1)


def test_a_hash_collision_never_aliases_blocks(monkeypatch):
    monkeypatch.setattr(block_manager, "block_hash", lambda prefix, tokens, key: 42)  # every block collides
    bm = BlockManager(8, BS)
    a = make_seq(1, list(range(9)))
    bm.allocate(a)
    b = make_seq(2, list(range(100, 109)))
    assert bm.allocate(b) == 0
    assert not set(a.block_table) & set(b.block_table)


# --- prefix cache -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_second_sequence_reuses_first_k_full_blocks(k):
    bm = BlockManager(16, BS)
    a = make_seq(1, list(range(13)))  # 3 full blocks + 1 token
    bm.allocate(a)
    b = make_seq(2, a.token_ids[: k * BS] + [900, 901, 902, 903, 904])
    free_before = bm.num_free
    assert bm.num_cached_tokens(b) == k * BS
    assert bm.allocate(b) == k * BS
    assert b.num_cached_tokens == k * BS
    assert b.block_table[:k] == a.block_table[:k]
    assert all(bm.blocks[x].ref_count == 2 for x in a.block_table[:k])
    assert not set(b.block_table[k:]) & set(a.block_table)
    assert all(bm.blocks[x].ref_count == 1 for x in b.block_table[k:])
    assert bm.num_free == free_before - (len(b.block_table) - k)


def test_prefix_hit_stops_at_first_differing_block():
    bm = BlockManager(16, BS)
    a = make_seq(1, list(range(13)))
    bm.allocate(a)
    tokens = list(a.token_ids)
    tokens[5] = 555  # block 1 differs, block 2 is equal but its prefix is not
    b = make_seq(2, tokens)
    assert bm.allocate(b) == BS
    assert b.block_table[0] == a.block_table[0]
    assert not set(b.block_table[1:]) & set(a.block_table)


@pytest.mark.parametrize("block_size, length", [(4, 12), (4, 13), (4, 1), (1, 5), (3, 9)])
def test_fully_cached_prompt_still_computes_its_last_token(block_size, length):
    bm = BlockManager(32, block_size)
    tokens = list(range(50, 50 + length))
    a = make_seq(1, tokens)
    bm.allocate(a)
    b = make_seq(2, tokens)
    cached = bm.allocate(b)
    assert cached <= length - 1
    assert cached == (length - 1) // block_size * block_size
    last = (length - 1) // block_size  # the block holding the last token is never shared
    assert b.block_table[last] != a.block_table[last]
    assert b.block_table[:last] == a.block_table[:last]


def test_freed_blocks_keep_their_hash_and_are_reused_after_the_owner_finished():
    bm = BlockManager(8, BS)
    a = make_seq(1, list(range(10)))  # 2 full blocks + 2 tokens
    bm.allocate(a)
    table = list(a.block_table)
    hashes = [bm.blocks[x].hash for x in table[:2]]
    bm.free(a)
    assert a.block_table == [] and bm.num_free == 8
    assert all(bm.blocks[x].ref_count == 0 for x in table)
    assert [bm.blocks[x].hash for x in table[:2]] == hashes
    assert [bm.hash_to_block[h] for h in hashes] == table[:2]
    b = make_seq(2, list(range(8)) + [70, 71, 72])
    assert bm.allocate(b) == 8
    assert b.block_table[:2] == table[:2]
    assert all(bm.blocks[x].ref_count == 1 for x in table[:2])
    assert not set(table[:2]) & set(bm.free_ids)  # taken back out of the free list
    assert bm.num_free == 8 - 3


def test_freed_block_reallocated_for_other_content_no_longer_hits():
    bm = BlockManager(5, BS)
    tokens = list(range(13))  # 3 full blocks + 1 token
    a = make_seq(1, tokens)
    bm.allocate(a)
    full = list(a.block_table[:3])
    old_hashes = [bm.blocks[x].hash for x in full]
    bm.free(a)
    # Free list is now [4, a's blocks in reverse]: 3 fresh blocks for c take 4, a's partial block and a's block 2.
    c = make_seq(2, [1000 + t for t in range(9)])
    bm.allocate(c)
    assert full[2] in c.block_table and not {full[0], full[1]} & set(c.block_table)
    assert old_hashes[2] not in bm.hash_to_block
    assert bm.hash_to_block[old_hashes[0]] == full[0] and bm.hash_to_block[old_hashes[1]] == full[1]
    bm.free(c)
    b = make_seq(3, tokens)
    assert bm.allocate(b) == 2 * BS  # blocks 0 and 1 still hit; block 2 was overwritten
    assert b.block_table[:2] == full[:2]
    assert bm.hash_to_block[old_hashes[2]] == b.block_table[2]  # recomputed and registered again


def test_different_image_digests_never_share_blocks():
    bm = BlockManager(16, BS)
    tokens = [7] * 13  # identical placeholder tokens
    a = make_seq(1, tokens, image_prompt(b"pixels-a", 0, 6))
    b = make_seq(2, tokens, image_prompt(b"pixels-b", 0, 6))
    bm.allocate(a)
    assert bm.num_cached_tokens(b) == 0
    assert bm.allocate(b) == 0
    assert not set(a.block_table) & set(b.block_table)
    # The same pixels do share.
    c = make_seq(3, tokens, image_prompt(b"pixels-a", 0, 6))
    assert bm.allocate(c) == 12


def test_text_blocks_before_an_image_are_shared_and_the_rest_is_not():
    bm = BlockManager(16, BS)
    tokens = list(range(13))
    a = make_seq(1, tokens, image_prompt(b"cat", 4, 8))  # the image fills block 1 exactly
    b = make_seq(2, tokens, image_prompt(b"dog", 4, 8))
    assert a.block_key(0, BS) == b"" and a.block_key(1, BS) == b"cat" and a.block_key(2, BS) == b""
    bm.allocate(a)
    assert bm.allocate(b) == BS  # block 0 (text only) is shared; block 2 is text but follows a different image
    assert b.block_table[0] == a.block_table[0]
    assert not set(b.block_table[1:]) & set(a.block_table)
    # A text-only prompt with the same tokens matches neither image block.
    t = make_seq(3, tokens)
    assert bm.allocate(t) == BS


# --- decode -----------------------------------------------------------------------------------------------------------


def test_append_slot_allocates_exactly_when_a_token_starts_a_new_block():
    bm = BlockManager(8, BS)
    seq = make_seq(1, [1, 2, 3])
    bm.allocate(seq)
    for length in range(4, 14):
        seq.append(length, 0.0)
        free_before = bm.num_free
        starts_block = length % BS == 1
        assert bm.needs_block(seq) == starts_block
        bm.append_slot(seq)
        assert bm.num_free == free_before - starts_block
        assert len(seq.block_table) == seq.num_blocks(BS)


def test_append_slot_registers_the_block_it_completes():
    bm = BlockManager(8, BS)
    seq = make_seq(1, [1, 2, 3, 4, 5])
    bm.allocate(seq)
    for t in (6, 7):
        seq.append(t, 0.0)
        bm.append_slot(seq)
        assert bm.blocks[seq.block_table[1]].hash is None
    seq.append(8, 0.0)  # completes block 1
    bm.append_slot(seq)
    completed = seq.block_table[1]
    expected = chain_hashes(seq, BS)[1]
    assert bm.blocks[completed].hash == expected
    assert bm.hash_to_block[expected] == completed
    assert bm.blocks[completed].token_ids == (5, 6, 7, 8)
    other = make_seq(2, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.allocate(other) == 8
    assert other.block_table[:2] == seq.block_table
    assert bm.blocks[completed].ref_count == 2


def test_can_append_needs_a_free_block_only_at_a_block_boundary():
    bm = BlockManager(2, BS)
    seq = make_seq(1, list(range(8)))
    bm.allocate(seq)
    assert bm.num_free == 0
    seq.append(99, 0.0)
    assert bm.needs_block(seq) and not bm.can_append(seq)
    with pytest.raises(RuntimeError):
        bm.append_slot(seq)


# --- fork -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_fork_shares_full_blocks_and_copies_the_partial_one(n):
    bm = BlockManager(16, BS)
    bm.allocate(make_seq(99, list(range(9))))  # an earlier prompt: the parent's first 2 blocks come from the cache
    parent = Sequence(1, list(range(10)), SamplingParams(n=n))
    assert bm.allocate(parent) == 8
    children, copies = [], []
    for i in range(1, n):
        child = parent.fork(10 + i, i)
        copies.append(bm.fork(parent, child))
        children.append(child)
    for child, copy in zip(children, copies, strict=True):
        assert child.block_table[:2] == parent.block_table[:2]
        assert child.block_table[2] != parent.block_table[2]
        assert copy == (parent.block_table[2], child.block_table[2], 2)
        assert bm.blocks[child.block_table[2]].ref_count == 1
        assert child.num_cached_tokens == parent.num_cached_tokens
    assert len({c.block_table[2] for c in children}) == n - 1
    assert all(bm.blocks[b].ref_count == n + 1 for b in parent.block_table[:2])  # + the earlier prompt
    assert bm.blocks[parent.block_table[2]].ref_count == 1
    assert bm.num_free == 16 - 3 - 1 - (n - 1)
    # Children then diverge on their own blocks.
    child = children[0]
    child.append(500, 0.0)
    parent.append(600, 0.0)
    for s in (child, parent):
        assert not bm.needs_block(s)
        bm.append_slot(s)
    assert child.block_table[2] != parent.block_table[2]


def test_fork_without_partial_block_returns_none_and_shares_everything():
    bm = BlockManager(8, BS)
    parent = Sequence(1, list(range(8)), SamplingParams(n=3))
    bm.allocate(parent)
    free_before = bm.num_free
    child = parent.fork(2, 1)
    assert bm.fork(parent, child) is None
    assert child.block_table == parent.block_table
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    assert bm.num_free == free_before
    # The next token starts a new, private block for each.
    child.append(1, 0.0)
    bm.append_slot(child)
    assert child.block_table[2] not in parent.block_table


# --- free -------------------------------------------------------------------------------------------------------------


def test_free_returns_unshared_blocks_and_keeps_shared_ones():
    bm = BlockManager(8, BS)
    parent = Sequence(1, list(range(10)), SamplingParams(n=2))
    bm.allocate(parent)
    child = parent.fork(2, 1)
    bm.fork(parent, child)
    bm.free(parent)
    assert parent.block_table == [] and parent.num_cached_tokens == 0
    assert all(bm.blocks[b].ref_count == 1 for b in child.block_table)
    assert bm.num_free == 8 - 3
    bm.free(child)
    assert bm.num_free == 8
    assert sorted(bm.free_ids) == list(range(8))


def test_free_twice_is_a_noop_and_a_stale_double_free_asserts():
    bm = BlockManager(8, BS)
    seq = make_seq(1, list(range(6)))
    bm.allocate(seq)
    stale = list(seq.block_table)
    bm.free(seq)
    free_ids = list(bm.free_ids)
    bm.free(seq)  # its table is empty now: nothing happens
    assert list(bm.free_ids) == free_ids
    assert all(b.ref_count == 0 for b in bm.blocks)
    ghost = make_seq(2, list(range(6)))
    ghost.block_table = stale  # a second release of the same references
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(ghost)


def test_reset_forgets_everything():
    bm = BlockManager(4, BS)
    bm.allocate(make_seq(1, list(range(9))))
    bm.reset()
    assert bm.num_free == 4 and bm.hash_to_block == {}
    assert all(b.ref_count == 0 and b.hash is None for b in bm.blocks)


# --- randomized invariants --------------------------------------------------------------------------------------------


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    free = list(bm.free_ids)
    assert len(free) == len(set(free)), "duplicate in the free list"
    holders = [0] * bm.num_blocks
    for seq in live:
        assert len(seq.block_table) == seq.num_blocks(bm.block_size)
        assert len(set(seq.block_table)) == len(seq.block_table)
        for b in seq.block_table:
            holders[b] += 1
    free_set = set(free)
    for block in bm.blocks:
        if block.block_id in free_set:
            assert block.ref_count == 0 and holders[block.block_id] == 0
        else:
            assert block.ref_count == holders[block.block_id] >= 1, f"block {block.block_id}"
    assert bm.num_free + sum(h > 0 for h in holders) == bm.num_blocks
    for h, b in bm.hash_to_block.items():
        assert bm.blocks[b].hash == h
    # Content: every full block of a live sequence holds exactly that sequence's prefix; a partial one is private.
    for seq in live:
        hashes = chain_hashes(seq, bm.block_size)
        for i, b in enumerate(seq.block_table):
            block = bm.blocks[b]
            if i < len(hashes):
                assert block.hash == hashes[i]
                assert block.token_ids == tuple(seq.block_tokens(i, bm.block_size))
            else:
                assert block.hash is None and block.ref_count == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_invariants(seed):
    rng = random.Random(seed)
    bm = BlockManager(24, 3)
    stems = [[rng.randrange(5) for _ in range(12)] for _ in range(3)]  # shared stems -> prefix hits
    live: list[Sequence] = []
    next_id, hits = 0, 0
    for _ in range(400):
        op = rng.choice(["allocate", "allocate", "append", "append", "append", "fork", "free"])
        if op == "allocate":
            stem = rng.choice(stems)
            tokens = stem[: rng.randrange(1, len(stem) + 1)] + [rng.randrange(5) for _ in range(rng.randrange(4))]
            if not tokens:
                continue
            mm = image_prompt(bytes([rng.randrange(2)]), 2, 5) if rng.random() < 0.2 else None
            next_id += 1
            seq = make_seq(next_id, tokens, mm)
            if not bm.can_allocate(seq):
                continue
            cached = bm.allocate(seq)
            hits += cached > 0
            assert cached % bm.block_size == 0 and cached <= len(seq) - 1
            live.append(seq)
        elif op == "append" and live:
            seq = rng.choice(live)
            seq.append(rng.randrange(5), 0.0)
            if bm.can_append(seq):
                bm.append_slot(seq)
            else:
                seq.token_ids.pop()
                seq.logprobs.pop()
                seq.policy_logprobs.pop()
        elif op == "fork" and live:
            parent = rng.choice(live)
            partial = len(parent) % bm.block_size
            if partial and bm.num_free == 0:
                continue
            next_id += 1
            child = parent.fork(next_id, 1)
            copy = bm.fork(parent, child)
            if partial:
                num_full = len(parent) // bm.block_size
                assert copy == (parent.block_table[num_full], child.block_table[-1], partial)
            else:
                assert copy is None
            live.append(child)
        elif op == "free" and live:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        check_invariants(bm, live)
    assert hits > 0  # the run did exercise the prefix cache
    for seq in live:
        bm.free(seq)
    check_invariants(bm, [])
    assert bm.num_free == bm.num_blocks


def test_forget_cached_keeps_only_the_given_blocks_and_reset_resizes():
    bm = BlockManager(16, BS)
    header = list(range(8))  # 2 full blocks
    a, b = make_seq(1, header + [50, 51, 52, 53, 54]), make_seq(2, header + [60, 61, 62, 63, 64])
    bm.allocate(a)
    bm.allocate(b)
    shared = bm.cached_prefix_blocks(header + [99])
    assert shared == a.block_table[:2] == b.block_table[:2]
    own = [a.block_table[2], b.block_table[2]]  # each sequence's own full block
    bm.free(a)
    bm.free(b)
    bm.forget_cached(keep=bm.cached_prefix_blocks(header))
    assert sorted(bm.hash_to_block.values()) == sorted(shared)
    assert all(bm.blocks[x].hash is None for x in own)
    again = make_seq(3, header + [50, 51, 52, 53, 54])
    assert bm.allocate(again) == 2 * BS  # the header hits, its own block does not
    bm.free(again)
    bm.reset(num_blocks=1_000_000)
    assert bm.num_free == 1_000_000 and bm.num_used_ever == 0 and bm.hash_to_block == {}


def test_restore_prefix_leaves_the_blocks_as_the_prefix_alone_does():
    """What `Engine.release_kv_cache(keep_prefix=...)` puts back into a fresh cache: the state that allocating and
    freeing the prefix alone leaves (its full blocks hashed, every block free, last first), so later prompts hit
    the prefix and take the same blocks as on the computing path."""
    header = list(range(10))  # 2 full blocks + 2 tokens
    computed, restored = BlockManager(8, BS), BlockManager(8, BS)
    alone = make_seq(0, header)
    computed.allocate(alone)
    computed.free(alone)
    assert restored.restore_prefix(header) == [0, 1] == restored.cached_prefix_blocks(header)
    assert restored.free_ids == computed.free_ids == [3, 4, 5, 6, 7, 2, 1, 0]
    assert restored.hash_to_block == computed.hash_to_block
    assert [restored.blocks[b].hash for b in (0, 1)] == chain_hashes(alone, BS)
    seqs = [make_seq(1, header + [70, 71, 72]), make_seq(2, header + [70, 71, 72])]
    assert [bm.allocate(seq) for bm, seq in zip((computed, restored), seqs, strict=True)] == [2 * BS, 2 * BS]
    assert seqs[0].block_table == seqs[1].block_table
    check_invariants(restored, [seqs[1]])
    assert BlockManager(2, BS).restore_prefix(header) == []  # takes 3 blocks: nothing registered
    assert BlockManager(8, BS, prefix_caching=False).restore_prefix(header) == []
