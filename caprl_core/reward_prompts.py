"""The reader's prompt for the CapRL reward (`caprl_core.reward`): `PromptTemplate`, the project's default template,
the published recipe's template, the option letters, and the caprl_prompt.json a reader directory may carry.

Prompt layout, shared part first so the sampler's prefix cache computes it once:
    [header: instruction + few-shot examples] [caption part] [question part + answer cue]
Each part is tokenised on its own and the ids concatenated, so the header's ids are identical in every prompt and
a caption's ids identical in its N prompts (tokenising the joined string could merge tokens across the seams). With
the reader's chat template the header starts the user turn and the answer cue starts the assistant turn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# The option letters, in the order the prompts letter a question's options (index = option slot).
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


def save_prompt_template(template: PromptTemplate, directory) -> None:
    """Write `template` as directory/caprl_prompt.json."""
    (Path(directory) / PROMPT_FILE).write_text(json.dumps(asdict(template), indent=2) + "\n")


def load_prompt_template(directory) -> PromptTemplate | None:
    """The template in directory/caprl_prompt.json, or None when there is none. ValueError naming the file when it is
    not a JSON object of PromptTemplate's string fields (or misses a placeholder)."""
    path = Path(directory) / PROMPT_FILE
    return read_template_file(path, PromptTemplate, {"header": DEFAULT_HEADER}) if path.is_file() else None


def read_template_file(path: Path, cls, defaults: dict[str, str] | None = None):
    """`cls(**fields)` from the JSON object in `path` (string values, keys among the dataclass `cls`'s fields, missing
    ones from `defaults` or cls's own); a ValueError naming the file otherwise, or when cls rejects a value."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    names = {f.name for f in fields(cls)}
    if not isinstance(raw, dict) or not set(raw) <= names or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError(f"{path}: expected a JSON object of strings with keys among {sorted(names)}")
    try:
        return cls(**{**(defaults or {}), **raw})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def chat_wrapping(tokenizer, name: str = "tokenizer") -> tuple[str, str]:
    """The tokenizer's chat template around one user message, split at the message: (before, after); a ValueError
    naming `name` when the template does not place the message exactly once."""
    marker = "\x00CAPRL_CONTENT\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    if text.count(marker) != 1:
        raise ValueError(f"{name}: its chat template does not place the user message exactly once")
    before, after = text.split(marker)
    return before, after


def reader_template(reader_model) -> PromptTemplate | None:
    """The caprl_prompt.json of the directory `reader_model` was loaded from (`from_pretrained` records it as
    `name_or_path`), or None: a model built in memory, or a directory without one."""
    source = getattr(reader_model, "name_or_path", None) or getattr(getattr(reader_model, "config", None),
                                                                      "_name_or_path", None)  # fmt: skip
    if not source or not Path(source).is_dir():
        return None
    return load_prompt_template(source)
