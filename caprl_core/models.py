"""Models: tiny random-initialised ones built from transformers configs (tests, demo, benchmarks), and real
checkpoints from local directories.

No weights can be downloaded in this project's environments, so everything runnable out of the box uses the tiny
builders below; `load_pretrained` loads a real checkpoint the user has on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Special token ids of the tiny Qwen2.5-VL model, at the top of its vocabulary (as in the real one).
TINY_VL_SPECIAL = {"image_token_id": -6, "video_token_id": -5, "vision_start_token_id": -4, "vision_end_token_id": -3}
# The same tokens by name, as Qwen2.5-VL's tokenizer spells them.
VL_SPECIAL_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                     "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}  # fmt: skip


def _text_kwargs(
    vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
    intermediate_size: int | None = None,
) -> dict:  # fmt: skip
    return dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=vocab_size - 1, pad_token_id=None,
    )  # fmt: skip


def tiny_qwen2(
    vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    *, intermediate_size: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None,
) -> Qwen2ForCausalLM:  # fmt: skip
    """A random Qwen2 decoder (GQA, q/k/v biases); the defaults are small enough for CPU tests. The MLP is
    2 x hidden_size wide unless intermediate_size is given. With a `tokenizer`, its size and eos id are used."""
    torch.manual_seed(seed)
    vocab_size = len(tokenizer) if tokenizer is not None else vocab_size
    kwargs = _text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
    if tokenizer is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    config = Qwen2Config(**kwargs)
    return Qwen2ForCausalLM(config).to(dtype).eval()


def tiny_llama(
    vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    *, seed: int = 0, dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:  # fmt: skip
    """A random Llama decoder small enough for CPU tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(**_text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads))
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_qwen2_5_vl(
    vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    *, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None,
) -> Qwen2_5_VLForConditionalGeneration:  # fmt: skip
    """A random Qwen2.5-VL (2-block vision tower, 14-px patches, 2x2 merge, M-RoPE) small enough for CPU tests.

    Its image/vision special tokens are the last ids of the vocabulary (`tiny_vl_token_ids`), or, with a
    `tokenizer` (e.g. `tiny_tokenizer()`), that tokenizer's vocabulary size and special token ids."""
    torch.manual_seed(seed)
    special = tiny_vl_token_ids(vocab_size)
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        special = {name: tokenizer.convert_tokens_to_ids(token) for name, token in VL_SPECIAL_TOKENS.items()}
    head_dim = hidden_size // num_heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # t/h/w split of the rotary half, as 16/24/24
    section[0] += head_dim // 2 - sum(section)
    text = _text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": section}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1])  # fmt: skip
    if tokenizer is not None:
        text["eos_token_id"] = tokenizer.eos_token_id
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    return Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()


def tiny_vl_token_ids(vocab_size: int = 512) -> dict[str, int]:
    return {name: vocab_size + offset for name, offset in TINY_VL_SPECIAL.items()}


def vl_prompt_inputs(model, text_before: list[int], grids: list[list[int]], text_after: list[int], *, seed: int = 0):
    """A Qwen2.5-VL prompt dict for `model` with random pixels: text, then each image as
    <vision_start> <image_pad> * (t*h*w / merge**2) <vision_end>, then more text. grids: [t, h, w] in patches."""
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    ids = list(text_before)
    for t, h, w in grids:
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // merge**2) + [cfg.vision_end_token_id]
    ids += list(text_after)
    grid = torch.tensor(grids, dtype=torch.long)
    vc = cfg.vision_config
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=gen)
    input_ids = torch.tensor(ids)
    return {"input_ids": input_ids, "pixel_values": pixels, "image_grid_thw": grid,
            "mm_token_type_ids": (input_ids == cfg.image_token_id).int()}  # fmt: skip


def load_pretrained(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """A causal LM or Qwen2.5-VL checkpoint from a local directory (no download is attempted)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()


# --- a tokenizer that needs no download ----------------------------------------------------------------------------

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *VL_SPECIAL_TOKENS.values()]
# Qwen-style chat turns: what the policy and the reader see when a chat template is used.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_WORDS = (
    "a an the in of and with is are there one two three four how many what which where colour color shape shapes "
    "red green blue yellow purple orange circle circles square squares triangle triangles top bottom left right "
    "image picture photo shows describe caption question questions options option answer answered cannot be from "
    "only letter choose correct read following text based on none yes no"
).split()


def tiny_tokenizer():
    """A small byte-level BPE tokenizer (about 450 tokens) trained in a few milliseconds on a fixed corpus of this
    project's words; deterministic. Any text encodes (bytes are the fallback); " A" .. " Z" are single tokens, as in
    Qwen's vocabulary, so option letters after an answer cue are one token. Special tokens are Qwen's
    (<|im_start|>, <|im_end|>, <|vision_start|>, <|image_pad|>, ...), with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(_TINY_WORDS[(7 * i + j) % len(_TINY_WORDS)] for j in range(12)) for i in range(300)]
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        corpus += [f"Answer: {letter}", f"{letter}. option", f"({letter})"] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=TINY_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out.chat_template = TINY_CHAT_TEMPLATE
    return out
