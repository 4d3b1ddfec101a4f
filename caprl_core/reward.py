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
  to the letter a reply starting with it is parsed as (`caprl_core.reward_recipe.token_option_map`: " C", "C",
  "(C", "Because" -> B, ...), and soft = the softmax(logits / T) mass, over the whole vocabulary, of the tokens
  mapped to the right letter. Exact for replies whose first token decides the parse or ends the reply. A first
  token that decides nothing (" (", " the", " J", a space) is counted 0, though the server reads on: that is an
  approximation, low by the probability of such a start followed by the right letter. Measured
  (tests/test_reward.py, the "undecided" reader, 5 of its 12 tokens deciding nothing): 0.000-0.012 below the
  sampled 10-token reward, the soft reward 0.07-0.23; docs/reward.md, "Two definitions of the soft reward".

The settings are `caprl_core.reward_config.RewardConfig`; the reader's prompt (its layout and templates) is
`caprl_core.reward_prompts`; the recipe server's answerer and its parse are `caprl_core.reward_recipe`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from caprl_core import ops
from caprl_core.data import MCQ
from caprl_core.qa_rows import good_questions
from caprl_core.reward_config import RewardConfig
from caprl_core.reward_prompts import DEFAULT_TEMPLATE, LETTERS, chat_wrapping, reader_template
from caprl_core.reward_recipe import cached_token_option_map, first_capital_letter
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import SamplingParams

__all__ = ["RewardDetails", "CapRLReward"]


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
        config = config or RewardConfig()
        if config.template is None:  # the reader directory's own prompt: its wording is what it was trained on
            config = replace(config, template=reader_template(reader_model) or DEFAULT_TEMPLATE)
        self.config = config
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
            self.token_options = cached_token_option_map(reader_tokenizer, vocab_size, self.config.answer_letters)

    # --- prompt construction ------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _chat_wrapping(self) -> tuple[str, str]:
        """The reader's chat template around one user message, split at the message: (before, after)."""
        return chat_wrapping(self.tokenizer, "reader_tokenizer") if self._chat else ("", "")

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

    def release_kv_cache(self) -> None:
        """Release the reader's KV cache but the few-shot header's full blocks (`Engine.release_kv_cache`): the next
        `score` finds the header cached instead of computing it alone again, with the same bits."""
        self.engine.release_kv_cache(keep_prefix=self._header_ids)

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


def _completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal content parts
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    raise ValueError(f"completion must be a str or a list of chat messages, got {type(completion).__name__}")
