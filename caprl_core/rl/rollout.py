"""The rollout phase: the step's images (`batch_examples`) and G captions for each, sampled by the policy
through the paged engine with the log-probs they were drawn with (`rollout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from caprl_core.config import TrainConfig
from caprl_core.data import Example, load_image
from caprl_core.policy import PolicyPrompter
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import Completion, SamplingParams


@dataclass
class Rollout:
    """One step's samples, image-major: sample i*G + j is caption j of image i."""

    prompts: list[dict]  # [B] policy prompt dicts
    completions: list[Completion]  # [B*G]
    captions: list[str]  # [B*G]
    truncated: torch.Tensor  # [B*G] bool: hit max_new_tokens


def batch_examples(examples: list[Example], step: int, size: int, seed: int) -> list[Example]:
    """Images of `step`: a fresh seeded permutation per pass over the data; depends on the step only (resumable)."""
    out = []
    for k in range(step * size, (step + 1) * size):
        epoch, index = divmod(k, len(examples))
        order = np.random.default_rng([seed, epoch]).permutation(len(examples))
        out.append(examples[int(order[index])])
    return out


def rollout(engine: Engine, prompter: PolicyPrompter, tokenizer, examples: list[Example], config: TrainConfig,
            step: int, first_image: int = 0) -> Rollout:  # fmt: skip
    """G captions for each of `examples`, which are images first_image, first_image + 1, ... of the step's global
    batch: each image's samples are seeded by (seed, step, its index in the global batch), whatever rank draws them."""
    r = config.rollout
    prompts = [prompter(load_image(ex.image)) for ex in examples]
    stop = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    params = [SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                             max_new_tokens=r.max_new_tokens, stop_token_ids=stop, seed=config.seed * 1_000_003 + step,
                             banned_token_ids=_vision_token_ids(tokenizer), seed_index=first_image + i)
              for i in range(len(prompts))]  # fmt: skip
    outs = engine.generate(prompts, params)
    engine.free_kv_cache()  # the update needs the memory; the next rollout allocates it again
    completions = [c for group in outs for c in group]
    captions = [tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() for c in completions]
    truncated = torch.tensor([c.finish_reason == "length" for c in completions])
    return Rollout(prompts, completions, captions, truncated)


def _vision_token_ids(tokenizer) -> tuple[int, ...]:
    """The policy must not write image placeholders: in the training forward each one counts as an image token
    and no longer matches the image's features. (For a real model their probability is ~0 anyway.)"""
    ids = []
    for token in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"):
        i = tokenizer.convert_tokens_to_ids(token)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.append(i)
    return tuple(ids)
