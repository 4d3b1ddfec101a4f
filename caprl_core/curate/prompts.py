"""The VQA prompt of the curation filter: a vision-language model answers a multiple-choice question about an image
(or, in text-only mode, the same prompt without the image), and its answer is read from the option letters' logits at
the last position.

    prompter = VQAPrompter.from_directory(model_dir, tokenizer, image_processor)
    vision = prompter.image_inputs(image)             # once per image: patches and grid
    prompt = prompter(vision, question, options)      # a prompt dict of `Engine.prefill` (None instead of vision:
                                                      # the text-only prompt)
    letter_ids = prompter.letter_token_ids(len(options))  # [K] the token of each option letter after the cue

Layout, shared part first so that the engine's prefix cache computes it once:
    [chat turn opening + image block] [question stem] [options + chat turn closing + answer cue]
The image block is `<|vision_start|><|image_pad|>*n<|vision_end|>`, as `caprl_core.policy.PolicyPrompter` writes it
(the model's own image prompt: the chat template when the tokenizer has one, the raw text otherwise). Each part is
tokenised on its own and the ids concatenated, so one image's block has the same ids in all its questions and one
question's stem the same ids in all its option rotations (tokenising the joined string could merge across the seams).

A model directory may carry `caprl_vqa_prompt.json`: a JSON object with keys among "question" (must contain
"{question}" and "{options}"), "option" (must contain "{letter}" and "{text}") and "answer_cue", the same meanings as
the reader's caprl_prompt.json (`caprl_core.reward_prompts.PromptTemplate`); keys it leaves out keep the defaults.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from caprl_core.policy import IMAGE_PAD, VISION_END, VISION_START
from caprl_core.reward_prompts import LETTERS, chat_wrapping, read_template_file

VQA_PROMPT_FILE = "caprl_vqa_prompt.json"
# Our wording, in the style of the official CapRL filtering prompt: the question, its options one per line as "A) text",
# and an instruction to reply with the letter only; the assistant turn starts with the cue so that the next token is
# the letter.
DEFAULT_QUESTION = (
    "Look at the image and answer the multiple-choice question.\nQuestion: {question}\n{options}\n"
    "Reply with the letter of the correct option only."
)
DEFAULT_OPTION = "{letter}) {text}"
DEFAULT_ANSWER_CUE = "The answer is"


@dataclass(frozen=True)
class VQATemplate:
    """The question part of the VQA prompt (see the module docstring).

    question: must contain "{question}" and "{options}"; options are rendered one per line with `option`.
    option: must contain "{letter}" and "{text}".
    answer_cue: ends the prompt (after the chat template's assistant opening, when there is one); the option letter
    follows it as the next token (" A", " B", ... as the tokenizer splits them after the cue).
    """

    question: str = DEFAULT_QUESTION
    option: str = DEFAULT_OPTION
    answer_cue: str = DEFAULT_ANSWER_CUE

    def __post_init__(self) -> None:
        for name, keys in (("question", ("{question}", "{options}")), ("option", ("{letter}", "{text}"))):
            for key in keys:
                if key not in getattr(self, name):
                    raise ValueError(f"VQATemplate.{name} must contain {key}, got {getattr(self, name)!r}")

    def render(self, question: str, options: Sequence[str]) -> tuple[str, str]:
        """(stem, rest): the question part split where the options begin; stem + rest is the whole part."""
        marker = "\x00CAPRL_OPTIONS\x00"
        text = self.question.format(question=question, options=marker)
        stem, rest = text.split(marker, 1)
        lines = "\n".join(self.option.format(letter=LETTERS[i], text=t) for i, t in enumerate(options))
        return stem, lines + rest


DEFAULT_VQA_TEMPLATE = VQATemplate()


def save_vqa_template(template: VQATemplate, directory: str | Path) -> None:
    """Write `template` as directory/caprl_vqa_prompt.json."""
    (Path(directory) / VQA_PROMPT_FILE).write_text(json.dumps(asdict(template), indent=2) + "\n")


def load_vqa_template(directory: str | Path) -> VQATemplate:
    """The template in directory/caprl_vqa_prompt.json, or DEFAULT_VQA_TEMPLATE when there is none. ValueError naming
    the file when it is not a JSON object of VQATemplate's string fields (or misses a placeholder)."""
    path = Path(directory) / VQA_PROMPT_FILE
    return read_template_file(path, VQATemplate) if path.is_file() else DEFAULT_VQA_TEMPLATE


class VQAPrompter:
    """Builds the VQA prompts of one vision-language model (see the module docstring).

    use_chat_template: None = the tokenizer's chat template when it has one; False = the raw text only.
    """

    def __init__(self, tokenizer, image_processor, template: VQATemplate = DEFAULT_VQA_TEMPLATE, *,
                 use_chat_template: bool | None = None) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.image_token_id = self._special_id(IMAGE_PAD)
        chat = getattr(tokenizer, "chat_template", None)
        if use_chat_template and chat is None:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        use_chat = chat is not None and use_chat_template is not False
        self._before, self._after = chat_wrapping(tokenizer) if use_chat else ("", "")
        self._tail = self._after + template.answer_cue
        # [turn opening][vision start] [image pads] [vision end]: the pads are expanded per image.
        self._head_ids = self._encode(self._before + VISION_START)
        self._text_head_ids = self._encode(self._before) if self._before else []
        self._vision_end_ids = self._encode(VISION_END)

    @classmethod
    def from_directory(cls, directory: str | Path, tokenizer, image_processor, **kwargs) -> VQAPrompter:
        """The prompter of the model in `directory`, with its caprl_vqa_prompt.json (or the default template)."""
        return cls(tokenizer, image_processor, load_vqa_template(directory), **kwargs)

    def _special_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token: expected a Qwen2-VL style vocabulary")
        return int(ids[0])

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def image_inputs(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The image's patches and grid: {"pixel_values" [t*h*w, C*t*p*p], "image_grid_thw" [1, 3]}; compute it once
        per image and pass it to every question of the image."""
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL.Image, got {type(image).__name__}")
        vision = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        grid = torch.as_tensor(vision["image_grid_thw"], dtype=torch.long).reshape(1, 3)
        return {"pixel_values": vision["pixel_values"], "image_grid_thw": grid}

    def prompt_ids(self, num_image_tokens: int | None, question: str, options: Sequence[str]) -> list[int]:
        """Token ids of the prompt with `num_image_tokens` image placeholders (None: the text-only prompt)."""
        if not options or len(options) > len(LETTERS):
            raise ValueError(f"options: expected 1 to {len(LETTERS)} options, got {len(options)}")
        stem, rest = self.template.render(question, options)
        if num_image_tokens is None:
            head = self._text_head_ids
        else:
            head = self._head_ids + [self.image_token_id] * num_image_tokens + self._vision_end_ids
        return head + self._encode(stem) + self._encode(rest + self._tail)

    def __call__(self, vision: dict | None, question: str, options: Sequence[str]) -> dict[str, torch.Tensor]:
        """The prompt dict of one question (an `Engine.prefill` / `Engine.generate` prompt): with `vision` (from
        `image_inputs`) the image prompt, with None the text-only one."""
        if vision is None:
            return {"input_ids": torch.tensor(self.prompt_ids(None, question, options), dtype=torch.long)}
        grid = vision["image_grid_thw"]
        ids = torch.tensor(self.prompt_ids(int(grid.prod()) // self.merge_size**2, question, options), dtype=torch.long)
        return {"input_ids": ids, "pixel_values": vision["pixel_values"], "image_grid_thw": grid,
                "mm_token_type_ids": (ids == self.image_token_id).long()}  # fmt: skip

    def letter_token_ids(self, num_options: int) -> list[int]:
        """Token id of each of the first `num_options` option letters as it follows the answer cue. A letter that is
        not exactly one token there would make the next-token readout meaningless: ValueError naming it."""
        if not 1 <= num_options <= len(LETTERS):
            raise ValueError(f"num_options must be in [1, {len(LETTERS)}], got {num_options}")
        cue_ids = self._encode(self._tail)
        ids = []
        for letter in LETTERS[:num_options]:
            full = self._encode(self._tail + " " + letter)
            if full[: len(cue_ids)] != cue_ids or len(full) != len(cue_ids) + 1:
                raise ValueError(f"tokenizer: option letter {letter!r} after the answer cue {self._tail!r} is not a "
                                 f"single token; change answer_cue in {VQA_PROMPT_FILE}")  # fmt: skip
            ids.append(full[-1])
        if len(set(ids)) != len(ids):
            raise ValueError("tokenizer: two option letters map to the same token after the answer cue")
        return ids
