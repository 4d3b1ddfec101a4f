"""The CapRL reward: how well a vision-free reader answers multiple-choice questions about an image from a caption.

For every caption the reward draws N questions about its image (with replacement), shuffles each question's
options, appends a "cannot be answered from the caption" option, and asks the reader. The CapRL recipe lets a vLLM
reader *generate* a few tokens per question and parses the first capital letter. Here the reader is *scored*
instead: the prompt ends with an answer cue ("Answer:") so the next token is the option letter, one prefill gives
the hidden state at that position, and `caprl_core.ops.mcq_rewards` reads the option letters' logits off it
(lm_head rows of the letters only, never the full vocabulary). Hard mode: a draw is right when the correct letter
has the highest logit among the valid options (the greedy answer, restricted to the options); soft mode: the
probability of the correct letter at the reader temperature. A caption's reward is the mean over its N draws.

Two definitions of the soft reward, by `RewardConfig.readout`:
- "options" (the default preset): the probability of the right letter renormalised over the question's option
  letters (the letters' lm_head rows only).
- "vocab" (`RewardConfig.recipe()`): the server's expected reward. The server samples the reply at T = 0.6 and
  parses its first capital A-I; a letter past the options, or no letter, scores 0. Every vocabulary token is mapped
  to the letter a reply starting with it is parsed as (`token_option_map`: " C", "C", "(C", "Because" -> B, ...),
  and soft = the softmax(logits / T) mass, over the whole vocabulary, of the tokens mapped to the right letter.
  Exact for replies whose first token decides the parse or ends the reply. A first token that decides nothing
  (" (", " the", " J", a space) is counted 0, though the server reads on: that is an approximation, low by the
  probability of such a start followed by the right letter. Measured (tests/test_reward.py, the "undecided"
  reader, 5 of its 12 tokens deciding nothing): 0.000-0.012 below the sampled 10-token reward, the soft reward
  0.07-0.23; docs/reward.md, "Two definitions of the soft reward".

Prompt layout, shared part first so the sampler's prefix cache computes it once:
    [header: instruction + few-shot examples] [caption part] [question part + answer cue]
Each part is tokenised on its own and the ids concatenated, so the header's ids are identical in every prompt and
a caption's ids identical in its N prompts (tokenising the joined string could merge tokens across the seams). With
the reader's chat template the header starts the user turn and the answer cue starts the assistant turn.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from caprl_core import ops
from caprl_core.data import MAX_OPTIONS, MCQ
from caprl_core.qa_rows import good_questions
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import SamplingParams

__all__ = ["MCQ", "PromptTemplate", "RewardConfig", "RewardDetails", "CapRLReward", "RECIPE_TEMPLATE"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class PromptTemplate:
    """The reader's prompt, in four pieces (see the module docstring for the layout).

    header: the instruction and few-shot examples, shared by every prompt.
    caption: must contain "{caption}".
    question: must contain "{question}" and "{options}"; options are rendered one per line with `option`.
    option: must contain "{letter}" and "{text}".
    answer_cue: ends the prompt; the option letter follows it as the next token (" A", " B", ... as the tokenizer
    splits them after the cue).
    """

    header: str
    caption: str = "Caption:\n{caption}\n\n"
    question: str = "Question: {question}\nOptions:\n{options}\n"
    option: str = "{letter}. {text}"
    answer_cue: str = "Answer:"

    def __post_init__(self) -> None:
        for name, keys in (("caption", ("{caption}",)), ("question", ("{question}", "{options}")),
                           ("option", ("{letter}", "{text}"))):  # fmt: skip
            for key in keys:
                if key not in getattr(self, name):
                    raise ValueError(f"PromptTemplate.{name} must contain {key}, got {getattr(self, name)!r}")


# Written for this project, following the structure the CapRL paper describes for its reader: an instruction to
# answer from the caption only, worked examples (one of them unanswerable), then the caption and the question.
DEFAULT_HEADER = """You will read a caption of an image and answer a multiple-choice question about the image. \
You cannot see the image: use only what the caption says. If the caption does not say enough to answer, choose \
the option saying that the question cannot be answered from the caption. Reply with the letter of one option.

Example 1
Caption:
A brown dog sleeps on a red sofa next to a window.
Question: What colour is the sofa?
Options:
A. Blue
B. Red
C. Green
D. The question cannot be answered from the caption.
Answer: B

Example 2
Caption:
Two children fly a kite on a beach.
Question: What colour is the kite?
Options:
A. Yellow
B. White
C. The question cannot be answered from the caption.
Answer: C

Now the real task.
"""
DEFAULT_TEMPLATE = PromptTemplate(header=DEFAULT_HEADER)
CANNOT_ANSWER = "The question cannot be answered from the caption."
# A reader directory may carry the prompt it was trained with (the miniature world's reader does): a JSON object of
# PromptTemplate fields; the ones it leaves out keep their defaults.
PROMPT_FILE = "caprl_prompt.json"


# The published CapRL reward server's prompt layout (CapRL 1.0 and CapRL++ share it): the caption between
# "<Caption Start>" / "<Caption End>" markers, options as "- A) text" lines, the shuffled options followed by
# "Can not answer based on the caption", and the assistant turn opened with "The answer is" so that the reply starts
# with the letter; "cannot answer" is always F, so E stays unused for 4-option questions (RECIPE_CANNOT_ANSWER_LETTER).
# The instruction and the two worked examples are written for this project in the same structure
# (answer from the caption only, one example answerable, one not); a reader directory may carry another wording in
# caprl_prompt.json.
RECIPE_CANNOT_ANSWER = "Can not answer based on the caption"
RECIPE_HEADER = """You are given a caption that describes an image, and one multiple-choice question about that image.
Answer using only what the caption states or clearly implies, even when the answer looks obvious from general \
knowledge or from the question itself. Make no assumptions beyond the caption.

Example 1:
Caption: <Caption Start> A man in a yellow raincoat rides a green bicycle along a canal. <Caption End>
Question: What colour is the bicycle?
- A) Red
- B) Green
- C) Yellow
- D) Black
- F) Can not answer based on the caption

The answer is B.

Example 2:
Caption: <Caption Start> A girl holds a paper lantern at a night market. <Caption End>
Question: What shape is the lantern?
- A) Round
- B) Square
- C) Star-shaped
- D) Oval
- F) Can not answer based on the caption

The answer is F.

Now answer the question from the following caption:

"""
# The server writes the Qwen chat turns itself, without a system message and without the reader's chat template
# (Qwen3's would add thinking tags): the preset does the same (use_chat_template=False).
RECIPE_TEMPLATE = PromptTemplate(
    header="<|im_start|>user\n" + RECIPE_HEADER,
    caption="Caption: <Caption Start> {caption} <Caption End>\n",
    question="Question: {question}\n{options}\n",
    option="- {letter}) {text}",
    answer_cue="<|im_end|>\n<|im_start|>assistant\nThe answer is",
)
# The recipe's answerer: sampled at T = 0.6, at most 10 new tokens, the first of the letters A-I in the reply.
RECIPE_READER_TEMPERATURE = 0.6
RECIPE_ANSWER_TOKENS = 10
RECIPE_ANSWER_LETTERS = "ABCDEFGHI"
# The server drops the data's own "can not answer" line and always appends "F) Can not answer based on the caption".
RECIPE_CANNOT_ANSWER_LETTER = "F"
# The recipe's caption-length term (CapRL++ launch scripts): 1 up to 2,048 tokens, linear to 0 at 3,072, weight 0.2.
RECIPE_LENGTH_WEIGHT = 0.2
RECIPE_LENGTH_L1 = 2048
RECIPE_LENGTH_L2 = 3072


def save_prompt_template(template: PromptTemplate, directory) -> None:
    """Write `template` as directory/caprl_prompt.json."""
    (Path(directory) / PROMPT_FILE).write_text(json.dumps(asdict(template), indent=2) + "\n")


def load_prompt_template(directory) -> PromptTemplate | None:
    """The template in directory/caprl_prompt.json, or None when there is none. ValueError naming the file when it is
    not a JSON object of PromptTemplate's string fields (or misses a placeholder)."""
    path = Path(directory) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    names = {f.name for f in fields(PromptTemplate)}
    if not isinstance(raw, dict) or not set(raw) <= names or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError(f"{path}: expected a JSON object of strings with keys among {sorted(names)}")
    raw.setdefault("header", DEFAULT_HEADER)
    try:
        return PromptTemplate(**raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


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
    readout: how `score` reads the reader's answer off the next-token distribution. "options" (the default preset):
    the option letters' logits only, renormalised over the question's options. "vocab" (the recipe): the whole
    vocabulary, each token counted for the option its first capital among answer_letters names (see
    `token_option_map`); mass on tokens that decide no option, or a letter past the options, counts as wrong.
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
    template: PromptTemplate = DEFAULT_TEMPLATE
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


@dataclass
class RewardDetails:
    """Per draw (P = C x N rows, caption-major): which caption and question, the letters and the probability of
    the right letter; plus the reader prompt token counts of the call."""

    caption_index: list[int]
    question_index: list[int]
    chosen_letter: list[str]
    correct_letter: list[str]
    correct_prob: list[float]
    prompt_tokens: int  # all reader prompt tokens
    computed_tokens: int  # those actually run through the reader (the rest came from the prefix cache)
    # readout "vocab": per draw, the probability of a first token that decides no letter (a stop or special token,
    # " (", " the", ...), which the soft reward counts 0; it bounds that approximation's gap. Empty for "options".
    undecided_prob: list[float] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One dict per draw, for JSONL logs."""
        return [
            {"caption": c, "question": q, "chosen": a, "correct": b, "p_correct": p}
            for c, q, a, b, p in zip(self.caption_index, self.question_index, self.chosen_letter,
                                     self.correct_letter, self.correct_prob, strict=True)
        ]  # fmt: skip


@dataclass
class _Draws:
    """The reader prompts of one call: ids [P] lists, answers [P], options per prompt [P], and bookkeeping.
    orders[p][i] is the question option shown as letter i of prompt p (the "cannot answer" letter follows them)."""

    prompts: list[list[int]]
    answers: list[int]
    num_options: list[int]
    caption_index: list[int]
    question_index: list[int]
    orders: list[list[int]]


class CapRLReward:
    """Scores captions with a reader LLM (a Hugging Face causal LM and its tokenizer, used in place).

    `score(captions, questions)` -> (rewards[C] fp32, RewardDetails). `questions[c]` are the MCQs of caption c's
    image. Draws and shuffles depend on (config.seed, step, caption index) only: pass the trainer's step to make a
    run reproducible across restarts (by default each call uses the next step number).
    """

    def __init__(self, reader_model, reader_tokenizer, config: RewardConfig | None = None, *, engine=None) -> None:
        self.config = config or RewardConfig()
        self.model = reader_model
        self.tokenizer = reader_tokenizer
        if engine is None:
            size = {} if self.config.kv_cache_tokens is None else {"kv_cache_tokens": self.config.kv_cache_tokens}
            engine = Engine(reader_model, **size, **self.config.engine_kwargs)
        self.engine = engine
        self.lm_head = reader_model.get_output_embeddings()
        self.calls = 0
        chat = self.config.use_chat_template
        if chat is None:
            chat = getattr(reader_tokenizer, "chat_template", None) is not None
        self._chat = chat
        self._before, self._after = self._chat_wrapping()
        self._header_ids = self._encode(self._before + self.config.template.header)
        self.letter_ids = self.token_options = None
        if self.config.readout == "options":
            self.letter_ids = self._letter_token_ids()  # [max_options] token id of each letter after the cue
        else:  # [V] the option slot each vocabulary token decides, or -1
            vocab_size = self.lm_head.weight.shape[0]
            self.token_options = _cached_token_option_map(reader_tokenizer, vocab_size, self.config.answer_letters)

    # --- prompt construction ------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _chat_wrapping(self) -> tuple[str, str]:
        """The reader's chat template around one user message, split at the message: (before, after)."""
        if not self._chat:
            return "", ""
        marker = "\x00CAPRL_CONTENT\x00"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        if text.count(marker) != 1:
            raise ValueError("reader_tokenizer: its chat template does not place the user message exactly once")
        before, after = text.split(marker)
        return before, after

    def _letter_token_ids(self) -> list[int]:
        """Token id of each option letter as it follows the answer cue; a letter that is not exactly one token
        would make the next-token readout meaningless, so that is an error."""
        cue = self._after + self.config.template.answer_cue
        cue_ids = self._encode(cue)
        ids = []
        for letter in LETTERS[: self.config.max_options]:
            full = self._encode(cue + " " + letter)
            if full[: len(cue_ids)] != cue_ids or len(full) != len(cue_ids) + 1:
                pieces = self.tokenizer.convert_ids_to_tokens(full[len(cue_ids) - 1 :])
                raise ValueError(
                    f"reader_tokenizer: option letter {letter!r} after the answer cue {cue!r} is not a single token "
                    f"(tokens at the end: {pieces}); change PromptTemplate.answer_cue or use another reader"
                )
            ids.append(full[-1])
        if len(set(ids)) != len(ids):
            raise ValueError("reader_tokenizer: two option letters map to the same token")
        return ids

    def _question_text(self, mcq: MCQ, order: np.ndarray) -> tuple[str, int, int]:
        """The question part (options in `order`, then "cannot answer"), the index of the right option and the
        number of letter slots the prompt spans ("cannot answer" is the last; a slot before it may be unused)."""
        t = self.config.template
        lines = [(i, mcq.options[k]) for i, k in enumerate(order)]
        if self.config.cannot_answer:
            lines.append((self._cannot_answer_slot(len(mcq.options)), self.config.cannot_answer_text))
        options = "\n".join(t.option.format(letter=LETTERS[i], text=x) for i, x in lines)
        answer = int(np.nonzero(order == mcq.answer)[0][0])
        return t.question.format(question=mcq.question, options=options), answer, lines[-1][0] + 1

    def _cannot_answer_slot(self, num_options: int) -> int:
        """The letter index of "cannot answer": after the last option, or config.cannot_answer_letter (the recipe's
        "F") when that comes later."""
        letter = self.config.cannot_answer_letter
        return num_options if letter is None else max(num_options, LETTERS.index(letter))

    def _draw(self, captions: Sequence[str], questions: Sequence[Sequence[MCQ]], step: int,
              draw_keys: Sequence[int] | None) -> _Draws:  # fmt: skip
        cfg = self.config
        draws = _Draws([], [], [], [], [], [])
        cue = self._after + cfg.template.answer_cue
        for c, (caption, mcqs) in enumerate(zip(captions, questions, strict=True)):
            rng = np.random.default_rng([cfg.seed, step, c if draw_keys is None else int(draw_keys[c])])
            caption_ids = self._encode(cfg.template.caption.format(caption=caption))
            for q in rng.integers(0, len(mcqs), size=cfg.num_draws).tolist():
                mcq = mcqs[q]
                order = rng.permutation(len(mcq.options))
                text, answer, num_slots = self._question_text(mcq, order)
                draws.prompts.append(self._header_ids + caption_ids + self._encode(text + cue))
                draws.answers.append(answer)
                draws.orders.append(order.tolist())
                draws.num_options.append(num_slots)
                draws.caption_index.append(c)
                draws.question_index.append(q)
        return draws

    def _check(self, captions, questions) -> None:
        if len(captions) != len(questions):
            raise ValueError(f"captions and questions must have the same length, got {len(captions)} and "
                             f"{len(questions)}")  # fmt: skip
        if not captions:
            raise ValueError("captions is empty")
        limit = self.config.max_options - int(self.config.cannot_answer)
        for c, (caption, mcqs) in enumerate(zip(captions, questions, strict=True)):
            if not isinstance(caption, str):
                raise ValueError(f"captions[{c}] must be a str, got {type(caption).__name__}")
            if not mcqs:
                raise ValueError(f"questions[{c}] is empty: every caption needs at least one question")
            for q, mcq in enumerate(mcqs):
                if not isinstance(mcq, MCQ):
                    raise ValueError(f"questions[{c}][{q}] must be an MCQ, got {type(mcq).__name__}")
                if len(mcq.options) > limit:
                    raise ValueError(f"questions[{c}][{q}] has {len(mcq.options)} options; at most {limit} fit "
                                     f"RewardConfig.max_options={self.config.max_options}")  # fmt: skip

    # --- scoring ------------------------------------------------------------------------------------------------

    def reader_prompts(self, captions: Sequence[str], questions: Sequence[Sequence[MCQ]], *, step: int,
                       draw_keys: Sequence[int] | None = None) -> _Draws:  # fmt: skip
        """The prompts `score` would build (token ids), with their answers and option counts: for tests and tools."""
        self._check(captions, questions)
        if draw_keys is not None and len(draw_keys) != len(captions):
            raise ValueError(f"draw_keys: expected one key per caption ({len(captions)}), got {len(draw_keys)}")
        return self._draw(captions, questions, step, draw_keys)

    def score(
        self, captions: Sequence[str], questions: Sequence[Sequence[MCQ]], *, step: int | None = None,
        draw_keys: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, RewardDetails]:  # fmt: skip
        """Rewards [C] (fp32, on the reader's device) of the captions, and per-draw details.

        draw_keys: one int per caption; captions with the same key (and the same question pool) get the same draws
        and option shuffles, e.g. the image index for all G captions of an image, so that their rewards differ by
        the captions only. None: each caption draws on its own (keyed by its index)."""
        step = self._next_step(step)
        draws = self.reader_prompts(captions, questions, step=step, draw_keys=draw_keys)
        stats = self.engine.stats
        before = stats.prefill_tokens - stats.shared_prefix_tokens
        hidden = self.engine.prefill(draws.prompts, shared_prefix=self._header_ids)  # [P, H]
        # Counted as from a cold cache, the header's full blocks once, whether this call computed them alone or found
        # them cached: the count then does not depend on earlier calls (a resumed run logs the same numbers).
        computed = stats.prefill_tokens - stats.shared_prefix_tokens - before
        if self.engine.block_manager.prefix_caching:
            computed += len(self._header_ids) // self.engine.block_size * self.engine.block_size
        device = hidden.device
        if self.config.readout == "vocab":
            rewards, option_logprobs = ops.mcq_rewards(
                hidden, self.lm_head.weight, self.token_options.to(device),
                torch.tensor(draws.answers, device=device), torch.tensor(draws.caption_index, device=device),
                len(captions), num_options=len(LETTERS[: self.config.max_options]),
                bias=getattr(self.lm_head, "bias", None), temperature=self.config.temperature, mode=self.config.mode,
                normalize="vocab",
            )  # fmt: skip
            return rewards, self._details(draws, option_logprobs, computed)
        rewards, option_logprobs = ops.mcq_rewards(
            hidden, self.lm_head.weight,
            torch.tensor(self.letter_ids, device=device),
            torch.tensor(draws.answers, device=device),
            torch.tensor(draws.caption_index, device=device),
            len(captions),
            num_options=torch.tensor(draws.num_options, device=device),
            bias=getattr(self.lm_head, "bias", None),
            temperature=self.config.temperature,
            mode=self.config.mode,
        )  # fmt: skip
        return rewards, self._details(draws, option_logprobs, computed)

    def _details(self, draws: _Draws, option_logprobs: torch.Tensor, computed: int) -> RewardDetails:
        logp = option_logprobs.float().cpu()  # [P, K], -inf past each prompt's options
        chosen = logp.argmax(-1).tolist()
        answers = torch.tensor(draws.answers)
        p_correct = logp.gather(1, answers[:, None]).squeeze(1).exp().tolist()
        undecided = (1 - logp.exp().sum(-1)).clamp(min=0).tolist() if self.config.readout == "vocab" else []
        return RewardDetails(
            caption_index=draws.caption_index, question_index=draws.question_index,
            chosen_letter=[LETTERS[i] for i in chosen], correct_letter=[LETTERS[i] for i in draws.answers],
            correct_prob=p_correct, prompt_tokens=sum(len(p) for p in draws.prompts), computed_tokens=computed,
            undecided_prob=undecided,
        )  # fmt: skip

    def score_by_generation(
        self, captions: Sequence[str], questions: Sequence[Sequence[MCQ]], *, step: int | None = None,
        max_new_tokens: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The recipe's way, greedy: the reader generates up to `max_new_tokens` (default config.answer_tokens)
        greedily per prompt and the first of config.answer_letters in its reply is its answer (no letter, or a
        letter past the options, is wrong). Same draws and shuffles as `score` for the same step. Rewards [C]."""
        step = self._next_step(step)
        draws = self.reader_prompts(captions, questions, step=step)
        params = self._answer_params(0.0, max_new_tokens)
        return self._generated_rewards(draws, self.engine.generate(draws.prompts, params), len(captions))[0]

    def sample_by_generation(
        self, captions: Sequence[str], questions: Sequence[Sequence[MCQ]], *, step: int | None = None,
        num_samples: int = 1, seed: int = 0, max_new_tokens: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The recipe's way, sampled as its server does: each prompt's reply is sampled at config.temperature (up to
        `max_new_tokens`, default config.answer_tokens) and parsed as in `score_by_generation`. `num_samples`
        independent replies per prompt (seeded by `seed`, per prompt and sample). Same draws and shuffles as
        `score` for the same step. Rewards [num_samples, C]: row s is the reward of every caption in sample s."""
        step = self._next_step(step)
        draws = self.reader_prompts(captions, questions, step=step)
        params = replace(self._answer_params(self.config.temperature, max_new_tokens), n=num_samples, seed=seed)
        return self._generated_rewards(draws, self.engine.generate(draws.prompts, params), len(captions))

    def _answer_params(self, temperature: float, max_new_tokens: int | None) -> SamplingParams:
        eos = tuple(t for t in (self.tokenizer.eos_token_id,) if t is not None)
        tokens = self.config.answer_tokens if max_new_tokens is None else max_new_tokens
        return SamplingParams(temperature=temperature, max_new_tokens=tokens, stop_token_ids=eos)

    def _generated_rewards(self, draws: _Draws, outs: list, num_captions: int) -> torch.Tensor:
        """Rewards [S, C] from the parsed replies; outs[p] holds S completions of prompt p."""
        num_samples = len(outs[0]) if outs else 1
        right = torch.zeros(num_samples, num_captions)
        letters = self.config.answer_letters
        for out, answer, n, c in zip(outs, draws.answers, draws.num_options, draws.caption_index, strict=True):
            for s, completion in enumerate(out):
                letter = first_capital_letter(self.tokenizer.decode(completion.token_ids, skip_special_tokens=True),
                                              letters)  # fmt: skip
                right[s, c] += float(
                    letter is not None and LETTERS.index(letter) < n and LETTERS.index(letter) == answer
                )
        return right / self.config.num_draws

    def _next_step(self, step: int | None) -> int:
        if step is None:
            step = self.calls
        self.calls = step + 1
        return step

    # --- TRL ------------------------------------------------------------------------------------------------------

    def as_trl_reward(self, questions_column: str = "questions") -> Callable[..., list[float]]:
        """A reward function with TRL's signature, `f(prompts, completions, **kwargs) -> list[float]`, for
        `trl.GRPOTrainer(reward_funcs=[...])`. The MCQs come from the dataset column `questions_column`: per row a
        list of {"question", "options", "answer"} dicts (answer an index or a letter), the released rows'
        {"question", "choices", "answer"} dicts, or MCQ objects, read by the strict parser `caprl_core.qa_rows` (a
        bad question is left out with a warning naming its row and question; a row with none good is an error).
        Completions may be strings or conversational ([{"role": "assistant", "content": ...}]). When TRL passes
        `trainer_state`, its global_step is the draws' step, so a resumed run draws as the original would have."""

        def caprl_reward(prompts, completions, **kwargs) -> list[float]:
            if questions_column not in kwargs:
                raise ValueError(f"the dataset has no column {questions_column!r} (columns passed: {sorted(kwargs)})")
            captions = [_completion_text(c) for c in completions]
            rows = kwargs[questions_column]
            questions = [good_questions(row, f"{questions_column} row {r}") for r, row in enumerate(rows, start=1)]
            state = kwargs.get("trainer_state")  # TRL passes it: draws then follow the run's step, resumes included
            rewards, _ = self.score(captions, questions, step=getattr(state, "global_step", None))
            return rewards.tolist()

        return caprl_reward


def first_capital_letter(text: str, letters: str = LETTERS) -> str | None:
    """The recipe's parse: the first of `letters` (capitals) in a reply, or None. The recipe's server looks for
    A-I only, so a reply "Not sure: B" is B there (the N is skipped), while with A-Z it would be N."""
    match = re.search(f"[{re.escape(letters)}]", text)
    return match.group(0) if match else None


def token_option_map(tokenizer, vocab_size: int, letters: str = RECIPE_ANSWER_LETTERS) -> torch.Tensor:
    """[vocab_size] int64: for each token id, the option slot (index in LETTERS) that a reply starting with that
    token is parsed as by the server's rule (the first of `letters` anywhere in the reply), or -1 when the token
    decides nothing. A token decides when its text holds one of `letters` ("C", " C", "(C", "Because" -> slot of
    C, A, B): the reply's first such letter is then inside it. Special tokens (EOS and the chat markers) and ids
    past the tokenizer (embedding padding) decide nothing: a stop token ends the reply with no letter (score 0), and
    the others are dropped from the decoded reply."""
    if not (letters and set(letters) <= set(LETTERS)):
        raise ValueError(f"letters: expected capitals A-Z, got {letters!r}")
    out = torch.full((vocab_size,), -1, dtype=torch.int64)
    known = min(vocab_size, len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    pattern = re.compile(f"[{re.escape(letters)}]")
    texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False)
    for i, text in enumerate(texts):
        match = pattern.search(text)
        if match is not None and i not in special:
            out[i] = LETTERS.index(match.group(0))
    return out


# Decoding Qwen's 151,936 tokens one by one takes ~10 s (2-core CPU): rewards sharing a tokenizer (eval builds two)
# share its map.
_TOKEN_OPTION_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_token_option_map(tokenizer, vocab_size: int, letters: str) -> torch.Tensor:
    maps = _TOKEN_OPTION_MAPS.setdefault(tokenizer, {})
    if (vocab_size, letters) not in maps:
        maps[(vocab_size, letters)] = token_option_map(tokenizer, vocab_size, letters)
    return maps[(vocab_size, letters)]


def _completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal content parts
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    raise ValueError(f"completion must be a str or a list of chat messages, got {type(completion).__name__}")
