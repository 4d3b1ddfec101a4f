"""The sampler's requests, checked: what `Engine.generate` and `Engine.prefill` accept as prompts and parameters.

Every check runs on the host before anything is scheduled, and names the prompt (`prompts[i]`) and what was expected.
The engine calls these; they read nothing of its state but the model's vocabulary, maximum length and block size.
"""

from __future__ import annotations

import numpy as np
import torch

from caprl_core.sampler.model import ModelAdapter
from caprl_core.sampler.sequence import MultimodalPrompt, SamplingParams

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def params_list(prompts, params) -> list[SamplingParams]:
    """One SamplingParams per prompt, from None, one for all, or a list of as many as there are prompts."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts")
    if isinstance(prompts[0], int):
        raise ValueError("prompts must be a list of prompts (each a list of token ids or a dict); wrap one in [ ]")
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * len(prompts)
    params = list(params)
    if len(params) != len(prompts) or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"params must be one SamplingParams or a list of {len(prompts)}, got {len(params)} items")
    return params


def prompt_ids(adapter: ModelAdapter, index: int, prompt) -> tuple[list[int], MultimodalPrompt | None]:
    """Token ids of prompts[index] (and its multimodal inputs), checked against the model's vocabulary."""
    name = f"prompts[{index}]"
    mm = None
    if isinstance(prompt, dict):
        if "input_ids" not in prompt:
            raise ValueError(f"{name}: a dict prompt needs input_ids")
        ids_t = torch.as_tensor(prompt["input_ids"])
        if ids_t.dim() == 2 and ids_t.shape[0] == 1:
            ids_t = ids_t[0]
        mask = prompt.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ValueError(f"{name}: attention_mask has padding; pass each prompt unpadded")
    elif isinstance(prompt, torch.Tensor):
        ids_t = prompt
    elif isinstance(prompt, (list, tuple)):
        # torch.tensor infers the dtype in C: a per-token isinstance check cost ~50 ms per training step on the
        # reader's ~25k prompt tokens (profiled on the 2-core CPU).
        try:
            ids_t = torch.tensor(prompt) if prompt else torch.zeros(0, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            ids_t = None
        if ids_t is None or ids_t.dtype not in _INT_DTYPES:
            raise ValueError(f"{name}: a list prompt must hold token ids (ints)")
    else:
        raise ValueError(f"{name}: expected a list of token ids, a 1-D tensor or a dict; got {type(prompt).__name__}")
    if ids_t.dim() != 1:
        raise ValueError(f"{name}: input_ids must be 1-D (or [1, L]), got shape {tuple(ids_t.shape)}")
    if ids_t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if ids_t.is_floating_point():
        raise ValueError(f"{name}: token ids must be integers, got {ids_t.dtype}")
    ids_t = ids_t.long().cpu()
    lo, hi = int(ids_t.min()), int(ids_t.max())
    if lo < 0 or hi >= adapter.vocab_size:
        raise ValueError(f"{name}: token ids must be in [0, {adapter.vocab_size}), got [{lo}, {hi}]")
    if isinstance(prompt, dict) and prompt.get("pixel_values") is not None:
        mm = adapter.multimodal_prompt(index, ids_t, prompt)
    return ids_t.tolist(), mm


def check_fits(
    index: int, length: int, params: SamplingParams | None, most: int, block_size: int, max_len: int
) -> None:
    """ValueError unless prompts[index] (`length` tokens; params None for a prefill) could run alone in a cache of
    `most` blocks of `block_size` tokens, within the model's maximum length `max_len`."""
    name, bs = f"prompts[{index}]", block_size
    if params is None:
        if length > max_len:
            raise ValueError(f"{name} has {length} tokens, more than the model's maximum length {max_len}")
        need = -(-length // bs)
    else:
        if length >= max_len:
            raise ValueError(f"{name} has {length} tokens: no room to generate within the model's maximum "
                             f"length {max_len}")  # fmt: skip
        total = min(length + params.max_new_tokens, max_len)
        reserve = params.n - 1 if length % bs else 0
        need = max(-(-total // bs), -(-length // bs) + reserve)
    if need > most:
        raise ValueError(
            f"{name} needs {need} KV blocks of {bs} tokens (prompt {length} tokens"
            + (f" + max_new_tokens {params.max_new_tokens}, n={params.n}" if params else "")
            + f"), more than the whole KV cache can hold ({most} blocks); give a larger kv cache"
        )


def check_prefix(prefix, vocab_size: int, name: str = "shared_prefix") -> list[int]:
    """`prefill(shared_prefix=...)`, `release_kv_cache(keep_prefix=...)`: a list of token ids in [0, vocab_size)."""
    if not isinstance(prefix, (list, tuple)) or not all(isinstance(t, (int, np.integer)) for t in prefix):
        raise ValueError(f"{name} must be a list of token ids (ints)")
    if any(not 0 <= t < vocab_size for t in prefix):
        raise ValueError(f"{name}: token ids must be in [0, {vocab_size})")
    return [int(t) for t in prefix]
