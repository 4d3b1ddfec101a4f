"""Model shapes for the memory model (`caprl_core.memory_plan`): parameter counts per FSDP2 group, the KV cache's
bytes per token, the activations autograd saves per token of a decoder layer or vision block, from a preset (the
released models' config.json facts), a config.json directory, or a transformers config object. No weights are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "ModelDims", "TextDims", "VisionDims", "model_dims"]

FP32 = 4


@dataclass(frozen=True)
class TextDims:
    """A decoder's shape (the language model of a VLM, or a text LLM)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # tie_word_embeddings: the lm_head is the embedding matrix
    qkv_bias: bool = True  # Qwen2 / Qwen2.5: biases on q, k, v; Qwen3: none
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k


@dataclass(frozen=True)
class VisionDims:
    """A Qwen-VL vision tower's shape."""

    depth: int
    hidden: int
    intermediate: int
    heads: int
    patch: int
    temporal_patch: int
    merge: int  # spatial_merge_size: merge x merge patches become one language-model token
    out_hidden: int
    gated_mlp: bool = True  # Qwen2.5-VL: gate/up/down with biases; Qwen3-VL: fc1/fc2
    position_embeddings: int = 0  # Qwen3-VL: a learned [n, hidden] position table
    deepstack: int = 0  # Qwen3-VL: extra mergers feeding early decoder layers


@dataclass(frozen=True)
class ModelDims:
    """A model's shape: its decoder and, for a VLM, its vision tower. Parameter counts follow the Qwen2 / Qwen2.5-VL /
    Qwen3 / Qwen3-VL module layouts (tests compare them with the numel of real-format models)."""

    name: str
    text: TextDims
    vision: VisionDims | None = None

    # --- parameters --------------------------------------------------------------------------------------------
    def decoder_layer_params(self) -> int:
        t = self.text
        q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
        attention = t.hidden * (q + 2 * kv) + q * t.hidden + ((q + 2 * kv) if t.qkv_bias else 0)
        norms = 2 * t.hidden + (2 * t.head_dim if t.qk_norm else 0)
        return attention + 3 * t.hidden * t.intermediate + norms

    def vision_block_params(self) -> int:
        v = self.vision
        if v is None:
            return 0
        attention = v.hidden * 3 * v.hidden + 3 * v.hidden + v.hidden * v.hidden + v.hidden
        if v.gated_mlp:  # RMSNorm x 2 (weights only)
            return attention + 3 * v.hidden * v.intermediate + 2 * v.intermediate + v.hidden + 2 * v.hidden
        return attention + 2 * v.hidden * v.intermediate + v.intermediate + v.hidden + 4 * v.hidden  # LayerNorm x 2

    def _merger_params(self, postshuffle: bool = False) -> int:
        """A patch merger: its norm (RMSNorm over the vision width; LayerNorm, Qwen3-VL's deepstack mergers over the
        merged width) and a two-layer MLP from merge**2 patches to the decoder's width."""
        v = self.vision
        wide = v.hidden * v.merge**2
        norm = v.hidden if v.gated_mlp else 2 * (wide if postshuffle else v.hidden)
        return wide * wide + wide + wide * v.out_hidden + v.out_hidden + norm

    def root_params(self) -> int:
        """Parameters outside the decoder layers and vision blocks: the root FSDP group's."""
        t, v = self.text, self.vision
        n = t.vocab * t.hidden * (1 if t.tied else 2) + t.hidden  # embeddings (+ lm_head) and the final norm
        if v is not None:
            n += 3 * v.temporal_patch * v.patch**2 * v.hidden + (0 if v.gated_mlp else v.hidden)  # patch embedding
            n += v.position_embeddings * v.hidden
            n += self._merger_params() + v.deepstack * self._merger_params(postshuffle=True)
        return n

    def params(self) -> int:
        t, v = self.text, self.vision
        return (
            self.root_params()
            + t.layers * self.decoder_layer_params()
            + (v.depth * self.vision_block_params() if v else 0)
        )

    def largest_group_params(self) -> int:
        """The largest per-layer FSDP group: a decoder layer or a vision block."""
        return max(self.decoder_layer_params(), self.vision_block_params())

    # --- activations and caches --------------------------------------------------------------------------------
    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        t = self.text
        return 2 * t.layers * t.kv_heads * t.head_dim * dtype_bytes

    def layer_activation_bytes(self, dtype_bytes: int) -> int:
        """Bytes autograd saves per token in one decoder layer (transformers' Qwen2/Qwen3 layer, SDPA attention;
        counted tensor by tensor with saved_tensors_hooks in tests/test_memory_plan.py): each RMSNorm its fp32
        input, the normalised tensor and the output (4 + 2e bytes per element); the rotated q and k, v, the
        attention output (2 Q + 2 KV elements) and its log-sum-exp (fp32 per head); Qwen3's q/k norms (their fp32
        input and output, 4 + e); the MLP's gate, up, activation and product (4 I)."""
        t, e = self.text, dtype_bytes
        q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
        norms = 2 * (FP32 + 2 * e) * t.hidden + ((FP32 + e) * (q + kv) if t.qk_norm else 0)
        return norms + e * (2 * q + 2 * kv + 4 * t.intermediate) + FP32 * t.heads

    def vision_block_activation_bytes(self, dtype_bytes: int) -> int:
        """Bytes saved per patch in one vision block: two norms (RMSNorm as above; LayerNorm its input), q, k, v,
        the attention output and the projection's input (5 elements per channel), the MLP (gated: 4 I; fc1/fc2:
        2 I)."""
        v, e = self.vision, dtype_bytes
        if v is None:
            return 0
        norms = 2 * (FP32 + 2 * e) * v.hidden if v.gated_mlp else 2 * e * v.hidden
        return norms + e * (5 * v.hidden + (4 if v.gated_mlp else 2) * v.intermediate) + FP32 * v.heads

    def inference_bytes_per_token(self, dtype_bytes: int) -> int:
        """What a no-grad forward holds per token at its widest point: the residual stream, the normed input and
        attention output, q/k/v, and the MLP's gate, up and activation live at once."""
        t = self.text
        return dtype_bytes * (3 * t.hidden + t.heads * t.head_dim + 2 * t.kv_heads * t.head_dim + 3 * t.intermediate)


def _text_dims(c: dict) -> TextDims:
    heads = c["num_attention_heads"]
    return TextDims(
        hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        intermediate=c["intermediate_size"], vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=c.get("model_type", "").startswith(("qwen2", "qwen2_5")) or bool(c.get("attention_bias", False)),
        qk_norm=c.get("model_type", "").startswith("qwen3"),
    )  # fmt: skip


def _vision_dims(v: dict, out_hidden: int) -> VisionDims:
    qwen3 = v.get("model_type", "").startswith("qwen3") or "num_position_embeddings" in v
    return VisionDims(
        depth=v["depth"], hidden=v["hidden_size"], intermediate=v["intermediate_size"], heads=v["num_heads"],
        patch=v.get("patch_size") or v.get("spatial_patch_size", 14), temporal_patch=v.get("temporal_patch_size", 2),
        merge=v.get("spatial_merge_size", 2), out_hidden=v.get("out_hidden_size", out_hidden), gated_mlp=not qwen3,
        position_embeddings=v.get("num_position_embeddings", 0) if qwen3 else 0,
        deepstack=len(v.get("deepstack_visual_indexes", ())) if qwen3 else 0,
    )  # fmt: skip


def _dims_from_dict(name: str, c: dict) -> ModelDims:
    text = c.get("text_config") or c  # Qwen3-VL nests the decoder's config; Qwen2.5-VL's hub layout is flat
    if "model_type" not in text and "model_type" in c:
        text = {**text, "model_type": c["model_type"]}
    t = _text_dims({**text, "tie_word_embeddings": c.get("tie_word_embeddings", text.get("tie_word_embeddings"))})
    vision = c.get("vision_config")
    return ModelDims(name, t, _vision_dims(vision, t.hidden) if vision else None)


# The released models' shapes, from each model's public config.json on the Hugging Face hub (read for this table; no
# weights are needed): huggingface.co/Qwen/<name>/blob/main/config.json.
PRESETS: dict[str, ModelDims] = {
    "qwen2.5-vl-3b": ModelDims(  # Qwen/Qwen2.5-VL-3B-Instruct
        "Qwen2.5-VL-3B", TextDims(2048, 36, 16, 2, 128, 11008, 151936, tied=True),
        VisionDims(32, 1280, 3420, 16, 14, 2, 2, 2048)),
    "qwen2.5-3b": ModelDims(  # Qwen/Qwen2.5-3B-Instruct
        "Qwen2.5-3B", TextDims(2048, 36, 16, 2, 128, 11008, 151936, tied=True)),
    "qwen3-vl-4b": ModelDims(  # Qwen/Qwen3-VL-4B-Instruct (text_config / vision_config)
        "Qwen3-VL-4B", TextDims(2560, 36, 32, 8, 128, 9728, 151936, tied=True, qkv_bias=False, qk_norm=True),
        VisionDims(24, 1024, 4096, 16, 16, 2, 2, 2560, gated_mlp=False, position_embeddings=2304, deepstack=3)),
    "qwen3-4b": ModelDims(  # Qwen/Qwen3-4B (also the Instruct-2507 release)
        "Qwen3-4B", TextDims(2560, 36, 32, 8, 128, 9728, 151936, tied=True, qkv_bias=False, qk_norm=True)),
    "qwen2.5-vl-32b": ModelDims(  # Qwen/Qwen2.5-VL-32B-Instruct: the 32 B-class policy
        "Qwen2.5-VL-32B", TextDims(5120, 64, 40, 8, 128, 27648, 152064, tied=False),
        VisionDims(32, 1280, 3456, 16, 14, 2, 2, 5120)),
    "qwen2.5-vl-72b": ModelDims(  # Qwen/Qwen2.5-VL-72B-Instruct
        "Qwen2.5-VL-72B", TextDims(8192, 80, 64, 8, 128, 29568, 152064, tied=False),
        VisionDims(32, 1280, 3456, 16, 14, 2, 2, 8192)),
}  # fmt: skip


def model_dims(source: Any) -> ModelDims:
    """A model's shape from a preset name (`PRESETS`), a directory holding config.json, a config.json path, a dict, or
    a transformers config object (`to_dict()`)."""
    if isinstance(source, ModelDims):
        return source
    if isinstance(source, str) and source.lower() in PRESETS:
        return PRESETS[source.lower()]
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"model: {str(source)!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json "
                             f"or a directory holding one")  # fmt: skip
        return _dims_from_dict(path.parent.name, json.loads(path.read_text()))
    if isinstance(source, dict):
        return _dims_from_dict(source.get("_name_or_path", "model"), source)
    if hasattr(source, "to_dict"):
        return _dims_from_dict(getattr(source, "_name_or_path", "") or "model", source.to_dict())
    raise ValueError(f"model: expected a preset name, a config directory or a config object, got {type(source)}")
