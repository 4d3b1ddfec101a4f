"""Attention of the group-shared update forward without a [T, T] mask: segment by segment.

A packed row (`caprl_core.shared_prefix`) holds, per image, its prompt (P tokens) followed by its G captions (L_g
tokens each). A prompt token attends causally within its prompt; a token of caption g attends to the whole prompt
and causally within caption g. Instead of a dense [1, 1, T, T] mask over the row (T = sum of P + sum of L_g: 303 MB
bool at G = 8 captions of 2,048 tokens behind a 1,000-token prompt, and SDPA's scores [H, T, T] on top), each image
costs two SDPA calls:

    prompt:   sdpa(q[P], k[P], v[P], is_causal=True)                       # scores [H, P, P]
    captions: sdpa(q[G, L], cat(k[P], k[G, L]), ..., mask [L, P + L])      # scores [G, H, L, P + L]

(captions padded to the longest, L; a padded query row sees only padding and its prompt, and is dropped; a padded
key is seen only by padded queries, so the causal mask over the caption part is the whole mask). Memory per head is
O(P^2 + G L (P + L)): linear in the number of captions. The result equals the dense mask's up to float rounding
(`tests/test_shared_prefix_attention.py`).

How it reaches the model: `use_segment_attention(model)` switches the language model's attention implementation to
one registered with transformers' `AttentionInterface` ("caprl_shared_prefix", or "caprl_shared_prefix_eager" over
eager attention). With a `SegmentLayout` in the forward's keyword arguments (`SEGMENTS_KWARG`: transformers hands
extra keyword arguments down to every attention call, for Qwen2, Qwen2.5-VL and Qwen3-VL alike) it attends segment
by segment; without one it is the implementation it replaced (same function, same mask function), so every other
forward of the model is unchanged. The switch is permanent rather than a context around the forward because
gradient checkpointing recomputes each layer during the backward pass, after such a context would have ended; the
layout, an argument of each layer, is recomputed with. A layout forward passes `NO_MASK` (an empty 4D mask) as its
attention mask: transformers returns a prepared 4D mask as is, where with no mask it would build a [T, T] one from
the packed positions. The vision tower keeps its own implementation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

__all__ = [
    "NO_MASK",
    "SEGMENTS_KWARG",
    "SegmentLayout",
    "base_implementation",
    "segment_attention",
    "use_segment_attention",
]

SEGMENTS_KWARG = "shared_prefix_segments"
NO_MASK = torch.ones(1, 1, 0, 0, dtype=torch.bool)  # marks a layout forward; any attention that reads it fails loudly
_IMPLEMENTATIONS = {"sdpa": "caprl_shared_prefix", "eager": "caprl_shared_prefix_eager"}  # base -> ours


@dataclass(frozen=True)
class ImageSegments:
    """One image's part of a packed row: its prompt [start, start + prompt_length), then its captions."""

    start: int
    prompt_length: int
    caption_index: torch.Tensor  # [G, L] long: row position of token j of caption g (padding: the caption's start)
    kept: torch.Tensor  # [sum L_g] long: rows of the flattened [G * L] caption outputs that are real tokens
    mask: torch.Tensor  # [L, P + L] bool: the whole prompt, then causal within the caption

    @classmethod
    def build(cls, start: int, prompt_length: int, caption_lengths: list[int], device: torch.device) -> ImageSegments:
        width = max(caption_lengths, default=0)
        index = torch.zeros(len(caption_lengths), width, dtype=torch.long)
        kept, first = [], start + prompt_length
        for g, n in enumerate(caption_lengths):
            index[g] = first + torch.arange(width).clamp(max=max(n - 1, 0))
            kept.append(g * width + torch.arange(n))
            first += n
        mask = torch.ones(width, width, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(width, prompt_length, dtype=torch.bool), mask], dim=1)
        kept = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
        return cls(start, prompt_length, index.to(device), kept.to(device), mask.to(device))


@dataclass(frozen=True)
class SegmentLayout:
    """The images of a packed row, in order; together they cover the row's `length` positions."""

    images: tuple[ImageSegments, ...]
    length: int


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: SegmentLayout, *,
                      scaling: float, dropout: float = 0.0) -> torch.Tensor:  # fmt: skip
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (Hq a multiple of Hkv) -> [1, T, Hq, D] (transformers' layout)."""
    if query.shape[0] != 1 or query.shape[2] != layout.length:
        raise ValueError(f"query: expected [1, H, {layout.length}, D] (one packed row), got {list(query.shape)}")
    q, k, v = query[0], key[0], value[0]  # [H, T, D]
    gqa = q.shape[0] != k.shape[0]
    pieces = []
    for image in layout.images:
        prompt = slice(image.start, image.start + image.prompt_length)
        kp, vp = k[:, prompt], v[:, prompt]  # [Hkv, P, D]
        pieces.append(F.scaled_dot_product_attention(q[:, prompt], kp, vp, dropout_p=dropout, is_causal=True,
                                                     scale=scaling, enable_gqa=gqa))  # fmt: skip  # [Hq, P, D]
        if image.kept.numel():
            pieces.append(_caption_attention(q, k, v, kp, vp, image, scaling, dropout, gqa))  # [Hq, sum L_g, D]
    return torch.cat(pieces, dim=1).transpose(0, 1)[None]  # [1, T, Hq, D]


def _caption_attention(q, k, v, kp, vp, image: ImageSegments, scaling: float, dropout: float,
                       gqa: bool) -> torch.Tensor:  # fmt: skip
    """The captions of one image, padded to one batch: [Hq, sum L_g, D]."""
    g, width = image.caption_index.shape
    index = image.caption_index.reshape(-1)
    qc = q[:, index].unflatten(1, (g, width)).transpose(0, 1)  # [G, Hq, L, D]
    keys = torch.cat([kp.expand(g, -1, -1, -1), k[:, index].unflatten(1, (g, width)).transpose(0, 1)], dim=2)
    values = torch.cat([vp.expand(g, -1, -1, -1), v[:, index].unflatten(1, (g, width)).transpose(0, 1)], dim=2)
    out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=image.mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=gqa)  # fmt: skip  # [G, Hq, L, D]
    return out.transpose(0, 1).flatten(1, 2)[:, image.kept]


def _base_attention(module, implementation: str):
    if implementation == "sdpa":
        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward  # the model file's own eager attention


def base_implementation(implementation: str) -> str:
    """The implementation that `implementation` stands for: 'sdpa' for "caprl_shared_prefix", itself otherwise."""
    return next((base for base, ours in _IMPLEMENTATIONS.items() if ours == implementation), implementation)


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered function: segment attention with a layout in kwargs, the replaced implementation without."""
    layout = kwargs.pop(SEGMENTS_KWARG, None)
    if layout is None:
        base = base_implementation(module.config._attn_implementation)
        return _base_attention(module, base)(module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, **kwargs)  # fmt: skip
    if kwargs.get("sliding_window") is not None:
        raise ValueError("shared_prefix: sliding-window attention is not supported by the segment attention")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return segment_attention(query, key, value, layout, scaling=scale, dropout=dropout), None


for _base, _ours in _IMPLEMENTATIONS.items():
    AttentionInterface.register(_ours, _attention_forward)
    AttentionMaskInterface.register(_ours, ALL_MASK_ATTENTION_FUNCTIONS[_base])


def use_segment_attention(model) -> None:
    """Switch the language model of `model` (a *ForCausalLM, Qwen2.5-VL or Qwen3-VL) to the segment-capable
    attention wrapping its current one ('sdpa' or 'eager'); idempotent."""
    decoder = getattr(model.model, "language_model", model.model)
    implementation = decoder.config._attn_implementation
    if implementation in _IMPLEMENTATIONS.values():
        return
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"shared_prefix: the policy's attention implementation {implementation!r} is not one the "
                         f"segment attention wraps; use 'sdpa' or 'eager', or shared_prefix=False (one row per "
                         f"caption)")  # fmt: skip
    decoder.config._attn_implementation = _IMPLEMENTATIONS[implementation]
