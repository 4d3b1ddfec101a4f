"""Scheduler: prefill first, the token and sequence budgets, the prefix cache in the budget, preemption by recompute,
and a simulated engine (a fake model that writes a fake KV cache) running many sequences through a cache small
enough to force preemptions. Pure bookkeeping: no model, no torch."""

from __future__ import annotations

import random

import pytest

from caprl_core.sampler.block_manager import BlockManager
from caprl_core.sampler.scheduler import Scheduler
from caprl_core.sampler.sequence import SamplingParams, Sequence, SequenceStatus

BS = 4


def make_scheduler(num_blocks: int, *, max_num_seqs: int = 64, max_batch_tokens: int = 1024) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens)


def make_seq(seq_id: int, tokens: list[int], n: int = 1, max_new_tokens: int = 64) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams(n=n, max_new_tokens=max_new_tokens), request_index=seq_id)


def fork_all(sched: Scheduler, parent: Sequence, next_id: int) -> list[Sequence]:
    """What Engine._fork does to a just-prefilled prompt with n > 1 (the KV copy aside)."""
    children = []
    for i in range(1, parent.params.n):
        child = parent.fork(next_id + i, i)
        sched.block_manager.fork(parent, child)
        sched.add_running(child)
        children.append(child)
    parent.forked = True
    return children


# --- prefill ----------------------------------------------------------------------------------------------------------


def test_prefill_goes_before_decode():
    sched = make_scheduler(16)
    a = make_seq(1, [1, 2, 3])
    sched.add(a)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [a]
    assert a.status == SequenceStatus.RUNNING and a.block_table
    a.append(9, 0.0)  # the token the prefill sampled
    b = make_seq(2, [4, 5, 6])
    sched.add(b)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [b]  # b joins at once; a waits one step
    b.append(9, 0.0)
    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == [a, b]
    assert all(len(s.block_table) == s.num_blocks(BS) for s in batch.seqs)


def test_max_batch_tokens_caps_a_prefill_batch():
    sched = make_scheduler(64, max_batch_tokens=25)
    seqs = [make_seq(i, [10 * i + j for j in range(10)]) for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule().seqs == seqs[:2]  # 20 tokens; a third would make 30
    assert sched.schedule().seqs == seqs[2:]
    assert not sched.waiting


def test_over_long_prompt_runs_alone():
    sched = make_scheduler(64, max_batch_tokens=25)
    short1, long, short2 = make_seq(1, [1] * 10), make_seq(2, list(range(40))), make_seq(3, [3] * 10)
    for s in (short1, long, short2):
        sched.add(s)
    assert sched.schedule().seqs == [short1]  # the long one does not fit behind it
    assert sched.schedule().seqs == [long]  # alone, over the budget
    assert sched.schedule().seqs == [short2]


def test_max_num_seqs_counts_a_prompt_with_n_samples_as_n():
    sched = make_scheduler(64, max_num_seqs=4)
    a, b, c = make_seq(1, [1, 2, 3]), make_seq(2, [4, 5, 6], n=3), make_seq(3, [7, 8, 9])
    for s in (a, b, c):
        sched.add(s)
    assert sched.schedule().seqs == [a, b]  # 1 + 3 = 4
    assert list(sched.waiting) == [c]
    fork_all(sched, b, 100)
    for s in sched.running:
        s.append(0, 0.0)
    assert len(sched.running) == 4
    # Four running: no room for c until one finishes.
    batch = sched.schedule()
    assert not batch.is_prefill and len(batch.seqs) == 4
    sched.finish(a, "stop")
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [c]


def test_max_num_seqs_counts_running_sequences():
    sched = make_scheduler(64, max_num_seqs=3)
    running = [make_seq(i, [i]) for i in range(2)]
    for s in running:
        sched.add(s)
    assert len(sched.schedule().seqs) == 2
    wide = make_seq(5, [5, 6], n=2)
    sched.add(wide)
    batch = sched.schedule()  # 2 running + 2 samples > 3: decode instead
    assert not batch.is_prefill and list(sched.waiting) == [wide]


def test_decode_batch_respects_max_num_seqs():
    sched = make_scheduler(64, max_num_seqs=2)
    parent = make_seq(1, [1, 2, 3, 4, 5], n=4)  # alone in an empty scheduler: admitted although n > max_num_seqs
    sched.add(parent)
    assert sched.schedule().seqs == [parent]
    fork_all(sched, parent, 10)
    for s in sched.running:
        s.append(0, 0.0)
    batch = sched.schedule()
    assert not batch.is_prefill and len(batch.seqs) == 2
    assert len(sched.running) == 4  # the other two keep their blocks and wait


def test_prefix_cached_tokens_do_not_count_against_the_budget():
    sched = make_scheduler(64, max_batch_tokens=20)
    a = make_seq(1, list(range(16)))
    b = make_seq(2, list(range(12)) + [90, 91, 92, 93])  # shares a's first 3 blocks: 4 new tokens
    c = make_seq(3, [50 + t for t in range(16)])  # nothing shared: 16 new tokens
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [a, b]  # 16 + 4 = 20 fits; without the cache it would be 32
    assert b.num_cached_tokens == 12
    assert list(sched.waiting) == [c]


@pytest.mark.parametrize("num_blocks, admitted", [(2, False), (3, True)])
def test_fork_reserve_keeps_blocks_for_the_copies(num_blocks, admitted):
    # a (5 tokens, n=2) needs 2 blocks + 1 for its sample's copy of the partial block.
    sched = make_scheduler(num_blocks)
    a = make_seq(1, [1, 2, 3, 4, 5], n=2)
    sched.add(a)
    assert sched.schedule().seqs == ([a] if admitted else [])
    if admitted:
        fork_all(sched, a, 10)
        assert sched.block_manager.num_free == 0


def test_no_fork_reserve_when_the_prompt_ends_on_a_block_boundary():
    sched = make_scheduler(2)
    a = make_seq(1, list(range(8)), n=4)  # 2 full blocks: the samples share them all
    sched.add(a)
    assert sched.schedule().seqs == [a]
    assert len(fork_all(sched, a, 10)) == 3


def test_blocks_reserved_for_forks_are_not_given_to_later_prompts_of_the_same_batch():
    # 4 blocks: a (5 tokens, n=2) takes 2 and reserves 1 for its sample's copy; b (5 tokens) needs 2 more. Admitting
    # both leaves no block for a's fork, which the engine makes right after this prefill.
    sched = make_scheduler(4)
    a = make_seq(1, [1, 2, 3, 4, 5], n=2)
    b = make_seq(2, [6, 7, 8, 9, 10])
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs[0] is a
    fork_all(sched, a, 10)  # must not run out of blocks


# --- preemption -------------------------------------------------------------------------------------------------------


def test_decode_preempts_the_most_recently_admitted_sequence():
    sched = make_scheduler(4)
    a, b, c = (make_seq(i, [i] * 4) for i in (1, 2, 3))  # one full block each
    for s in (a, b, c):
        sched.add(s)
    assert sched.schedule().seqs == [a, b, c]
    for s in (a, b, c):
        s.append(0, 0.0)  # each now needs a second block; only one is free
    d = make_seq(4, [4] * 8)  # needs 2 blocks: cannot be admitted, stays waiting
    sched.add(d)
    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == [a, b]
    assert sched.num_preemptions == 1
    assert list(sched.waiting) == [c, d]  # the preempted one goes first
    assert c.status == SequenceStatus.WAITING and c.block_table == [] and c.num_cached_tokens == 0
    assert list(sched.running) == [a, b]
    assert len(c) == 5  # tokens kept: it is recomputed, not restarted


def test_multiple_preemptions_keep_admission_order_in_waiting():
    sched = make_scheduler(4)
    seqs = [make_seq(i, [i] * 4) for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule().seqs == seqs
    for s in seqs:
        s.append(0, 0.0)
    batch = sched.schedule()
    # seqs[0] needs a block: seqs[3] is preempted (1 block back), seqs[1] then needs one: seqs[2] goes.
    assert batch.seqs == seqs[:2]
    assert list(sched.waiting) == [seqs[2], seqs[3]]
    assert sched.num_preemptions == 2


def test_the_newest_sequence_preempts_itself_when_nothing_newer_is_left():
    sched = make_scheduler(3)
    a, b = make_seq(1, [1] * 4), make_seq(2, [2] * 4)
    for s in (a, b):
        sched.add(s)
    assert sched.schedule().seqs == [a, b]  # 2 blocks used, 1 free
    a.append(0, 0.0)
    b.append(0, 0.0)
    batch = sched.schedule()
    # a takes the free block; b needs one too and there is nobody newer to preempt.
    assert batch.seqs == [a] and list(sched.waiting) == [b]
    assert b.block_table == [] and sched.num_preemptions == 1


def test_finish_frees_blocks_and_keeps_the_prefix():
    sched = make_scheduler(8)
    a = make_seq(1, list(range(9)))
    sched.add(a)
    sched.schedule()
    sched.finish(a, "length")
    assert a.is_finished and a.finish_reason == "length" and a.block_table == []
    assert sched.is_finished and sched.block_manager.num_free == 8
    b = make_seq(2, list(range(9)))
    sched.add(b)
    sched.schedule()
    assert b.num_cached_tokens == 8


# --- simulation -------------------------------------------------------------------------------------------------------


def fake_token(request: int, sample: int, position: int) -> int:
    """The fake model's next token: a fixed function of who samples and where, so the outputs are known in advance."""
    return (request * 7919 + sample * 104729 + position * 31) % 40


class FakeEngine:
    """Engine._step / _fork / _sample without a model. The 'KV cache' maps a slot to the prefix its K/V stands for;
    every step checks that each sequence attends to exactly its own prefix."""

    STOP = 0

    def __init__(self, num_blocks: int, *, max_num_seqs: int, max_batch_tokens: int) -> None:
        self.bm = BlockManager(num_blocks, BS)
        self.sched = Scheduler(self.bm, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens)
        self.kv: dict[int, tuple[int, ...]] = {}
        self.next_id = 1000
        self.done: list[Sequence] = []
        self.steps = 0

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // BS] * BS + pos % BS

    def step(self) -> None:
        batch = self.sched.schedule()
        assert batch.seqs, "empty batch with work left"
        self.steps += 1
        for seq in batch.seqs:
            assert seq.status == SequenceStatus.RUNNING
            assert len(seq.block_table) == seq.num_blocks(BS)
            start = seq.num_cached_tokens if batch.is_prefill else len(seq) - 1
            assert start < len(seq), "the last token must be computed: its output is the next token's logits"
            for pos in range(start, len(seq)):
                self.kv[self.slot(seq, pos)] = tuple(seq.token_ids[: pos + 1])
        for seq in batch.seqs:  # after the whole batch wrote (prefix hits may come from the same batch)
            for pos in range(len(seq)):
                assert self.kv.get(self.slot(seq, pos)) == tuple(seq.token_ids[: pos + 1]), (seq.seq_id, pos)
        targets = []
        for seq in batch.seqs:
            targets.extend([seq] if seq.forked else [seq, *self.fork(seq)])
        for seq in targets:
            token = fake_token(seq.request_index, seq.sample_index, len(seq))
            seq.append(token, 0.0)
            if token in seq.params.stop_token_ids:
                self.finish(seq, "stop")
            elif seq.num_completion_tokens >= seq.params.max_new_tokens:
                self.finish(seq, "length")

    def fork(self, parent: Sequence) -> list[Sequence]:
        children = []
        for i in range(1, parent.params.n):
            self.next_id += 1
            child = parent.fork(self.next_id, i)
            copy = self.bm.fork(parent, child)
            if copy is not None:  # the engine copies the whole block
                src, dst, _ = copy
                for off in range(BS):
                    if src * BS + off in self.kv:
                        self.kv[dst * BS + off] = self.kv[src * BS + off]
            self.sched.add_running(child)
            children.append(child)
        parent.forked = True
        return children

    def finish(self, seq: Sequence, reason: str) -> None:
        self.sched.finish(seq, reason)
        self.done.append(seq)


def expected_completion(request: int, sample: int, prompt_len: int, params: SamplingParams) -> list[int]:
    out = []
    while len(out) < params.max_new_tokens:
        out.append(fake_token(request, sample, prompt_len + len(out)))
        if out[-1] in params.stop_token_ids:
            break
    return out


def run_simulation(seed: int, *, max_n: int, num_requests: int = 40) -> FakeEngine:
    rng = random.Random(seed)
    num_blocks = 24
    eng = FakeEngine(num_blocks, max_num_seqs=10, max_batch_tokens=40)
    stems = [[rng.randrange(1, 40) for _ in range(20)] for _ in range(3)]
    requests = []
    for r in range(num_requests):
        n = rng.randint(1, max_n)
        prompt = rng.choice(stems)[: rng.randint(1, 20)] + [rng.randrange(1, 40) for _ in range(rng.randrange(6))]
        params = SamplingParams(n=n, max_new_tokens=rng.randint(1, 30), stop_token_ids=(FakeEngine.STOP,))
        # Engine._check_fits: every request must fit alone in the whole cache.
        reserve = n - 1 if len(prompt) % BS else 0
        need = max(-(-(len(prompt) + params.max_new_tokens) // BS), -(-len(prompt) // BS) + reserve)
        assert need <= num_blocks
        seq = Sequence(r, prompt, params, request_index=r)
        requests.append(seq)
        eng.sched.add(seq)
    expected = {
        (s.request_index, j): expected_completion(s.request_index, j, len(s), s.params)
        for s in requests
        for j in range(s.params.n)
    }
    # Every step appends at least one token and no token is ever taken back, so this bounds a livelock.
    max_steps = sum(len(c) for c in expected.values())
    while not eng.sched.is_finished:
        assert eng.steps < max_steps, "no progress"
        eng.step()
    got = {(s.request_index, s.sample_index): s.completion_token_ids for s in eng.done}
    assert len(eng.done) == len(expected)
    assert got == expected
    for s in eng.done:
        assert s.finish_reason == ("stop" if s.completion_token_ids[-1] == FakeEngine.STOP else "length")
    assert eng.bm.num_free == num_blocks and all(b.ref_count == 0 for b in eng.bm.blocks)
    return eng


@pytest.mark.parametrize("seed", range(4))
def test_simulation_single_samples_finish_under_preemption(seed):
    eng = run_simulation(seed, max_n=1)
    assert eng.sched.num_preemptions > 0


@pytest.mark.parametrize("seed", range(4))
def test_simulation_with_forked_samples_finish_under_preemption(seed):
    eng = run_simulation(seed, max_n=4, num_requests=25)
    assert eng.sched.num_preemptions > 0


def test_bookkeeping_imports_neither_torch_nor_transformers():
    """The block manager, scheduler and sequences are CPU bookkeeping: importing them must not pull in torch."""
    import subprocess
    import sys

    code = (
        "import sys, caprl_core.sampler.block_manager, caprl_core.sampler.scheduler, caprl_core.sampler.sequence\n"
        "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
