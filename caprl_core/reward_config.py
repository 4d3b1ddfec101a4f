"""The CapRL reward's settings: `RewardConfig`, with the project's default preset and the published reward server's
(`RewardConfig.recipe()`). The scoring that reads them is `caprl_core.reward.CapRLReward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from caprl_core.data import MAX_OPTIONS
from caprl_core.reward_prompts import (
    CANNOT_ANSWER,
    LETTERS,
    RECIPE_CANNOT_ANSWER,
    RECIPE_TEMPLATE,
    PromptTemplate,
)
from caprl_core.reward_recipe import (
    RECIPE_ANSWER_LETTERS,
    RECIPE_ANSWER_TOKENS,
    RECIPE_CANNOT_ANSWER_LETTER,
    RECIPE_READER_TEMPERATURE,
)

__all__ = ["RewardConfig"]


@dataclass(frozen=True)
class RewardConfig:
    """num_draws: questions drawn per caption (with replacement). mode: "hard" (right/wrong per draw) or "soft"
    (probability of the right letter). cannot_answer: append the "cannot be answered" option to every question.
    temperature: the reader's softmax temperature (soft mode). seed: with the step number, fixes every draw and
    shuffle. use_chat_template: None = use the reader tokenizer's chat template when it has one.
    kv_cache_tokens: the reader's KV cache size in tokens; None = sized by each call's need (see `Engine`).
    engine_kwargs: passed to the reader's `Engine` (block size, ...).
    answer_letters: the letters the generate-and-parse ways look for in a reply (the first one found is the
    answer). answer_tokens: the tokens those ways let the reader generate.
    readout: how `CapRLReward.score` reads the reader's answer off the next-token distribution. "options" (the
    default preset): the option letters' logits only, renormalised over the question's options. "vocab" (the
    recipe): the whole vocabulary, each token counted for the option its first capital among answer_letters names
    (see `caprl_core.reward_recipe.token_option_map`); mass on tokens that decide no option, or a letter past the
    options, counts as wrong.
    cannot_answer_letter: the letter of the appended "cannot answer" option; None = the letter after the last
    option. The recipe's server always writes "F" (E stays unused for 4-option questions); a question with more
    options than that letter leaves room for gets the letter after its last option instead.
    `RewardConfig.recipe()` is the published reward server's setting."""

    num_draws: int = 8
    mode: str = "hard"
    cannot_answer: bool = True
    cannot_answer_text: str = CANNOT_ANSWER
    temperature: float = 1.0
    seed: int = 0
    # None = the reader's own prompt: caprl_prompt.json in the directory the reader model was loaded from (e.g. the
    # shipped world reader's), else DEFAULT_TEMPLATE; `CapRLReward` resolves it (reward_prompts.reader_template).
    template: PromptTemplate | None = None
    use_chat_template: bool | None = None
    # Option letters per question, "cannot answer" included (their tokens are checked at start). The default fits
    # every question `caprl_core.data` validates: A-I, as the official reward parses.
    max_options: int = MAX_OPTIONS + 1
    kv_cache_tokens: int | None = None
    engine_kwargs: dict = field(default_factory=dict)
    answer_letters: str = LETTERS
    answer_tokens: int = RECIPE_ANSWER_TOKENS
    readout: str = "options"
    cannot_answer_letter: str | None = None

    @classmethod
    def recipe(cls, **overrides) -> RewardConfig:
        """The CapRL reward server's setting: 8 draws with replacement, shuffled lettered options plus "Can not
        answer based on the caption", Qwen chat turns written out (no system message, no chat template), the
        assistant's turn opened with "The answer is", the reader at T = 0.6, soft mode (the
        expectation of the server's sampled reward: `CapRLReward.sample_by_generation` draws that reward itself, at
        most 10 tokens, first letter A-I, read over the whole vocabulary), "cannot answer" always "F". `overrides`
        replace any field."""
        values = dict(num_draws=8, mode="soft", temperature=RECIPE_READER_TEMPERATURE, cannot_answer=True,
                      cannot_answer_text=RECIPE_CANNOT_ANSWER, template=RECIPE_TEMPLATE, use_chat_template=False,
                      max_options=len(RECIPE_ANSWER_LETTERS), answer_letters=RECIPE_ANSWER_LETTERS,
                      answer_tokens=RECIPE_ANSWER_TOKENS, readout="vocab",
                      cannot_answer_letter=RECIPE_CANNOT_ANSWER_LETTER)  # fmt: skip
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        if not (isinstance(self.num_draws, int) and self.num_draws >= 1):
            raise ValueError(f"RewardConfig.num_draws must be an integer >= 1, got {self.num_draws!r}")
        if self.mode not in ("hard", "soft"):
            raise ValueError(f"RewardConfig.mode must be 'hard' or 'soft', got {self.mode!r}")
        if not self.temperature > 0:
            raise ValueError(f"RewardConfig.temperature must be > 0, got {self.temperature!r}")
        if not (2 <= self.max_options <= len(LETTERS)):
            raise ValueError(f"RewardConfig.max_options must be in [2, 26], got {self.max_options!r}")
        if not (self.answer_letters and set(self.answer_letters) <= set(LETTERS)):
            raise ValueError(f"RewardConfig.answer_letters must be capital letters A-Z, got {self.answer_letters!r}")
        if self.readout not in ("options", "vocab"):
            raise ValueError(f"RewardConfig.readout must be 'options' or 'vocab', got {self.readout!r}")
        letter = self.cannot_answer_letter
        if letter is not None and not (len(letter) == 1 and letter in LETTERS[1 : self.max_options]):
            raise ValueError(f"RewardConfig.cannot_answer_letter must be None or one of "
                             f"{LETTERS[1 : self.max_options]!r}, got {letter!r}")  # fmt: skip
        if not (isinstance(self.answer_tokens, int) and self.answer_tokens >= 1):
            raise ValueError(f"RewardConfig.answer_tokens must be an integer >= 1, got {self.answer_tokens!r}")
        if self.kv_cache_tokens is not None:
            if not (isinstance(self.kv_cache_tokens, int) and self.kv_cache_tokens >= 1):
                raise ValueError(f"RewardConfig.kv_cache_tokens must be None or an integer >= 1, "
                                 f"got {self.kv_cache_tokens!r}")  # fmt: skip
            sizes = {"num_kv_blocks", "kv_cache_tokens", "kv_cache_memory_fraction"} & set(self.engine_kwargs)
            if sizes:
                raise ValueError(f"RewardConfig.kv_cache_tokens is given: engine_kwargs must not size the cache "
                                 f"too, got {sorted(sizes)}")  # fmt: skip
