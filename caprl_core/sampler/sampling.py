"""Next-token sampling with the log-probability of each token under the distribution it was drawn from.

Filters follow Hugging Face's order and tie rules, so the same settings mean the same distribution there and here:
temperature, then top-k (keeps every token tied with the k-th), then top-p (drops the least likely tokens while
their total mass stays <= 1 - top_p; the most likely token always stays).
Sampling is by inverse CDF: one uniform per row (from the row's own generator when it has one) and a binary search
in the row's cumulative probabilities.
"""

from __future__ import annotations

import torch


def filtered_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """log-softmax of logits[B, V] / temperature[B] after top-k[B] (0 = off) and top-p[B] (1 = off); -inf where
    filtered out. temperature must be > 0 (greedy rows are handled by the caller)."""
    x = logits.float() / temperature[:, None]
    vocab = x.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    if bool((k < vocab).any()):
        kmax = int(k.max())
        kth = x.topk(kmax, dim=-1).values.gather(1, (k - 1)[:, None])  # [B, 1], the k-th largest per row
        x = x.masked_fill(x < kth, float("-inf"))
    if bool((top_p < 1).any()):
        # HF's way: ascending order, drop while the cumulative mass from the least likely end is <= 1 - top_p.
        # Summing from the small end keeps the tail's mass exact in fp32; summing from the top would reach 1.0
        # before the tail and drop it all.
        sorted_x, order = x.sort(dim=-1)
        drop_sorted = sorted_x.softmax(-1).cumsum(-1) <= (1 - top_p)[:, None]
        drop_sorted[:, -1] = False  # the most likely token always stays
        drop_sorted &= (top_p < 1)[:, None]  # rows with top_p = 1 are untouched, whatever their neighbours
        x = x.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return x.log_softmax(-1)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of logits[B, V]; returns (tokens[B] int64, logprobs[B] fp32).

    Rows with temperature 0 are greedy and report the plain log-softmax of their token. generators[b] (or the
    device's global generator when None) supplies row b's randomness.
    """
    logits = logits.float()
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    logprobs = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    greedy = (temperature == 0).nonzero().squeeze(1)
    if greedy.numel():
        best = logits[greedy].argmax(-1)
        tokens[greedy] = best
        logprobs[greedy] = logits[greedy].log_softmax(-1).gather(1, best[:, None]).squeeze(1)
    rows = (temperature > 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return tokens, logprobs
    logp = filtered_logprobs(logits[rows], temperature[rows], top_k[rows], top_p[rows])  # [S, V]
    drawn = _inverse_cdf_draw(logp.exp(), _uniforms([generators[r] for r in rows.tolist()], logits.device))
    tokens[rows] = drawn
    logprobs[rows] = logp.gather(1, drawn[:, None]).squeeze(1)
    return tokens, logprobs


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) per row [S]: from the row's own generator (so its stream does not depend on the batch), else
    from the device's global generator."""
    u = torch.rand(len(generators), device=device)
    for i, gen in enumerate(generators):
        if gen is not None:
            u[i] = torch.rand(1, device=device, generator=gen)[0]
    return u


def _inverse_cdf_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token of each row of probs[S, V] (unnormalised is fine) at quantile u[S]: the first index whose cumulative
    mass exceeds u * total. One uniform per row and a binary search, ~30x cheaper on CPU than torch.multinomial or
    an exponential race over V random numbers (measured: 2.7 ms vs 83 / 92 ms at S=128, V=32000). The fp32 running
    sum drifts, but each token's interval is still its own probability to ~1 ulp of the total, and scaling u by the
    last cumulative value (not a separately computed sum) keeps the intervals covering exactly [0, total)."""
    cdf = probs.cumsum(-1)  # [S, V]
    target = (u * cdf[:, -1])[:, None]  # [S, 1]
    index = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)
    # u * total can round up to total itself (~2**-24): fall back to the most likely token rather than a filtered one.
    hit = probs.gather(1, index[:, None]).squeeze(1) > 0
    return torch.where(hit, index, probs.argmax(-1))
