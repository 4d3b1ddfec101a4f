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
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
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


def tiny_qwen3(
    vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    *, head_dim: int = 24, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None,
) -> Qwen3ForCausalLM:  # fmt: skip
    """A random Qwen3 decoder (the CapRL++ answerer's architecture): RMS norms on q and k per head, no q/k/v biases,
    and a head_dim of its own (24 here, not hidden / heads = 16, as Qwen3-4B's 128 is not 2560 / 32 = 80), so the
    sampler cannot get away with deriving it. With a `tokenizer`, its size and eos id are used."""
    torch.manual_seed(seed)
    vocab_size = len(tokenizer) if tokenizer is not None else vocab_size
    kwargs = _text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads)
    if tokenizer is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    config = Qwen3Config(**kwargs, head_dim=head_dim)
    return Qwen3ForCausalLM(config).to(dtype).eval()


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


def tiny_qwen3_vl(
    vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 3, num_heads: int = 4, num_kv_heads: int = 2,
    *, head_dim: int = 24, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None,
) -> Qwen3VLForConditionalGeneration:  # fmt: skip
    """A random Qwen3-VL (the CapRL++ captioner's architecture) small enough for CPU tests: a 2-block vision tower
    with 16-px patches, a 2x2 merge and learned position embeddings (8 x 8, interpolated to each grid), DeepStack
    features from both blocks added to the hidden states after decoder layers 0 and 1, interleaved M-RoPE, q/k norms
    and a head_dim (24) that is not hidden / heads. Special tokens as in `tiny_qwen2_5_vl`."""
    torch.manual_seed(seed)
    special = tiny_vl_token_ids(vocab_size)
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        special = {name: tokenizer.convert_tokens_to_ids(token) for name, token in VL_SPECIAL_TOKENS.items()}
    half = head_dim // 2  # the rotary half, split t/h/w and interleaved (t h w t h w ...)
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = _text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads)
    text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                    "mrope_section": section, "mrope_interleaved": True})  # fmt: skip
    if tokenizer is not None:
        text["eos_token_id"] = tokenizer.eos_token_id
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])  # fmt: skip
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **special)
    return Qwen3VLForConditionalGeneration(config).to(dtype).eval()


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


# --- directories laid out like real checkpoints --------------------------------------------------------------------

# Qwen2's special tokens at their ids in the real vocabulary (151,643 regular tokens come first; the model's
# embedding has 151,936 rows, the rest padding).
QWEN_SPECIAL_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}  # fmt: skip
# Qwen2-VL's chat template (as in Qwen2.5-VL-*-Instruct's tokenizer_config.json and chat_template.json).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5-Instruct's chat template without its tool-calling branches (the reader is never given tools).
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- else %}<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "{%- endif %}{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
# Hub-style (flat) config.json fields of Qwen2.5-VL-3B-Instruct and Qwen2.5-3B-Instruct; "real" widths keep them,
# "test" widths shrink them. Depth is always cut to 2 layers (2 vision blocks, the second with full attention).
REAL_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                 mrope_section=[16, 24, 24])  # fmt: skip
TEST_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 mrope_section=[2, 3, 3])  # fmt: skip
REAL_VISION = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112)
TEST_VISION = dict(hidden_size=32, intermediate_size=64, num_heads=2, window_size=112)
REAL_VOCAB = 151936


def qwen_id_tokenizer():
    """`tiny_tokenizer()` renumbered like Qwen2's vocabulary: its regular tokens first, unused fillers up to id
    151,642, then Qwen2's 22 special tokens at their real ids (<|im_end|> 151645, <|image_pad|> 151655, ...), so that
    a model of the real vocabulary (151,936 rows) sees the real special ids. Encodes text as `tiny_tokenizer()` does;
    the fillers are never produced (no merge leads to them)."""
    import json

    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tiny_tokenizer().backend_tokenizer.to_str())
    specials = {t["content"] for t in data["added_tokens"]}
    regular = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    first_special = min(QWEN_SPECIAL_IDS.values())
    vocab = {t: i for i, t in enumerate(regular)}
    vocab.update({f"<|unused_{i}|>": i for i in range(len(regular), first_special)})
    vocab.update(QWEN_SPECIAL_IDS)
    data["model"]["vocab"] = vocab
    data["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_IDS])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out.chat_template = TINY_CHAT_TEMPLATE
    return out


def _hub_text_config(text: dict, vocab_size: int, tokenizer, architecture: str, model_type: str) -> dict:
    return {
        "architectures": [architecture], "attention_dropout": 0.0, "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id, "hidden_act": "silu", "hidden_size": text["hidden_size"],
        "initializer_range": 0.02, "intermediate_size": text["intermediate_size"], "max_position_embeddings": 32768,
        "max_window_layers": 70, "model_type": model_type, "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": 2, "num_key_value_heads": text["num_key_value_heads"], "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": vocab_size,
    }  # fmt: skip


def _hub_vl_config(text: dict, vision: dict, vocab_size: int, tokenizer) -> dict:
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in VL_SPECIAL_TOKENS.items()}
    config = _hub_text_config(text, vocab_size, tokenizer, "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl")
    config.update(
        ids, vision_token_id=tokenizer.convert_tokens_to_ids("<|vision_pad|>"), max_position_embeddings=128000
    )
    config["rope_scaling"] = {"type": "mrope", "mrope_section": text["mrope_section"]}
    config["vision_config"] = {
        "depth": 2, "hidden_act": "silu", "hidden_size": vision["hidden_size"], "in_chans": 3,
        "intermediate_size": vision["intermediate_size"], "num_heads": vision["num_heads"],
        "out_hidden_size": text["hidden_size"], "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": vision["window_size"],
        "fullatt_block_indexes": [1],
    }  # fmt: skip
    return config


def _write_model_dir(directory: Path, config: dict, tokenizer, chat_template: str, seed: int) -> None:
    """Random weights for the hub-style `config` (saved in bf16, as released), its config.json as given (not
    transformers' re-serialisation), a generation_config.json like the Instruct models', and the tokenizer."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(seed)
    parsed = AutoConfig.from_pretrained(directory, local_files_only=True)
    auto = AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM
    model = auto.from_config(parsed, dtype=torch.float32).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # the hub's flat layout
    generation = {"bos_token_id": tokenizer.pad_token_id, "pad_token_id": tokenizer.pad_token_id, "do_sample": True,
                  "eos_token_id": [tokenizer.eos_token_id, tokenizer.pad_token_id], "repetition_penalty": 1.05,
                  "temperature": 0.7, "top_p": 0.8, "top_k": 20}  # fmt: skip
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.chat_template = chat_template
    # tokenizer_config.json holds the chat template, as in the released Qwen2.5 directories.
    tokenizer.save_pretrained(directory, save_jinja_files=False)


def write_real_format_dirs(out_dir: str | Path, *, widths: str = "test", seed: int = 0) -> tuple[Path, Path]:
    """Write `out_dir/policy` (Qwen2.5-VL-3B-Instruct's layout) and `out_dir/reader` (Qwen2.5-3B-Instruct's) with
    random weights and 2 layers; returns (policy dir, reader dir).

    Each holds config.json (the hub's flat layout: architectures, token ids, M-RoPE sections, vision config),
    model.safetensors (bf16), generation_config.json, and tokenizer.json + tokenizer_config.json with the Qwen chat
    template; the policy also preprocessor_config.json (Qwen2VLImageProcessor: 14-px patches, 2x2 merge, temporal
    patch 2, CLIP mean/std) and chat_template.json, as the processor ships them. min/max_pixels are small (56x56 to
    112x112 pixels' worth: at most 16 image tokens) so CPU runs stay fast.
    widths "real": the real widths (hidden 2048, MLP 11008, 16 heads / 2 KV heads, vision 1280 wide, vocab 151,936)
    with `qwen_id_tokenizer()`; "test": small widths and `tiny_tokenizer()` (vocab padded to a multiple of 64)."""
    import json

    if widths not in ("test", "real"):
        raise ValueError(f"widths: expected 'test' or 'real', got {widths!r}")
    out_dir = Path(out_dir)
    real = widths == "real"
    tokenizer = qwen_id_tokenizer() if real else tiny_tokenizer()
    vocab_size = REAL_VOCAB if real else -(-len(tokenizer) // 64) * 64
    text, vision = (REAL_TEXT, REAL_VISION) if real else (TEST_TEXT, TEST_VISION)
    policy, reader = out_dir / "policy", out_dir / "reader"
    _write_model_dir(policy, _hub_vl_config(text, vision, vocab_size, tokenizer), tokenizer, QWEN_VL_CHAT_TEMPLATE,
                     seed)  # fmt: skip
    preprocessor = {
        "min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }  # fmt: skip
    (policy / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (policy / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_VL_CHAT_TEMPLATE}, indent=2) + "\n")
    reader_config = _hub_text_config(text, vocab_size, tokenizer, "Qwen2ForCausalLM", "qwen2")
    _write_model_dir(reader, reader_config, tokenizer, QWEN_CHAT_TEMPLATE, seed + 1)
    return policy, reader
