"""The update's micro-batches: the policy inputs of a set of captions (one padded `prompt + caption` row each, or
each image's prompt once followed by its captions: `caprl_core.shared_prefix`), where their tokens are, and their
log-probs under the policy through the fused lm_head op (`policy_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from caprl_core import ops
from caprl_core.rl.rollout import Rollout
from caprl_core.segment_attention import SEGMENTS_KWARG, use_segment_attention
from caprl_core.shared_prefix import Group, shared_prefix_inputs


@dataclass
class TrainingBatch:
    """One micro-batch of the update (M captions of at most T tokens): the policy's inputs and the caption targets."""

    inputs: dict  # kwargs of `policy.model`
    index: torch.Tensor  # [M, T] into the flattened forward positions: the one whose hidden state predicts each token
    targets: torch.Tensor  # [M, T], -100 past each caption's end
    sampler_logp: torch.Tensor  # [M, T] the sampler's log-probs under the unfiltered policy
    mask: torch.Tensor  # [M, T] bool, True on caption tokens
    num_tokens: int  # tokens the forward runs through the language model (padding included)
    num_images: int  # images the vision tower encodes


def training_batch(ro: Rollout, rows: list[int], group_size: int, device: torch.device, policy=None,
                    shared_prefix: bool = False) -> TrainingBatch:  # fmt: skip
    """The policy inputs of samples `rows` and where their caption tokens are: one right-padded `prompt + caption`
    row per sample, or (shared_prefix, needs `policy`) one packed row holding each image's prompt once followed by
    its captions among `rows` (`caprl_core.shared_prefix`)."""
    if shared_prefix:
        if policy is None:
            raise ValueError("policy: required with shared_prefix=True (its positions and attention mask form)")
        groups = [Group(g, [ro.completions[i].token_ids for i in rows if i // group_size == g])
                  for g in dict.fromkeys(i // group_size for i in rows)]  # fmt: skip
        inputs, index, num_images = shared_prefix_inputs(policy, ro.prompts, groups, device)
    else:
        inputs, index, num_images = _unshared_inputs(ro, rows, group_size, device)
    targets, old = _caption_targets(ro, rows)
    num_tokens = inputs["input_ids"].numel()
    return TrainingBatch(inputs, index, targets.to(device), old.to(device), (targets != -100).to(device), num_tokens,
                         num_images)  # fmt: skip


def _caption_targets(ro: Rollout, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """targets [M, T] (-100 on padding) and the sampler's log-probs [M, T] under the unfiltered policy."""
    t_max = max(len(ro.completions[i].token_ids) for i in rows)
    targets = torch.full((len(rows), t_max), -100, dtype=torch.long)
    old = torch.zeros(len(rows), t_max)
    for m, i in enumerate(rows):
        c = ro.completions[i]
        if c.policy_logprobs is None:
            raise ValueError(f"completion {i}: has no policy_logprobs (the unfiltered policy's log-probs the "
                             f"ratio needs; the Engine records them)")  # fmt: skip
        targets[m, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
        old[m, : len(c.token_ids)] = torch.tensor(c.policy_logprobs)  # what the fused kernel computes (module doc)
    return targets, old


def _unshared_inputs(ro: Rollout, rows: list[int], group_size: int,
                     device: torch.device) -> tuple[dict, torch.Tensor, int]:  # fmt: skip
    """One right-padded `prompt + caption` row per sample: (model kwargs, index [M, T] into the flattened [M*L]
    positions that predict each caption token, images in the batch). The reference for the shared forward."""
    ids = [ro.prompts[i // group_size]["input_ids"].tolist() + ro.completions[i].token_ids for i in rows]
    width = max(len(x) for x in ids)
    t_max = max(len(ro.completions[i].token_ids) for i in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    index = torch.zeros(len(rows), t_max, dtype=torch.long)
    for m, (x, i) in enumerate(zip(ids, rows, strict=True)):
        plen, n = len(ro.prompts[i // group_size]["input_ids"]), len(ro.completions[i].token_ids)
        input_ids[m, : len(x)] = torch.tensor(x)
        attention[m, : len(x)] = 1
        index[m, :n] = m * width + torch.arange(plen - 1, plen - 1 + n)  # position p predicts token p + 1
    kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
    if "pixel_values" not in ro.prompts[0]:
        return kwargs, index.to(device), 0
    prompts = [ro.prompts[i // group_size] for i in rows]
    kwargs["pixel_values"] = torch.cat([p["pixel_values"] for p in prompts]).to(device)
    kwargs["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in prompts]).to(device)
    types = torch.zeros_like(input_ids, dtype=torch.int)
    for m, p in enumerate(prompts):
        types[m, : len(p["mm_token_type_ids"])] = p["mm_token_type_ids"]
    kwargs["mm_token_type_ids"] = types.to(device)
    return kwargs, index.to(device), len(prompts)


def policy_logprobs(policy, batch: TrainingBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [M, T] and entropies [M, T] of the batch's caption tokens under the policy at `temperature`, from
    the base model's hidden states and the fused lm_head + log-softmax (no [tokens, vocab] logits)."""
    if SEGMENTS_KWARG in batch.inputs:  # a shared batch built with another model (the reference policy's KL term)
        use_segment_attention(policy)
    hidden = policy.model(**batch.inputs, use_cache=False).last_hidden_state  # [rows, L, H]: [M, L] or [1, T]
    flat = hidden.reshape(-1, hidden.shape[-1])
    selected = flat[batch.index.reshape(-1)].view(*batch.index.shape, -1)  # [M, T, H]
    head = policy.get_output_embeddings()
    return ops.linear_token_logprobs(selected, head.weight, batch.targets, bias=head.bias, temperature=temperature,
                                     return_entropy=True)  # fmt: skip
