"""Continuous batching: which sequences run in the next forward pass.

Each step is either a prefill batch (waiting sequences, as many as fit in `max_batch_tokens` uncached tokens,
`max_num_seqs` sequences and the free blocks) or a decode batch (one token for every running sequence). Prefill goes
first, so finished sequences are replaced at once and the batch stays full while completions end at different
lengths. When a decode step needs a block and none is free, the most recently admitted sequence is preempted: its
blocks are freed and it waits to be prefilled again (recompute; its prefix usually comes back from the cache).

Never deadlocks: the engine rejects a request that could not run alone in the whole cache, a prefill batch always
admits its first sequence whatever its length, and the oldest running sequence always makes progress.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from caprl_core.sampler.block_manager import BlockManager
from caprl_core.sampler.sequence import Sequence, SequenceStatus


@dataclass
class Batch:
    seqs: list[Sequence]
    is_prefill: bool


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_batch_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sample: it already holds its blocks and joins the decode batch."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    @property
    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> Batch:
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        return self._schedule_decode()

    def _fork_reserve(self, seq: Sequence) -> int:
        """Blocks a prompt with n > 1 needs beyond its own: one copy of its partial last block per extra sample."""
        if seq.forked or len(seq) % self.block_manager.block_size == 0:
            return 0
        return seq.params.n - 1

    def _schedule_prefill(self) -> Batch:
        bm, seqs, num_tokens = self.block_manager, [], 0
        num_seqs = len(self.running)  # counting the samples each admitted prompt will fork into
        reserved = 0  # blocks the prompts admitted so far keep free for their forks (taken right after this step)
        while self.waiting:
            seq = self.waiting[0]
            width = 1 if seq.forked else seq.params.n
            if num_seqs and num_seqs + width > self.max_num_seqs:
                break
            plan = bm.plan(seq)  # one hashing pass serves the three questions below
            new_tokens = len(seq) - bm.num_cached_tokens(seq, plan)
            if seqs and num_tokens + new_tokens > self.max_batch_tokens:
                break
            if not bm.can_allocate(seq, reserve=reserved + self._fork_reserve(seq), plan=plan):
                break
            bm.allocate(seq, plan)
            num_tokens += len(seq) - seq.num_cached_tokens
            num_seqs += width
            reserved += self._fork_reserve(seq)
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            seqs.append(seq)
        return Batch(seqs, is_prefill=True)

    def _schedule_decode(self) -> Batch:
        bm, seqs = self.block_manager, []
        candidates = deque(self.running)
        self.running.clear()
        while candidates and len(seqs) < self.max_num_seqs:
            seq = candidates.popleft()
            while not bm.can_append(seq):
                if candidates:
                    self._preempt(candidates.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                bm.append_slot(seq)
                seqs.append(seq)
        self.running.extend(seqs)
        self.running.extend(candidates)  # over max_num_seqs: they wait for the next decode step, blocks kept
        return Batch(seqs, is_prefill=False)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` done and free its blocks (their prefix stays in the cache)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        self.running.remove(seq)
