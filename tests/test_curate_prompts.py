"""The curation filter's VQA prompt (caprl_core.curate.prompts): template file, layout, prefix sharing, letters."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from caprl_core.curate.prompts import (
    DEFAULT_VQA_TEMPLATE,
    VQA_PROMPT_FILE,
    VQAPrompter,
    VQATemplate,
    load_vqa_template,
    save_vqa_template,
)
from caprl_core.models import tiny_tokenizer
from caprl_core.policy import tiny_image_processor


@pytest.fixture(scope="module")
def prompter() -> VQAPrompter:
    return VQAPrompter(tiny_tokenizer(), tiny_image_processor())


def test_template_file_roundtrip_and_errors(tmp_path):
    assert load_vqa_template(tmp_path) == DEFAULT_VQA_TEMPLATE
    custom = VQATemplate(question="Q: {question}\n{options}\n", option="{letter}. {text}", answer_cue="Answer:")
    save_vqa_template(custom, tmp_path)
    assert load_vqa_template(tmp_path) == custom
    (tmp_path / VQA_PROMPT_FILE).write_text(json.dumps({"answer_cue": "A:"}))
    assert load_vqa_template(tmp_path) == VQATemplate(answer_cue="A:")
    (tmp_path / VQA_PROMPT_FILE).write_text(json.dumps({"question": "no placeholders"}))
    with pytest.raises(ValueError, match=r"caprl_vqa_prompt.json: VQATemplate.question must contain \{question\}"):
        load_vqa_template(tmp_path)
    (tmp_path / VQA_PROMPT_FILE).write_text(json.dumps({"header": "x"}))
    with pytest.raises(ValueError, match="expected a JSON object of strings"):
        load_vqa_template(tmp_path)


def test_layout_image_then_question_then_cue(prompter):
    tok = prompter.tokenizer
    vision = prompter.image_inputs(Image.new("RGB", (112, 112), "red"))
    p = prompter(vision, "what colour is the circle", ["red", "blue", "green"])
    text = tok.decode(p["input_ids"])
    assert text.startswith("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>")
    assert text.endswith("C) green\nReply with the letter of the correct option only.<|im_end|>\n"
                         "<|im_start|>assistant\nThe answer is")  # fmt: skip
    assert int(p["mm_token_type_ids"].sum()) == 16 == int((p["input_ids"] == prompter.image_token_id).sum())
    text_only = prompter(None, "what colour is the circle", ["red", "blue", "green"])
    assert set(text_only) == {"input_ids"}
    assert tok.decode(text_only["input_ids"]) == text.replace("<|vision_start|>" + "<|image_pad|>" * 16 +
                                                              "<|vision_end|>", "")  # fmt: skip


def test_rotations_share_the_image_and_question_prefix(prompter):
    vision = prompter.image_inputs(Image.new("RGB", (112, 112), "blue"))
    a = prompter(vision, "what shape is shown", ["circle", "square", "triangle"])["input_ids"].tolist()
    b = prompter(vision, "what shape is shown", ["square", "triangle", "circle"])["input_ids"].tolist()
    c = prompter(vision, "how many shapes", ["one", "two", "three"])["input_ids"].tolist()
    _, rest = prompter.template.render("what shape is shown", ["x"])
    stem = len(prompter.prompt_ids(16, "what shape is shown", ["x"])) - len(prompter._encode(rest + prompter._tail))
    assert a[:stem] == b[:stem] and a != b  # only the options differ
    image_block = len(prompter._head_ids) + 16 + len(prompter._vision_end_ids)
    assert a[:image_block] == c[:image_block]


def test_letter_ids_are_the_next_token_after_the_cue(prompter):
    tok = prompter.tokenizer
    ids = prompter.letter_token_ids(4)
    assert tok.convert_ids_to_tokens(ids) == ["ĠA", "ĠB", "ĠC", "ĠD"]
    base = prompter(None, "q", ["a", "b"])["input_ids"].tolist()
    assert tok(tok.decode(base) + " B", add_special_tokens=False)["input_ids"] == base + [ids[1]]
    with pytest.raises(ValueError, match="num_options"):
        prompter.letter_token_ids(0)
    with pytest.raises(ValueError, match="options: expected 1 to 26"):
        prompter(None, "q", [])


def test_raw_text_prompter_without_chat_template():
    tok = tiny_tokenizer()
    p = VQAPrompter(tok, tiny_image_processor(), VQATemplate(answer_cue="Answer:"), use_chat_template=False)
    ids = p(None, "q", ["a", "b"])["input_ids"]
    assert tok.decode(ids).endswith("Reply with the letter of the correct option only.Answer:")
    assert isinstance(ids, torch.Tensor) and len(p.letter_token_ids(2)) == 2
