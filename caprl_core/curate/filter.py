"""The visual-dependency filter: a vision-language model answers each candidate question with the image and without
it (the same prompt, image left out), once per rotation of its options; a question is kept when it is answered with
the image (visual accuracy > min_visual) and not without it (text-only accuracy < max_text). The CapRL paper's
defaults: 4 option orders, 0.75 and 0.25 (so with 4 rotations: right 4 times of 4 with the image, 0 of 4 without).

mode "logits" (ours): one `Engine.prefill` per image over all its prompts, read by `caprl_core.ops.mcq_rewards` from
the option letters' rows of the model's head at the last position. score "hard" (the default): a rotation is right
when the right letter's logit is strictly above every other option's; "soft": the right letter's probability over the
options, so a question's accuracy is what sampling its answer at temperature 1 would score on average. Why soft
exists: under "hard", a model that cannot tell a visual question's options apart without the image still picks one
of them in each rotation, and the picks of 4 rotations include the right option with probability >= 1/k (k options),
so at most 1 - 1/k of visual questions can pass max_text (0.8 with 5 options) however well the model sees; a blind
model whose letter distribution is uniform scores 1/k < 0.25 under "soft". The prompts of one image
are ordered question by question, rotations together, so the engine's prefix cache computes the image once for all
its questions and each question's stem once for its rotations (`engine.stats.cached_tokens` counts what it saved).
mode "sampled": the official scripts' way, kept for comparison: a greedy reply of at most max_new_tokens, parsed for
its first option letter (`reward_recipe.first_capital_letter`); no letter is a wrong answer.

Each image is scored by itself on an empty prefix cache: its result then depends on the image and its questions
only, not on what ran before, so a resumed run (`caprl_core.curate.store.ProgressLog`) writes exactly what an
uninterrupted one writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from caprl_core import ops
from caprl_core.curate.prompts import VQAPrompter
from caprl_core.data import MCQ
from caprl_core.reward_prompts import LETTERS
from caprl_core.reward_recipe import first_capital_letter
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import SamplingParams

MODES = ("logits", "sampled")
SCORES = ("hard", "soft")  # how mode "logits" scores a rotation (module docstring)
# Why a question is dropped (exclusive): answerable without the image, not answered with it, or both.
DROP_REASONS = ("leaky", "not_visual", "leaky_and_not_visual")


@dataclass(slots=True)
class FilterConfig:
    """rotations: option orders per question and per mode (image / text only). min_visual, max_text: keep a question
    when its visual accuracy is > min_visual and its text-only accuracy < max_text. mode: "logits" or "sampled"
    (module docstring); max_new_tokens: the reply length of "sampled"; score: "hard" or "soft", how mode "logits"
    scores a rotation."""

    rotations: int = 4
    min_visual: float = 0.75
    max_text: float = 0.25
    mode: str = "logits"
    max_new_tokens: int = 8
    score: str = "hard"

    def __post_init__(self) -> None:
        if not (isinstance(self.rotations, int) and self.rotations >= 1):
            raise ValueError(f"rotations must be an integer >= 1, got {self.rotations!r}")
        for name in ("min_visual", "max_text"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {self.mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.score not in SCORES:
            raise ValueError(f"score: expected one of {list(SCORES)}, got {self.score!r}")
        if self.score == "soft" and self.mode != "logits":
            raise ValueError('score "soft" needs mode "logits" (a sampled reply is right or wrong)')

    def settings(self) -> dict:
        """What a question's record depends on, by flag: the progress log records it with every image, so that a
        resume with other settings is refused instead of mixing two runs' decisions."""
        return {"--mode": self.mode, "--rotations": self.rotations, "--min-visual-accuracy": self.min_visual,
                "--max-text-accuracy": self.max_text} | (
            {"--score": self.score} if self.mode == "logits" else {"--max-new-tokens": self.max_new_tokens}
        )  # fmt: skip

    def drop_reason(self, visual: float, text: float) -> str | None:
        """None when a question with these accuracies is kept, else its DROP_REASONS entry."""
        leaky, missed = not text < self.max_text, not visual > self.min_visual
        return "leaky_and_not_visual" if leaky and missed else "leaky" if leaky else "not_visual" if missed else None


def rotation(num_options: int, r: int) -> list[int]:
    """Option order of rotation r: the stored options shifted left by r (mod their number), so that over
    num_options rotations the right answer sits once under every letter."""
    return [(i + r) % num_options for i in range(num_options)]


class QuestionFilter:
    """Scores the questions of one image at a time with `model` (a Qwen2.5-VL) through `engine` (see the module
    docstring)."""

    def __init__(self, model, prompter: VQAPrompter, config: FilterConfig, engine: Engine | None = None) -> None:
        self.model = model
        self.prompter = prompter
        self.config = config
        self.engine = Engine(model) if engine is None else engine
        self.lm_head = model.get_output_embeddings()
        eos = getattr(prompter.tokenizer, "eos_token_id", None)
        self.stop = tuple(t for t in (eos,) if t is not None)

    def accuracies(self, image, questions: list[MCQ]) -> list[tuple[float, float]]:
        """(visual accuracy, text-only accuracy) of each question of `image` (a PIL image)."""
        vision = self.prompter.image_inputs(image)
        prompts, answers, num_options = [], [], []
        for mcq in questions:
            for vis in (vision, None):
                for r in range(self.config.rotations):
                    order = rotation(len(mcq.options), r)
                    prompts.append(self.prompter(vis, mcq.question, [mcq.options[k] for k in order]))
                    answers.append(order.index(mcq.answer))
                    num_options.append(len(mcq.options))
        self.engine.block_manager.reset()  # an empty prefix cache: the result depends on this image only
        if self.config.mode == "logits":
            acc = self._logit_accuracy(prompts, answers, num_options)
        else:
            acc = self._sampled_accuracy(prompts, answers, num_options)
        return [(acc[2 * q], acc[2 * q + 1]) for q in range(len(questions))]

    @torch.inference_mode()
    def _logit_accuracy(self, prompts: list[dict], answers: list[int], num_options: list[int]) -> list[float]:
        """Mean correctness (config.score) per (question, mode) group of config.rotations consecutive prompts."""
        hidden = self.engine.prefill(prompts)  # [P, H]
        device = hidden.device
        letters = torch.tensor(self.prompter.letter_token_ids(max(num_options)), device=device)  # [K]
        groups = torch.arange(len(prompts), device=device) // self.config.rotations  # [P]
        accuracy, _ = ops.mcq_rewards(
            hidden, self.lm_head.weight, letters, torch.tensor(answers, device=device), groups,
            len(prompts) // self.config.rotations, num_options=torch.tensor(num_options, device=device),
            bias=getattr(self.lm_head, "bias", None), mode=self.config.score,
        )  # fmt: skip
        return accuracy.float().tolist()

    def _sampled_accuracy(self, prompts: list[dict], answers: list[int], num_options: list[int]) -> list[float]:
        params = SamplingParams(temperature=0.0, max_new_tokens=self.config.max_new_tokens, stop_token_ids=self.stop)
        outs = self.engine.generate(prompts, params)
        tok = self.prompter.tokenizer
        right = []
        for out, answer, k in zip(outs, answers, num_options, strict=True):
            reply = tok.decode(out[0].token_ids, skip_special_tokens=True)
            right.append(float(first_capital_letter(reply, LETTERS[:k]) == LETTERS[answer]))
        r = self.config.rotations
        return [sum(right[i : i + r]) / r for i in range(0, len(right), r)]
