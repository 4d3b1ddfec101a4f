"""The policy's prompt: shapes, image-token count against the patch grid, chat template; the tiny VL policy samples
from it through the engine, and greedy decoding equals Hugging Face `generate` on the same prompt dict. Loading
policy and reader back from local directories, and the errors when a part is missing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from caprl_core.models import TINY_CHAT_TEMPLATE, tiny_tokenizer
from caprl_core.policy import (
    DEFAULT_INSTRUCTION,
    TINY_RANDOM,
    ModelLoadError,
    PolicyPrompter,
    load_models,
    load_policy,
    load_reader,
    tiny_image_processor,
    tiny_policy_and_reader,
)
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    return tiny_policy_and_reader(seed=0)  # (policy, reader, tokenizer, image_processor)


def _image(width: int = 112, height: int = 112) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    image.paste((220, 40, 40), (10, 10, width // 2, height // 2))
    return image


def test_tiny_image_processor_gives_8x8_grid_for_112px():
    out = tiny_image_processor()(images=[_image()], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert tuple(out["pixel_values"].shape) == (64, 3 * 2 * 14 * 14)  # [t*h*w, C * temporal_patch * patch**2]


@pytest.mark.parametrize("size", [(112, 112), (300, 200), (57, 90), (20, 20)])
def test_prompt_shapes_and_image_tokens_match_grid(tiny, size):
    _, _, tokenizer, image_processor = tiny
    prompter = PolicyPrompter(tokenizer, image_processor)
    prompt = prompter(_image(*size).convert("L"))  # any mode: converted to RGB
    ids, types, grid = prompt["input_ids"], prompt["mm_token_type_ids"], prompt["image_grid_thw"]
    assert ids.dim() == 1 and ids.dtype == torch.long
    assert types.shape == ids.shape and not types.is_floating_point()
    assert tuple(grid.shape) == (1, 3) and grid[0, 0] == 1
    assert prompt["pixel_values"].shape[0] == int(grid.prod())
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    (where,) = (ids == pad).nonzero(as_tuple=True)
    assert len(where) == int(grid.prod()) // 4 <= 16  # one placeholder per merged 2x2 group, 112x112 at most
    assert torch.equal(types.bool(), ids == pad)
    assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1))  # one contiguous run
    assert ids[where[0] - 1] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert ids[where[-1] + 1] == tokenizer.convert_tokens_to_ids("<|vision_end|>")


def test_chat_template_wraps_the_user_turn(tiny):
    _, _, tokenizer, image_processor = tiny
    text = tokenizer.decode(PolicyPrompter(tokenizer, image_processor)(_image())["input_ids"])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith(f"<|vision_end|>{DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    raw = PolicyPrompter(tokenizer, image_processor, "Say what you see.", use_chat_template=False)
    assert tokenizer.decode(raw(_image())["input_ids"]).endswith("<|vision_end|>Say what you see.")


def test_from_processor_uses_its_chat_template_when_the_tokenizer_has_none(tiny):
    _, _, tokenizer, image_processor = tiny
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        PolicyPrompter(bare, image_processor, use_chat_template=True)
    processor = SimpleNamespace(tokenizer=bare, image_processor=image_processor, chat_template=TINY_CHAT_TEMPLATE)
    got = PolicyPrompter.from_processor(processor)(_image())
    want = PolicyPrompter(tokenizer, image_processor)(_image())
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    with pytest.raises(ValueError, match="no image_processor"):
        PolicyPrompter.from_processor(SimpleNamespace(tokenizer=bare, image_processor=None))


def _hf_greedy(model, prompt: dict, max_new_tokens: int) -> list[int]:
    """HF generate on one unpadded prompt dict; greedy, no early stop."""
    kw = {k: (v[None] if k in ("input_ids", "mm_token_type_ids") else v) for k, v in prompt.items()}
    kw["attention_mask"] = torch.ones_like(kw["input_ids"])
    out = model.generate(**kw, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, kw["input_ids"].shape[1] :].tolist()


def test_engine_samples_from_the_prompt_and_greedy_matches_hf_generate(tiny):
    policy, _, tokenizer, image_processor = tiny
    prompter = PolicyPrompter(tokenizer, image_processor)
    prompts = [prompter(_image()), prompter(_image(90, 140))]
    engine = Engine(policy, kv_cache_tokens=2048)
    (greedy,) = engine.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=8))
    assert greedy[0].token_ids == _hf_greedy(policy, prompts[0], 8)
    sampled = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=0))
    assert [len(out) for out in sampled] == [3, 3]
    assert all(1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids) for out in sampled for c in out)


def test_load_policy_and_reader_round_trip(tiny, tmp_path):
    policy, reader, tokenizer, image_processor = tiny
    for name, model in (("policy", policy), ("reader", reader)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    image_processor.save_pretrained(tmp_path / "policy")
    model, tok, processor = load_policy(tmp_path / "policy", device="cpu")
    assert model.dtype == torch.float32  # dtype None on CPU
    assert torch.equal(model.lm_head.weight, policy.lm_head.weight)
    got, want = PolicyPrompter(tok, processor)(_image()), PolicyPrompter(tokenizer, image_processor)(_image())
    assert all(torch.equal(got[k], want[k]) for k in want)
    model, tok = load_reader(tmp_path / "reader", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and tok("red circle")["input_ids"] == tokenizer("red circle")["input_ids"]


def test_load_errors_name_the_path(tiny, tmp_path):
    _, reader, tokenizer, _ = tiny
    with pytest.raises(ValueError, match=f"policy {tmp_path / 'missing'}: no such directory"):
        load_policy(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=f"policy {tmp_path / 'file'}: not a directory"):
        load_policy(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"reader {tmp_path / 'empty'}: .*no config.json"):
        load_reader(tmp_path / "empty")
    reader.save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match=f"policy {tmp_path / 'text'}: no preprocessor_config.json"):
        load_policy(tmp_path / "text")
    tiny_image_processor().save_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match="no vision tower"):
        load_policy(tmp_path / "text")


def test_load_models_one_rule_for_both_tools(tmp_path):
    """None is the shipped world model of that role; tiny-random for both is the random pair, for one an error."""
    from caprl_core.world import SHIPPED

    for policy, reader, flag in ((TINY_RANDOM, None, "--reader"), (SHIPPED / "policy", TINY_RANDOM, "--policy")):
        with pytest.raises(ModelLoadError, match=f"{flag}: must be {TINY_RANDOM} too"):
            load_models(policy, reader)
    models = load_models(TINY_RANDOM, TINY_RANDOM, dtype=torch.bfloat16, seed=3)
    assert models.builtin and models.policy.dtype == models.reader.dtype == torch.bfloat16
    assert models.processors[:2] == [models.tokenizer, models.image_processor]
    shipped = load_models(None, None)
    assert not shipped.builtin and shipped.reader_template is not None  # the world reader's own prompt
    for policy, reader in ((SHIPPED / "policy", None), (None, SHIPPED / "reader")):  # either flag alone
        alone = load_models(policy, reader)
        for role in ("policy", "reader"):
            assert getattr(alone, role).state_dict().keys() == getattr(shipped, role).state_dict().keys()


def test_policy_chat_template_files_are_carried(tiny, tmp_path):
    """A policy directory with a processor's chat_template.json (as hub VL models have) and no template in the
    tokenizer: the tokenizer takes it, and the files go into checkpoints verbatim."""
    policy, reader, tokenizer, image_processor = tiny
    policy.save_pretrained(tmp_path / "policy")
    reader.save_pretrained(tmp_path / "reader")
    tokenizer.save_pretrained(tmp_path / "reader")
    bare = tiny_tokenizer()
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "policy")
    image_processor.save_pretrained(tmp_path / "policy")
    template = {"chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"}
    (tmp_path / "policy" / "chat_template.json").write_text(json.dumps(template))
    models = load_models(tmp_path / "policy", tmp_path / "reader")
    assert models.tokenizer.chat_template == template["chat_template"]
    out = tmp_path / "ckpt"
    out.mkdir()
    for processor in models.processors:
        processor.save_pretrained(out)
    assert json.loads((out / "chat_template.json").read_text()) == template
    assert AutoTokenizer.from_pretrained(out).chat_template == template["chat_template"]
