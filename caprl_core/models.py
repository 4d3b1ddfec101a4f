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
    *, intermediate_size: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
) -> Qwen2ForCausalLM:  # fmt: skip
    """A random Qwen2 decoder (GQA, q/k/v biases); the defaults are small enough for CPU tests. The MLP is
    2 x hidden_size wide unless intermediate_size is given."""
    torch.manual_seed(seed)
    kwargs = _text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
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
    *, seed: int = 0, dtype: torch.dtype = torch.float32,
) -> Qwen2_5_VLForConditionalGeneration:  # fmt: skip
    """A random Qwen2.5-VL (2-block vision tower, 14-px patches, 2x2 merge, M-RoPE) small enough for CPU tests.

    Its image/vision special tokens are the last ids of the vocabulary (`tiny_vl_token_ids`)."""
    torch.manual_seed(seed)
    head_dim = hidden_size // num_heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # t/h/w split of the rotary half, as 16/24/24
    section[0] += head_dim // 2 - sum(section)
    text = _text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": section}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1])  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tiny_vl_token_ids(vocab_size))
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
