"""Local model directories laid out like the CapRL++ (CapRL 2.0) pair, with 2 layers and random weights: a
Qwen3-VL-4B-Instruct-style captioner and a Qwen3-4B-style answerer, for running `train` and `eval` as on the released
checkpoints without downloading any (`caprl_core.models.write_real_format_dirs` does the same for Qwen2.5).

    python scripts/make_real_format_dirs.py --out /tmp/qwen3-format --family qwen3 [--widths real]
"""

from __future__ import annotations

import json
from pathlib import Path

from caprl_core.models import REAL_VOCAB, _write_model_dir, qwen_id_tokenizer, tiny_tokenizer

__all__ = ["write_qwen3_format_dirs"]

# Hub config fields of Qwen3-VL-4B-Instruct's text part and Qwen3-4B ("real"), or small ones ("test"). head_dim is
# its own field in Qwen3 (128 for 2560 / 32 heads): the test widths keep it unequal to hidden / heads too.
REAL_TEXT = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, mrope_section=[24, 20, 20])  # fmt: skip
TEST_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                 mrope_section=[4, 4, 4])  # fmt: skip
REAL_VISION = dict(hidden_size=1024, intermediate_size=4096, num_heads=16)
TEST_VISION = dict(hidden_size=32, intermediate_size=64, num_heads=2)
# Qwen3-VL's processor: 16-px patches, 2x2 merge, temporal patch 2, mean/std 0.5. Small min/max pixels (64x64 to
# 128x128 pixels' worth: at most 16 image tokens) keep CPU runs fast.
PREPROCESSOR = {
    "min_pixels": 64 * 64, "max_pixels": 128 * 128, "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
}  # fmt: skip
# The policy's chat template: Qwen3-VL's turns for a user message of image and text parts (no tools, no video).
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The answerer's: Qwen3's turns, with the empty thinking block its template writes when thinking is off.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)


def _text_config(text: dict, vocab_size: int, tokenizer) -> dict:
    return {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id, "head_dim": text["head_dim"], "hidden_act": "silu",
        "hidden_size": text["hidden_size"], "initializer_range": 0.02, "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": 40960, "num_attention_heads": text["num_attention_heads"], "num_hidden_layers": 2,
        "num_key_value_heads": text["num_key_value_heads"], "rms_norm_eps": 1e-06, "rope_theta": 1000000,
        "tie_word_embeddings": True, "use_cache": True, "vocab_size": vocab_size,
    }  # fmt: skip


def _vl_config(text: dict, vision: dict, vocab_size: int, tokenizer) -> dict:
    """Qwen3-VL's nested hub layout: text_config (interleaved M-RoPE) and vision_config (DeepStack from both of the
    2 vision blocks, added after decoder layers 0 and 1)."""
    text_config = _text_config(text, vocab_size, tokenizer)
    text_config.update(model_type="qwen3_vl_text", rope_theta=5000000, max_position_embeddings=262144,
                       rope_scaling={"rope_type": "default", "mrope_section": text["mrope_section"],
                                     "mrope_interleaved": True})  # fmt: skip
    vision_config = {
        "deepstack_visual_indexes": [0, 1], "depth": 2, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": vision["hidden_size"], "in_channels": 3, "initializer_range": 0.02,
        "intermediate_size": vision["intermediate_size"], "model_type": "qwen3_vl", "num_heads": vision["num_heads"],
        "num_position_embeddings": 2304, "out_hidden_size": text["hidden_size"], "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    }  # fmt: skip
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}  # fmt: skip
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", **ids,
            "text_config": text_config, "vision_config": vision_config, "tie_word_embeddings": True}  # fmt: skip


def write_qwen3_format_dirs(out_dir: str | Path, *, widths: str = "test", seed: int = 0) -> tuple[Path, Path]:
    """Write `out_dir/policy` (Qwen3-VL-4B-Instruct's layout) and `out_dir/reader` (Qwen3-4B's) with random weights
    and 2 layers; returns (policy dir, reader dir). Each holds config.json (hub layout), model.safetensors (bf16),
    generation_config.json and the tokenizer with a Qwen3 chat template; the policy also preprocessor_config.json
    (16-px patches) and chat_template.json. widths "real": the 4B widths and vocabulary 151,936 with
    `qwen_id_tokenizer()`; "test": small widths and `tiny_tokenizer()`."""
    if widths not in ("test", "real"):
        raise ValueError(f"widths: expected 'test' or 'real', got {widths!r}")
    out_dir, real = Path(out_dir), widths == "real"
    tokenizer = qwen_id_tokenizer() if real else tiny_tokenizer()
    vocab_size = REAL_VOCAB if real else -(-len(tokenizer) // 64) * 64
    text, vision = (REAL_TEXT, REAL_VISION) if real else (TEST_TEXT, TEST_VISION)
    policy, reader = out_dir / "policy", out_dir / "reader"
    _write_model_dir(policy, _vl_config(text, vision, vocab_size, tokenizer), tokenizer, QWEN3_VL_CHAT_TEMPLATE, seed)
    (policy / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    (policy / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}, indent=2) + "\n")
    reader_config = _text_config(text, vocab_size, tokenizer)
    reader_config.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    _write_model_dir(reader, reader_config, tokenizer, QWEN3_CHAT_TEMPLATE, seed + 1)
    return policy, reader
