"""The public fused ops of caprl-core: argument checks, autograd Functions and backend dispatch.

    from caprl_core import ops
    logp = ops.linear_token_logprobs(hidden, model.lm_head.weight, targets)     # never builds [N, V] logits
    adv = ops.group_advantages(rewards, group_size=8, method="rloo")
    rewards, option_logprobs = ops.mcq_rewards(h, reader.lm_head.weight, letter_ids, answers, caption_index, C)

Contracts are in docs/ops.md and the docstrings below; `caprl_core.reference` is their
executable definition. Every op takes `backend=` ("triton", "cuda", "cpu", "torch"; default by device, or the
CAPRL_BACKEND environment variable), see `caprl_core.backends`. Outputs are fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

from types import ModuleType

import torch

from caprl_core import _checks as check
from caprl_core import backends, reference


def _kernels(op: str, device: torch.device, backend: str | None) -> ModuleType | None:
    """The kernel module chosen for `op`, or None for the PyTorch reference."""
    name = backends.select(op, device, backend)
    return None if name == "torch" else backends.load(name)


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """View x as [rows, width] with a unit stride along the last dim (copying only when it must)."""
    x = x.reshape(-1, width)
    return x if x.stride(-1) == 1 else x.contiguous()


def _grads(grads: tuple[torch.Tensor | None, ...], like: torch.Tensor, count: int) -> list[torch.Tensor | None]:
    """Upstream gradients as contiguous tensors in the accumulation dtype of `like` (None stays None)."""
    out = [None if g is None else g.to(like.dtype).contiguous() for g in grads]
    return out + [None] * (count - len(out))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, return_entropy, kernels):
        logp, lse, entropy = kernels.token_logprobs_fwd(logits, targets, temperature, ignore_index, return_entropy)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.args = (temperature, ignore_index, kernels)
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, *grads):
        logits, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, kernels = ctx.args
        grad_logp, grad_entropy = _grads(grads, lse, 2)
        grad_logits = kernels.token_logprobs_bwd(
            logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index
        )
        return grad_logits, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token under `softmax(logits / temperature)`, in one pass over the vocab.

    logits: [..., V] (any float dtype; differentiable); targets: [...] integer ids in [0, V) or `ignore_index`.
    Returns logp [...] (fp32), 0 with no gradient where targets == ignore_index; with `return_entropy`, also the
    entropy of softmax(logits / T) per token [...] (0 on ignored tokens), also differentiable.
    """
    logits, targets = check.floating("logits", logits), check.integer("targets", targets)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    check.shape("targets", targets, logits.shape[:-1], "logits.shape[:-1]")
    check.same_device([("logits", logits), ("targets", targets)])
    temperature = check.temperature(temperature)
    vocab = logits.shape[-1]
    check.index_range("targets", targets, vocab, ignore=ignore_index)
    kernels = _kernels("token_logprobs", logits.device, backend) if targets.numel() else None
    if kernels is None:
        return reference.token_logprobs(
            logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    flat_targets = targets.reshape(-1).long().contiguous()
    out = _TokenLogprobs.apply(_rows(logits, vocab), flat_targets, temperature, ignore_index, return_entropy, kernels)
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy, kernels):
        logp, lse, entropy = kernels.linear_token_logprobs_fwd(
            hidden, weight, bias, targets, temperature, ignore_index, return_entropy
        )
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.args = (temperature, ignore_index, kernels)
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, kernels = ctx.args
        grad_logp, grad_entropy = _grads(grads, lse, 2)
        grad_hidden, grad_weight, grad_bias = kernels.linear_token_logprobs_bwd(
            hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index
        )
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs(hidden @ weight.T + bias, targets, ...)` without ever holding the [N, V] logits.

    hidden: [..., H]; weight: [V, H] (the lm_head weight); bias: [V] or None; targets: [...]. hidden, weight and
    bias share one float dtype. Differentiable w.r.t. hidden, weight and bias; the backward recomputes logits
    tile by tile. Returns logp [...] (and entropy [...]) as `token_logprobs` does.
    """
    hidden, weight = check.floating("hidden", hidden), check.floating("weight", weight)
    targets = check.integer("targets", targets)
    if hidden.ndim < 1:
        raise ValueError(f"hidden: expected shape [..., H], got {tuple(hidden.shape)}")
    check.ndim("weight", weight, 2)
    check.shape("weight", weight, (weight.shape[0], hidden.shape[-1]), "[V, H] with H = hidden.shape[-1]")
    check.same_dtype("weight", weight, "hidden", hidden)
    if weight.shape[0] < 1:
        raise ValueError("weight: expected V >= 1 rows, got 0")
    if bias is not None:
        check.floating("bias", bias)
        check.shape("bias", bias, (weight.shape[0],), "[V]")
        check.same_dtype("bias", bias, "hidden", hidden)
    check.shape("targets", targets, hidden.shape[:-1], "hidden.shape[:-1]")
    check.same_device([("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)])
    temperature = check.temperature(temperature)
    check.index_range("targets", targets, weight.shape[0], ignore=ignore_index)
    kernels = _kernels("linear_token_logprobs", hidden.device, backend) if targets.numel() else None
    if kernels is None:
        return reference.linear_token_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy,
        )  # fmt: skip
    out = _LinearTokenLogprobs.apply(
        _rows(hidden, hidden.shape[-1]), weight if weight.stride(-1) == 1 else weight.contiguous(),
        None if bias is None else bias.contiguous(), targets.reshape(-1).long().contiguous(), temperature, ignore_index,
        return_entropy, kernels,
    )  # fmt: skip
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    method: str = "grpo",
    scale: str = "group",
    weights: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """Group-relative advantages of N samples, one launch on the chosen backend.

    rewards: [N] or [N, R] (R reward components, normalised separately then summed with `weights` [R]).
    Exactly one of `group_size` (contiguous groups of that size; must divide N) or `group_ids` ([N] integers,
    any values, ragged groups allowed). method: "grpo" (r - group mean) or "rloo" (r - mean of the others).
    scale: "group" (/ (unbiased group std + eps), GRPO), "batch" (/ (unbiased std of the whole batch + eps),
    as TRL's scale_rewards="batch"), "none" (Dr.GRPO). Groups whose rewards are all equal get exactly 0.
    Returns adv [N] (fp32; fp64 for fp64 rewards), not differentiable.
    """
    rewards = check.floating("rewards", rewards)
    check.ndim("rewards", rewards, 1, 2)
    n, num_rewards = rewards.shape[0], (rewards.shape[1] if rewards.ndim == 2 else 1)
    if n < 1 or num_rewards < 1:
        raise ValueError(f"rewards: expected at least one sample and one component, got {tuple(rewards.shape)}")
    check.finite("rewards", rewards)
    check.choice("method", method, reference.ADVANTAGE_METHODS)
    check.choice("scale", scale, reference.ADVANTAGE_SCALES)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    if (group_size is None) == (group_ids is None):
        raise ValueError("group_size, group_ids: expected exactly one of them")
    if group_size is not None:
        check.positive_int("group_size", group_size)
        if n % group_size:
            raise ValueError(f"group_size: expected a divisor of N={n}, got {group_size}")
    else:
        check.integer("group_ids", group_ids)
        check.shape("group_ids", group_ids, (n,), "[N] with N = rewards.shape[0]")
    if weights is not None:
        check.floating("weights", weights)
        check.shape("weights", weights, (num_rewards,), "[R] with R = rewards.shape[1]")
        check.finite("weights", weights)
    check.same_device([("rewards", rewards), ("group_ids", group_ids), ("weights", weights)])
    kernels = _kernels("group_advantages", rewards.device, backend)
    if kernels is None:
        return reference.group_advantages(
            rewards, group_size=group_size, group_ids=group_ids, method=method, scale=scale, weights=weights, eps=eps
        )
    acc = reference.acc_dtype(rewards.dtype)
    index, num_groups = reference.dense_group_index(n, group_size, group_ids, rewards.device)
    w = torch.ones(num_rewards, dtype=acc, device=rewards.device) if weights is None else weights.to(acc)
    r2 = rewards.detach().to(acc).reshape(n, num_rewards).contiguous()
    return kernels.group_advantages(r2, index.contiguous(), num_groups, method, scale, w.contiguous(), float(eps))


def _mcq_option_args(option_token_ids, num_options, p: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked option ids [P, K] (int64) and per-prompt option counts [P] (int64)."""
    check.integer("option_token_ids", option_token_ids)
    check.ndim("option_token_ids", option_token_ids, 1, 2)
    k = option_token_ids.shape[-1]
    if option_token_ids.ndim == 2:
        check.shape("option_token_ids", option_token_ids, (p, k), "[P, K] with P = hidden.shape[0]")
    if k < 1:
        raise ValueError("option_token_ids: expected K >= 1 option slots, got 0")
    check.same_device([("hidden", torch.empty(0, device=device)), ("option_token_ids", option_token_ids)])
    check.index_range("option_token_ids", option_token_ids, vocab)
    ids = option_token_ids.long().expand(p, k).contiguous()
    if num_options is None:
        return ids, torch.full((p,), k, dtype=torch.long, device=device)
    return ids, _mcq_option_counts(num_options, p, k, f"K={k}", device)


def _mcq_option_counts(num_options, p: int, max_slots: int, limit: str, device) -> torch.Tensor:
    """Checked per-prompt option counts [P] (int64) in [1, max_slots] from an int or a [P] tensor."""
    if isinstance(num_options, torch.Tensor):
        check.integer("num_options", num_options)
        check.shape("num_options", num_options, (p,), "[P]")
        check.same_device([("hidden", torch.empty(0, device=device)), ("num_options", num_options)])
        counts = num_options.long()
    elif isinstance(num_options, int) and not isinstance(num_options, bool):
        counts = torch.full((p,), num_options, dtype=torch.long, device=device)
    else:
        raise ValueError(f"num_options: expected None, an int or a [P] tensor, got {type(num_options).__name__}")
    if bool(((counts < 1) | (counts > max_slots)).any()):
        bad = int(((counts < 1) | (counts > max_slots)).nonzero()[0])
        raise ValueError(f"num_options: expected values in [1, {limit}], got {int(counts[bad])} at index {bad}")
    return counts.contiguous()


# Vocab mode keeps one running log-sum-exp per slot in registers (the Triton kernel unrolls over K), so K is bounded.
# 16 is well above the 9 letters A-I that CapRL's answer parser reads.
MCQ_MAX_VOCAB_SLOTS = 16


def _mcq_vocab_args(token_options, num_options, p: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Vocab mode: checked token_options [V] (int64, values in [-1, K)), option counts [P] (int64) and K."""
    check.integer("option_token_ids", token_options)
    check.shape("option_token_ids", token_options, (vocab,), "token_options [V] with V = weight.shape[0] in vocab mode")
    check.same_device([("hidden", torch.empty(0, device=device)), ("option_token_ids", token_options)])
    if num_options is None:
        raise ValueError("num_options: required with normalize='vocab' (an int, or [P] option counts)")
    counts = _mcq_option_counts(num_options, p, MCQ_MAX_VOCAB_SLOTS, f"{MCQ_MAX_VOCAB_SLOTS} (vocab mode)", device)
    k = int(counts.max())
    bad = (token_options < -1) | (token_options >= k)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ValueError(
            f"option_token_ids: expected token_options values in [-1, K={k}) (K = max(num_options)), "
            f"got {int(token_options[first])} at index {first}"
        )
    return token_options.long().contiguous(), counts, k


def _check_reader_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """mcq_rewards' hidden [P, H], weight [V, H] and bias [V] checked: floating, the same dtype and device, P >= 1."""
    hidden, weight = check.floating("hidden", hidden), check.floating("weight", weight)
    check.ndim("hidden", hidden, 2)
    check.ndim("weight", weight, 2)
    if hidden.shape[0] < 1:
        raise ValueError("hidden: expected at least one prompt (P >= 1), got 0")
    check.shape("weight", weight, (weight.shape[0], hidden.shape[1]), "[V, H] with H = hidden.shape[1]")
    check.same_dtype("weight", weight, "hidden", hidden)
    check.same_device([("hidden", hidden), ("weight", weight), ("bias", bias)])
    if bias is not None:
        check.floating("bias", bias)
        check.shape("bias", bias, (weight.shape[0],), "[V]")
        check.same_dtype("bias", bias, "hidden", hidden)
    return hidden, weight


def _prompts_per_caption(caption_index: torch.Tensor, num_captions: int) -> torch.Tensor:
    """[C] prompts of each caption; every caption must have one (caption_index checked to lie in [0, C))."""
    check.index_range("caption_index", caption_index, num_captions)
    per_caption = torch.bincount(caption_index.long(), minlength=num_captions)
    if bool((per_caption == 0).any()):
        missing = int((per_caption == 0).nonzero()[0])
        raise ValueError(f"caption_index: caption {missing} of num_captions={num_captions} has no prompts")
    return per_caption


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score reader prompts on their options and reduce per caption.

    hidden: [P, H] the reader's last-position hidden states; weight: [V, H] its lm_head (same dtype as hidden);
    answers: [P] index of the right option slot; caption_index: [P] caption of each prompt, in [0, num_captions).
    normalize "options" (K x H work instead of V x H): option_token_ids [K] or [P, K] token id of each option letter;
    num_options None (all K), an int, or [P] (a question with fewer options uses the first slots); log-softmax over
    the valid options. mode "hard": 1 when the answer's logit is strictly above every other valid option's, else 0;
    "soft": probability of the answer under softmax(option logits / T); -inf on unused slots.
    normalize "vocab" (one pass over all V columns, never holding [P, V]): option_token_ids is token_options [V],
    the slot in [0, K) that each token decides (several tokens per slot: "C", " C", ...) or -1; num_options is
    required (an int, or [P] with K = max; at most 16); option_logprobs[p, k] = log of the mass of slot k's tokens
    under softmax(logits / T) over the whole vocabulary (-inf for a slot with no tokens), for all K slots. "soft":
    the answer slot's mass (other slots and undecided tokens count 0); "hard": 1 when the answer slot's mass is
    strictly above every other slot's (all K), else 0.
    Returns (rewards [C], mean score over each caption's prompts; option_logprobs [P, K]). Every caption must have
    at least one prompt. Not differentiable (the reader is frozen).
    """
    hidden, weight = _check_reader_head(hidden, weight, bias)
    (p, h), vocab = hidden.shape, weight.shape[0]
    check.choice("normalize", normalize, reference.MCQ_NORMALIZE)
    if normalize == "vocab":
        ids, counts, num_slots = _mcq_vocab_args(option_token_ids, num_options, p, vocab, hidden.device)
    else:
        ids, counts = _mcq_option_args(option_token_ids, num_options, p, vocab, hidden.device)
    num_captions = check.positive_int("num_captions", num_captions)
    answers, caption_index = check.integer("answers", answers), check.integer("caption_index", caption_index)
    check.shape("answers", answers, (p,), "[P]")
    check.shape("caption_index", caption_index, (p,), "[P]")
    check.same_device([("hidden", hidden), ("answers", answers), ("caption_index", caption_index)])
    check.index_range("answers", answers, counts)
    per_caption = _prompts_per_caption(caption_index, num_captions)
    temperature = check.temperature(temperature)
    check.choice("mode", mode, reference.MCQ_MODES)
    op = "mcq_rewards_vocab" if normalize == "vocab" else "mcq_rewards"
    kernels = _kernels(op, hidden.device, backend)
    if kernels is None:
        return reference.mcq_rewards(
            hidden, weight, ids, answers, caption_index, num_captions, num_options=counts, bias=bias,
            temperature=temperature, mode=mode, normalize=normalize,
        )  # fmt: skip
    order = torch.argsort(caption_index.long(), stable=True)
    offsets = torch.zeros(num_captions + 1, dtype=torch.long, device=hidden.device)
    offsets[1:] = torch.cumsum(per_caption, 0)
    hidden, weight = _rows(hidden, h), weight if weight.stride(-1) == 1 else weight.contiguous()
    bias, answers = None if bias is None else bias.contiguous(), answers.long().contiguous()
    with torch.no_grad():
        if normalize == "vocab":
            return kernels.mcq_rewards_vocab(
                hidden, weight, bias, ids, answers, order, offsets, num_slots, temperature, mode
            )
        return kernels.mcq_rewards(hidden, weight, bias, ids, answers, counts, order, offsets, temperature, mode)
