"""Group-shared training forward: each image's prompt once, followed by its captions, in one packed row.

    inputs, index, num_images = shared_prefix_inputs(policy, prompts, groups, device)
    hidden = policy.model(**inputs).last_hidden_state  # [1, T, H]
    selected = hidden[0][index]  # [M, T_max, H]: the positions that predict each caption token

The G captions of an image share its prompt (and image). The unshared forward runs `prompt + caption` as its own
padded row for every caption, so the vision tower encodes the image G times and the prompt's tokens go through
every layer G times. Here a micro-batch is one row: for each image its prompt once, then the captions of that image
the micro-batch holds. A block mask lets a prompt token see the earlier tokens of its prompt, and a caption token
see its image's whole prompt and the earlier tokens of its own caption: exactly what each token sees in its own
unshared row. Positions continue from the prompt for every caption (Qwen2.5-VL: M-RoPE positions of the prompt from
`get_rope_index`, captions at max + 1 onwards on all three rows, as `get_rope_index` gives trailing text). So every
hidden state equals its unshared counterpart, and the gradient through a prompt token is the sum over the captions
that read it: what G separate copies would receive.

How tokens see each other reaches the model in one of two forms (`attention=`, default from the environment
variable CAPRL_SHARED_PREFIX_ATTENTION, else "segments"):
- "segments" (the default): no mask at all. The row's layout (each image's prompt span and caption lengths) goes
  to the language model's attention as a keyword argument, and `caprl_core.segment_attention` attends image by
  image: the prompt causally, then the G captions in one batched SDPA call over the prompt's and their own K/V.
  Memory grows linearly in the number of captions; the [T, T] mask (303 MB bool, 1.2 GB fp32 at G = 8 captions of
  2,048 tokens behind a 1,000-token prompt) and its [H, T, T] scores are never built.
- "dense": the reference. A dense [1, 1, T, T] mask (`block_mask`) handed to the model as a prepared 4D attention
  mask (transformers passes those through unchanged); SDPA (bool mask) and eager (additive float mask) take it.
Either way the mask or the layout is an argument of each layer, so gradient checkpointing's recomputation in the
backward pass sees it too, and the vision tower keeps its own attention. Measured in docs/training.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from caprl_core.segment_attention import (
    NO_MASK,
    SEGMENTS_KWARG,
    ImageSegments,
    SegmentLayout,
    base_implementation,
    use_segment_attention,
)

__all__ = ["ATTENTION_ENV", "Group", "block_mask", "shared_prefix_inputs"]

ATTENTION_ENV = "CAPRL_SHARED_PREFIX_ATTENTION"  # "segments" (default) or "dense": for tests and benchmarks


@dataclass(frozen=True, slots=True)
class Group:
    """One image's part of a packed row: its prompt index and the captions (token id lists) that follow it."""

    prompt: int  # index into the prompts list
    captions: list[list[int]]  # [k] caption token ids, in the order their rows appear in the micro-batch


def block_mask(group_ids: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """[T, T] bool: query q may attend key k. group_ids [T]: the image of each token; caption_ids [T]: a number
    unique per caption, -1 on prompt tokens. True where k <= q, both tokens belong to the same image, and k is a
    prompt token or a token of q's own caption. (Within an image the prompt comes first, so a caption token sees
    the whole prompt, and a prompt token sees only earlier prompt tokens.)"""
    n = group_ids.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=group_ids.device).tril()
    same_group = group_ids[:, None] == group_ids[None, :]
    visible_key = (caption_ids[None, :] == -1) | (caption_ids[None, :] == caption_ids[:, None])
    return causal & same_group & visible_key


def _prompt_positions(policy, prompt: dict) -> torch.Tensor:
    """Rotary positions of one prompt: [1, P] for a text model, [3, P] (M-RoPE) for Qwen2.5-VL."""
    input_ids = prompt["input_ids"]
    if "pixel_values" not in prompt:
        return torch.arange(len(input_ids))[None]
    types = prompt.get("mm_token_type_ids")
    if types is None:  # without it Qwen2.5-VL would fall back to 1-D positions (docs/sampler.md): derive it
        types = (input_ids == policy.config.image_token_id).int()
    device = policy.device
    positions, _ = policy.model.get_rope_index(input_ids[None].to(device), types.reshape(1, -1).to(device),
                                               image_grid_thw=prompt["image_grid_thw"].to(device))  # fmt: skip
    return positions[:, 0].cpu()  # [3, P]


def _attention_mask(policy, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [1, 1, T, T] mask in the form the policy's language model's attention takes."""
    decoder = getattr(policy.model, "language_model", policy.model)
    implementation = base_implementation(decoder.config._attn_implementation)  # the same after use_segment_attention
    if implementation == "sdpa":
        return allowed[None, None]
    if implementation == "eager":  # additive: 0 where allowed, the dtype's minimum elsewhere (as transformers does)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
    raise ValueError(f"shared_prefix: the policy's attention implementation {implementation!r} takes no dense "
                     f"block mask; use 'sdpa' or 'eager', or shared_prefix=False (one row per caption)")  # fmt: skip


def shared_prefix_inputs(policy, prompts: list[dict], groups: list[Group], device: torch.device,
                         attention: str | None = None) -> tuple[dict, torch.Tensor, int]:  # fmt: skip
    """Model inputs of one packed row and where the caption tokens are predicted.

    prompts: [B] prompt dicts (`input_ids` [P_b]; Qwen2.5-VL: `pixel_values`, `image_grid_thw`, optionally
    `mm_token_type_ids`). groups: the images of the row in order, each with its captions. attention: "segments" or
    "dense" (module docstring); None reads CAPRL_SHARED_PREFIX_ATTENTION, default "segments".
    Returns (kwargs for `policy.model`, index [M, T_max] into the row's T positions: entry (m, t) is the position
    whose hidden state predicts token t of the m-th caption (captions numbered in group order; 0 past a caption's
    end), the number of images whose pixels the row holds)."""
    attention = attention or os.environ.get(ATTENTION_ENV) or "segments"
    if attention not in ("segments", "dense"):
        raise ValueError(f"attention: expected 'segments' or 'dense' (or {ATTENTION_ENV}), got {attention!r}")
    ids, positions, group_ids, caption_ids, rows = [], [], [], [], []  # rows: (prompt end, caption start, length)
    segments = []  # (prompt start, prompt length, caption lengths) per image
    caption = 0
    for g, group in enumerate(groups):
        prompt = prompts[group.prompt]
        prompt_ids = prompt["input_ids"].tolist()
        if not prompt_ids:
            raise ValueError(f"prompts[{group.prompt}]: empty input_ids (a caption needs a prompt to follow)")
        pos = _prompt_positions(policy, prompt)  # [R, P]
        segments.append((len(ids), len(prompt_ids), [len(tokens) for tokens in group.captions]))
        ids += prompt_ids
        positions.append(pos)
        group_ids += [g] * len(prompt_ids)
        caption_ids += [-1] * len(prompt_ids)
        prompt_end, next_position = len(ids), int(pos.max()) + 1
        for tokens in group.captions:
            rows.append((prompt_end, len(ids), len(tokens)))
            positions.append(next_position + torch.arange(len(tokens)).expand(pos.shape[0], -1))
            ids += tokens
            group_ids += [g] * len(tokens)
            caption_ids += [caption] * len(tokens)
            caption += 1
    position_ids = torch.cat(positions, dim=1)  # [R, T]
    kwargs = {
        "input_ids": torch.tensor(ids, dtype=torch.long)[None].to(device),  # [1, T]
        "position_ids": (position_ids[:, None] if position_ids.shape[0] == 3 else position_ids).to(device),
    }
    if attention == "dense":
        allowed = block_mask(torch.tensor(group_ids, device=device), torch.tensor(caption_ids, device=device))
        kwargs["attention_mask"] = _attention_mask(policy, allowed, policy.dtype)  # [1, 1, T, T]
    else:
        use_segment_attention(policy)
        images = tuple(ImageSegments.build(*segment, device) for segment in segments)
        kwargs["attention_mask"] = NO_MASK.to(device)  # [1, 1, 0, 0]: transformers builds no mask of its own
        kwargs[SEGMENTS_KWARG] = SegmentLayout(images, len(ids))
    images = [prompts[group.prompt] for group in groups if "pixel_values" in prompts[group.prompt]]
    if images:
        kwargs["pixel_values"] = torch.cat([p["pixel_values"] for p in images]).to(device)
        kwargs["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in images]).to(device)
    return kwargs, _caption_index(rows).to(device), len(images)


def _caption_index(rows: list[tuple[int, int, int]]) -> torch.Tensor:
    """index [M, T_max]: token 0 of a caption is predicted by its prompt's last position, token t > 0 by the
    caption's own position t - 1."""
    t_max = max((n for _, _, n in rows), default=0)
    index = torch.zeros(len(rows), t_max, dtype=torch.long)
    for m, (prompt_end, start, n) in enumerate(rows):
        if n:
            index[m, 0] = prompt_end - 1
            index[m, 1:n] = start + torch.arange(n - 1)
    return index
