"""Question generation: a vision-language model writes multiple-choice questions about each image through our
`Engine`, in the official CapRL markdown format (`caprl_core.curate.extract` parses it), and the options of every
parsed question are shuffled with a seeded generator so that the right letter says nothing about the generator's
habits (models put the answer under A or B far more often than chance).

Sampling follows the official recipe: temperature 0.1, repetition penalty 1.05 (HF's rule, over the prompt and the
reply: `SamplingParams.repetition_penalty`), at most 2,048 new tokens, 5 questions per image.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field

from caprl_core.curate.extract import extract_questions
from caprl_core.data import MCQ, load_image
from caprl_core.policy import PolicyPrompter, stop_token_ids
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import SamplingParams

# Our wording of the official instruction: questions answerable only by looking at the image, one right option, the
# exact markdown layout the extractor expects.
GENERATE_INSTRUCTION = """Look at the image carefully and write {n} multiple-choice questions about it.
Each question must be answerable only by looking at the image (not from common sense or from the question itself), \
about what is visible: objects, colours, counts, positions, text. Give each question 4 options with exactly one \
correct option. Use exactly this format for every question:

#### 1. **the question**
- A) first option
- B) second option
- C) third option
- D) fourth option
**Answer:** the correct letter) its option"""


@dataclass(slots=True)
class GenerateConfig:
    """num_questions: asked for per image. temperature, top_p, repetition_penalty, max_new_tokens: sampling (the
    official 0.1, 1.0, 1.05, 2,048). batch_size: images per `Engine.generate` call. seed: sampling and option
    shuffles."""

    num_questions: int = 5
    temperature: float = 0.1
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    max_new_tokens: int = 2048
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_questions", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")


@dataclass(slots=True)
class Generated:
    """One image's result: its questions (options shuffled), the dropped blocks by reason, and the raw reply."""

    questions: list[MCQ]
    dropped: Counter = field(default_factory=Counter)
    text: str = ""
    finish_reason: str = ""


def shuffle_options(mcq: MCQ, seed: int, key: str) -> MCQ:
    """`mcq` with its options in an order drawn from (seed, key) alone (the same on every run and machine)."""
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    order = list(range(len(mcq.options)))
    random.Random(int.from_bytes(digest, "little")).shuffle(order)
    return MCQ(mcq.question, tuple(mcq.options[k] for k in order), order.index(mcq.answer))


class QuestionGenerator:
    """Writes questions for batches of images with a Qwen2.5-VL (`model`, its tokenizer and image processor)."""

    def __init__(self, model, tokenizer, image_processor, config: GenerateConfig, engine: Engine | None = None) -> None:
        self.config = config
        instruction = GENERATE_INSTRUCTION.format(n=config.num_questions)
        self.prompter = PolicyPrompter(tokenizer, image_processor, instruction)
        self.tokenizer = tokenizer
        self.engine = Engine(model) if engine is None else engine
        self.stop = stop_token_ids(model, tokenizer)

    def generate(self, ids: list[str], images: list, first_index: int) -> list[Generated]:
        """The questions of `images` (paths), whose ids are `ids` and whose positions in the run start at
        first_index (it seeds each image's sampling, so batching does not change what an image gets)."""
        c = self.config
        prompts = [self.prompter(load_image(path)) for path in images]
        params = [SamplingParams(temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                                 stop_token_ids=self.stop, seed=c.seed, seed_index=first_index + i,
                                 repetition_penalty=c.repetition_penalty)
                  for i in range(len(prompts))]  # fmt: skip
        outs = self.engine.generate(prompts, params)
        results = []
        for example_id, (out,) in zip(ids, outs, strict=True):
            text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
            found = extract_questions(text)
            questions = [shuffle_options(q, c.seed, f"{example_id}/{k}") for k, q in enumerate(found.questions)]
            results.append(Generated(questions, found.dropped, text, out.finish_reason))
        return results
