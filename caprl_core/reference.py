"""Plain PyTorch reference of every fused op: the ground truth the tests trust, and the slow fallback.

Each function here is the *definition* of its op (see docs/ops.md): readable in one screen,
differentiable by autograd, and computed in fp32 (fp64 for fp64 inputs). The kernels in `kernels/`, `csrc/cpu`
and `csrc/cuda` must agree with these. Arguments are assumed valid: `caprl_core.ops` checks them first.
"""

from __future__ import annotations

import torch

ADVANTAGE_METHODS = ("grpo", "rloo")
ADVANTAGE_SCALES = ("group", "batch", "none")
MCQ_MODES = ("hard", "soft")
MCQ_NORMALIZE = ("options", "vocab")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype of every op: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`log_softmax(logits / T)[targets]` per token; 0 where `targets == ignore_index`.

    logits: [..., V]; targets: [...]. Returns logp [...] (and the entropy of softmax(logits / T) [...], also 0
    on ignored tokens).
    """
    z = logits.to(acc_dtype(logits.dtype)) / temperature  # [..., V]
    logp_all = torch.log_softmax(z, dim=-1)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    # 0 log 0 = 0: a -inf logit (a masked vocabulary entry) has no mass and adds nothing to the entropy. Masking
    # log p (not the product) also keeps its gradient finite: d(p log p)/dp would be log 0 = -inf, times 0.
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return logp, torch.where(keep, entropy, torch.zeros_like(entropy))


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs(hidden @ weight.T + bias, targets)`, materialising the logits (that is the point of
    the reference). hidden: [..., H]; weight: [V, H]; bias: [V]; targets: [...]."""
    acc = acc_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).T  # [..., V]
    if bias is not None:
        logits = logits + bias.to(acc)
    return token_logprobs(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )


def dense_group_index(
    n: int, group_size: int | None, group_ids: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Map `group_size` (contiguous groups) or arbitrary integer `group_ids` to dense ids in [0, G).

    Returns (group_index [N] int64, G)."""
    if group_ids is None:
        assert group_size is not None
        return torch.arange(n, device=device) // group_size, n // group_size
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse.reshape(-1).to(device), int(uniq.numel())


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    method: str = "grpo",
    scale: str = "group",
    weights: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages, [N] or [N, R] rewards -> [N].

    method "grpo": r - mean of the group; "rloo": r - mean of the *other* members, = G/(G-1) * (r - mean).
    scale "group": / (unbiased std of the group + eps); "batch": / (unbiased std of all N rewards + eps), as TRL's
    `scale_rewards="batch"`; "none": no division (Dr.GRPO). A group whose rewards are all equal (a group of one
    included) gets exactly 0. [N, R] rewards: each column is normalised on its own, then summed with `weights`
    (default all ones): decoupled normalisation, as in GDPO.
    """
    acc = acc_dtype(rewards.dtype)
    r = rewards.to(acc)
    r = r[:, None] if r.ndim == 1 else r  # [N, R]
    n = r.shape[0]
    index, num_groups = dense_group_index(n, group_size, group_ids, r.device)
    count = torch.bincount(index, minlength=num_groups).to(acc)[:, None]  # [G, 1]
    mean = torch.zeros(num_groups, r.shape[1], dtype=acc, device=r.device).index_add_(0, index, r) / count
    centered = r - mean[index]  # [N, R]
    sq = torch.zeros_like(mean).index_add_(0, index, centered * centered)
    std = (sq / (count - 1).clamp_min(1)).sqrt()  # unbiased, [G, R]
    if method == "rloo":
        centered = centered * (count / (count - 1).clamp_min(1))[index]
    if scale == "group":
        centered = centered / (std[index] + eps)
    elif scale == "batch":
        batch_std = r.std(dim=0, unbiased=True) if n > 1 else torch.zeros(r.shape[1], dtype=acc, device=r.device)
        centered = centered / (batch_std + eps)
    expand = index[:, None].expand_as(r)
    gmax = torch.full_like(mean, -torch.inf).scatter_reduce(0, expand, r, "amax")
    gmin = torch.full_like(mean, torch.inf).scatter_reduce(0, expand, r, "amin")
    flat = (gmax == gmin)[index]  # [N, R]: zero-variance groups
    adv = torch.where(flat, torch.zeros_like(centered), centered)
    w = torch.ones(r.shape[1], dtype=acc, device=r.device) if weights is None else weights.to(acc)
    return adv @ w


def mcq_rewards(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    option_token_ids: torch.Tensor,
    answers: torch.Tensor,
    caption_index: torch.Tensor,
    num_captions: int,
    *,
    num_options: torch.Tensor | int | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mode: str = "hard",
    normalize: str = "options",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score P reader prompts on their options and reduce to one reward per caption.

    hidden: [P, H] last-position hidden states; weight: [V, H] reader lm_head; answers: [P] index of the right
    option slot; caption_index: [P] in [0, C); num_options: None (all K), an int, or [P].
    normalize "options": option_token_ids [K] or [P, K], one token per option; option logits are
    `hidden @ weight[ids].T + bias[ids]`; option_logprobs [P, K] is the log-softmax of logits / T over the first
    num_options[p] slots (-inf beyond). Hard: a prompt scores 1 when its answer's logit is strictly above every other
    valid option's (ties score 0; temperature does not change the order). Soft: the probability of the answer.
    normalize "vocab": option_token_ids is token_options [V], the slot in [0, K) each token decides or -1, K =
    max(num_options); see `mcq_vocab_logprobs`. Soft: the vocabulary mass of the answer's tokens; hard: 1 when that
    mass is strictly above every other slot's (all K slots). rewards [C]: mean score over each caption's prompts.
    """
    acc = acc_dtype(hidden.dtype)
    if normalize == "vocab":
        k = int(torch.as_tensor(num_options).max())
        option_logprobs = mcq_vocab_logprobs(hidden, weight, option_token_ids, k, bias=bias, temperature=temperature)
        score = mcq_scores(option_logprobs, answers, mode)
        return caption_means(score, caption_index, num_captions), option_logprobs
    p, k = hidden.shape[0], option_token_ids.shape[-1]
    ids = option_token_ids.long().expand(p, k)  # [P, K]
    logits = torch.einsum("ph,pkh->pk", hidden.to(acc), weight.to(acc)[ids])  # [P, K]
    if bias is not None:
        logits = logits + bias.to(acc)[ids]
    if num_options is None:
        num_options = k
    n_opt = torch.as_tensor(num_options, device=hidden.device).long().expand(p)
    valid = torch.arange(k, device=hidden.device)[None, :] < n_opt[:, None]  # [P, K]
    logits = logits.masked_fill(~valid, -torch.inf)
    option_logprobs = torch.log_softmax(logits / temperature, dim=-1)
    # hard mode compares the raw logits: dividing by T could merge two close logits
    score = mcq_scores(logits if mode == "hard" else option_logprobs, answers, mode)
    return caption_means(score, caption_index, num_captions), option_logprobs


def mcq_vocab_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_options: torch.Tensor,
    num_slots: int,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[P, K] log of the mass, under softmax((hidden @ weight.T + bias) / T) over the whole vocabulary, of the tokens
    whose token_options [V] entry is k (-inf for a slot no token decides). Materialises the [P, V] logits."""
    acc = acc_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).T  # [P, V]
    if bias is not None:
        logits = logits + bias.to(acc)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [P, V]
    slots = token_options.long().to(hidden.device)
    per_slot = [torch.logsumexp(logp.masked_fill(slots != k, -torch.inf), dim=-1) for k in range(num_slots)]
    return torch.stack(per_slot, dim=1)  # [P, K]


def mcq_scores(values: torch.Tensor, answers: torch.Tensor, mode: str) -> torch.Tensor:
    """[P] scores from per-slot values [P, K] (logits or log-probs, -inf on slots that cannot win): hard, 1 when
    the answer's value is strictly above every other slot's (a tie, or an answer at -inf, scores 0); soft,
    exp(value) of the answer (the values must be log-probs)."""
    answers = answers.long()[:, None]
    answer_value = values.gather(1, answers).squeeze(1)
    if mode == "soft":
        return answer_value.exp()
    others = values.scatter(1, answers, -torch.inf).amax(dim=1)
    return (answer_value > others).to(values.dtype)


def caption_means(score: torch.Tensor, caption_index: torch.Tensor, num_captions: int) -> torch.Tensor:
    """rewards [C]: the mean of score [P] over each caption's prompts (every caption has at least one)."""
    caption_index = caption_index.long()
    total = torch.zeros(num_captions, dtype=score.dtype, device=score.device).index_add_(0, caption_index, score)
    return total / torch.bincount(caption_index, minlength=num_captions).to(score.dtype)
