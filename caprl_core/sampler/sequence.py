"""Requests and their state: `SamplingParams`, `Completion`, `Sequence`.

Pure bookkeeping (no torch import): the block manager and the scheduler work on these objects alone, so they can be
tested without a model. A `Sequence` is one sample being generated: its tokens (prompt + completion so far), its
block table, how many of its leading tokens already have K/V in the cache, and what it needs to sample.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one prompt.

    n: samples per prompt; they share the prompt's KV blocks (forked after one prefill).
    temperature: 0 is greedy. top_p in (0, 1]; top_k = 0 means no top-k filter. Filters apply in HF's order:
    temperature, then top-k, then top-p.
    max_new_tokens: completion length cap (finish_reason "length").
    stop_token_ids: generation stops after emitting one of these (it is kept in the completion, finish_reason "stop").
    banned_token_ids: never sampled (their logits are set to -inf before everything else), e.g. a VL policy's
    image placeholder tokens, which would otherwise count as images when the caption is scored.
    seed: with a seed, sample i of prompt j draws from its own generator seeded from (seed, j, i), so the output does
    not depend on what else is in the batch. Without one, the device's global generator is used.
    seed_index: the j of that key instead of the prompt's position in the call (None: its position), so that a rank
    sampling its share of a global batch draws what one process sampling the whole batch draws for that prompt.
    repetition_penalty: > 0; 1 is off. Every token already in the sequence (prompt and completion, as HF's
    RepetitionPenaltyLogitsProcessor counts them) has its logit divided by it when positive and multiplied by it when
    negative, before temperature and the filters (CapRL's question generator samples with 1.05). The drawn token's
    `logprobs` are under the penalised distribution; `policy_logprobs` stay the policy's own.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    banned_token_ids: tuple[int, ...] = ()
    seed_index: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "banned_token_ids", tuple(int(t) for t in self.banned_token_ids))
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"SamplingParams.n must be an integer >= 1, got {self.n!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"SamplingParams.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"SamplingParams.repetition_penalty must be finite and > 0 (1 = off), got "
                             f"{self.repetition_penalty!r}")  # fmt: skip
        if self.seed_index is not None and not isinstance(self.seed_index, int):
            raise ValueError(f"SamplingParams.seed_index must be an int or None, got {self.seed_index!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled completion.

    token_ids: the generated tokens (a stop token, when hit, is the last one).
    logprobs: per token, its log-probability under the distribution it was drawn from (after temperature, banned
    tokens, top-k and top-p). Greedy decoding has no such distribution (a point mass), so there it is the model's
    plain log-softmax at temperature 1.
    finish_reason: "stop" (a stop token) or "length" (max_new_tokens or the model's maximum length).
    policy_logprobs: per token, its log-probability under the policy itself: log_softmax(logits / temperature) over
    the whole vocabulary, before banned tokens, top-k and top-p (temperature 1 for greedy). This is what a trainer
    recomputes with `ops.linear_token_logprobs`, so it is the old log-prob of the GRPO ratio (see
    `caprl_core.train`): both sides then score the same distribution. None when the completion was built by hand.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_logprobs: list[float] | None = None


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class ImageSpan:
    """Where one image's placeholder tokens sit in a prompt, and a digest of its pixels (for prefix hashing)."""

    start: int
    end: int  # exclusive
    digest: bytes


@dataclass
class MultimodalPrompt:
    """What a Qwen2.5-VL prompt needs beyond its token ids; shared (not copied) by the samples forked from it.

    pixel_values / image_grid_thw: as the processor returns them (tensors). positions: M-RoPE positions [3, L] of
    the prompt; rope_delta: the offset of the text positions after the prompt (decode position = index + rope_delta).
    image_embeds: the vision tower's output per image, filled the first time a prefill needs it, so the tower runs
    once per image whatever the number of samples, preemptions or prefix-cache misses.
    """

    pixel_values: Any
    image_grid_thw: Any
    positions: Any
    rope_delta: int
    spans: list[ImageSpan]
    image_embeds: dict[int, Any] = field(default_factory=dict)
    deepstack_embeds: dict[int, Any] = field(default_factory=dict)  # Qwen3-VL: [num_deepstack, tokens, H] per image

    def block_key(self, start: int, end: int) -> bytes:
        """Digests of the images whose tokens overlap [start, end): mixed into that block's prefix hash, so two
        prompts with the same placeholder tokens but different pixels never share KV."""
        return b"".join(span.digest for span in self.spans if span.start < end and start < span.end)


class Sequence:
    """One sample: prompt + completion tokens and their cache state."""

    def __init__(
        self,
        seq_id: int,
        token_ids: list[int],
        params: SamplingParams,
        *,
        request_index: int = 0,
        sample_index: int = 0,
        mm: MultimodalPrompt | None = None,
        prefill_only: bool = False,
    ) -> None:
        self.seq_id = seq_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.request_index = request_index
        self.sample_index = sample_index
        self.mm = mm
        self.prefill_only = prefill_only  # the reward reader's path: one prefill, no sampling
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0  # leading tokens whose K/V is in the cache (or written in this step)
        self.logprobs: list[float] = []
        self.policy_logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.forked = params.n == 1  # a prompt with n > 1 forks into its samples after its prefill
        self.generator: Any = None  # torch.Generator when params.seed is set (made by the engine)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return -(-len(self.token_ids) // block_size)

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size : (i + 1) * block_size]

    def block_key(self, i: int, block_size: int) -> bytes:
        """Non-token content of block i that its prefix hash must cover (image digests); b"" for text."""
        return self.mm.block_key(i * block_size, (i + 1) * block_size) if self.mm is not None else b""

    def append(self, token_id: int, logprob: float, policy_logprob: float | None = None) -> None:
        """Add a sampled token with its log-prob under the sampling distribution and under the unfiltered policy
        (the same value when not given)."""
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.policy_logprobs.append(logprob if policy_logprob is None else policy_logprob)

    def fork(self, seq_id: int, sample_index: int) -> Sequence:
        """A new sample of the same prompt with the same tokens so far; the block manager sets up its blocks."""
        child = Sequence(
            seq_id, self.token_ids, self.params,
            request_index=self.request_index, sample_index=sample_index, mm=self.mm,
        )  # fmt: skip
        child.num_prompt_tokens = self.num_prompt_tokens
        child.logprobs = list(self.logprobs)
        child.policy_logprobs = list(self.policy_logprobs)
        child.forked = True
        return child

    def completion(self) -> Completion:
        assert self.finish_reason is not None, "completion() of an unfinished sequence"
        return Completion(self.completion_token_ids, list(self.logprobs), self.finish_reason,
                          list(self.policy_logprobs))  # fmt: skip
