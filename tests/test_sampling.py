"""filtered_logprobs and sample: the filtered distribution against a plain one-row reference and against Hugging Face's
own warpers, greedy rows, per-row generators, and a chi-square goodness-of-fit test of the drawn tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from caprl_core.sampler.sampling import filtered_logprobs, sample, sample_with_policy

# Upper 0.1% points of the chi-square distribution by degrees of freedom (scipy.stats.chi2.ppf(0.999, df); scipy is
# not a dependency). With a fixed seed the test is deterministic; alpha = 1e-3 only decides how lucky a seed must be.
CHI2_CRIT_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def reference_logprobs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """One row [V] in float64, written out: temperature, then top-k keeping ties with the k-th, then top-p keeping a
    token while the mass ranked above it is < top_p (the best always stays). -inf where filtered out."""
    x = logits.astype(np.float64) / temperature
    vocab = len(x)
    keep = np.ones(vocab, dtype=bool)
    if 0 < top_k < vocab:
        kth = sorted(x, reverse=True)[top_k - 1]
        keep = x >= kth
    if top_p < 1:
        probs = np.where(keep, np.exp(x - x.max()), 0.0)
        probs /= probs.sum()
        kept, mass = np.zeros(vocab, dtype=bool), 0.0
        for rank, i in enumerate(sorted(range(vocab), key=lambda j: -probs[j])):
            if rank == 0 or mass < top_p:
                kept[i] = True
            mass += probs[i]
        keep &= kept
    out = np.full(vocab, -np.inf)
    z = x[keep] - x[keep].max()
    out[keep] = z - np.log(np.exp(z).sum())
    return out


def hf_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row [V] through transformers' warpers, in generate's order (a warper is skipped when it is off)."""
    scores = logits.float()[None]
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.log_softmax(-1)[0]


def params(rows: list[tuple[float, int, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, k, p = zip(*rows, strict=True)
    return torch.tensor(t, dtype=torch.float32), torch.tensor(k, dtype=torch.int64), torch.tensor(p)


def assert_same_logprobs(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.double(), torch.as_tensor(want).double()
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{what}: different kept sets"
    finite = torch.isfinite(want)
    # fp32 log-softmax of values up to ~30 in size: ~1e-5 absolute is a few ulps.
    torch.testing.assert_close(got[finite], want[finite], atol=2e-5, rtol=0, msg=what)


# --- the filtered distribution ----------------------------------------------------------------------------------------


ROWS = [  # (temperature, top_k, top_p); top-p on in every row: a top_p = 1 row among these has its own test
    (1.0, 0, 0.9),
    (0.7, 5, 0.9),
    (1.3, 50, 0.5),
    (0.4, 1, 0.95),
    (2.0, 0, 0.1),
    (0.9, 37, 0.999),
    (1.0, 10_000, 0.8),  # top_k >= vocab is off
]


@pytest.mark.parametrize("vocab", [37, 1000])
def test_filtered_logprobs_match_plain_reference_and_hf(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(len(ROWS), vocab, generator=gen) * 3
    t, k, p = params(ROWS)
    got = filtered_logprobs(logits, t, k, p)  # [B, V], all rows in one batch
    assert got.shape == (len(ROWS), vocab) and got.dtype == torch.float32
    for b, (temperature, top_k, top_p) in enumerate(ROWS):
        want = reference_logprobs(logits[b].numpy(), temperature, top_k, top_p)
        assert_same_logprobs(got[b], torch.from_numpy(want), f"row {b} vs reference")
        assert_same_logprobs(got[b], hf_logprobs(logits[b], temperature, top_k, top_p), f"row {b} vs HF")


@pytest.mark.parametrize("vocab", [37, 1000])
def test_top_k_alone_and_no_filter_match_hf(vocab):
    rows = [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.7, 20, 1.0), (1.0, vocab, 1.0)]
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(1)) * 2
    got = filtered_logprobs(logits, *params(rows))
    for b, (temperature, top_k, top_p) in enumerate(rows):
        want = reference_logprobs(logits[b].numpy(), temperature, top_k, top_p)
        assert_same_logprobs(got[b], torch.from_numpy(want), f"row {b} vs reference")
        assert_same_logprobs(got[b], hf_logprobs(logits[b], temperature, top_k, top_p), f"row {b} vs HF")
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[3]).all()
    assert int(torch.isfinite(got[1]).sum()) == 3


@pytest.mark.parametrize("top_k, kept", [(1, 3), (2, 3), (3, 3), (4, 5), (5, 5), (6, 6)])
def test_top_k_keeps_every_token_tied_with_the_kth(top_k, kept):
    logits = torch.tensor([[2.0, 3.0, 1.0, 3.0, 2.0, 0.0, 3.0, -1.0]])
    got = filtered_logprobs(logits, *params([(1.0, top_k, 1.0)]))
    assert int(torch.isfinite(got).sum()) == kept
    assert_same_logprobs(got[0], hf_logprobs(logits[0], 1.0, top_k, 1.0), "vs HF")


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    # probs 0.6, 0.3, 0.1 (shuffled): with top_p = 0.65 the second token (mass above 0.6 < 0.65) stays. Exact ties
    # with a boundary (top_p = 0.6) are left out: fp32 rounding of the probabilities decides those.
    probs = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    logits = probs.log().float()[None]
    for top_p, kept in [(0.5, {1}), (0.55, {1}), (0.65, {1, 2}), (0.85, {1, 2}), (0.95, {0, 1, 2})]:
        got = filtered_logprobs(logits, *params([(1.0, 0, top_p)]))[0]
        assert set(torch.isfinite(got).nonzero().flatten().tolist()) == kept, top_p
        assert_same_logprobs(got, hf_logprobs(logits[0], 1.0, 0, top_p), f"top_p={top_p} vs HF")


def test_top_p_always_keeps_the_best_token():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    got = filtered_logprobs(logits, *params([(1.0, 0, 1e-6)]))[0]
    assert got.tolist() == [-math.inf, 0.0, -math.inf]


def test_top_p_one_is_off_whatever_the_other_rows_of_the_batch():
    # A row with top_p = 1 must not depend on whether another row of the batch uses top-p. Here the tail tokens have
    # probability ~1e-9 each: their mass above rounds to 1.0 in fp32, which a `>= top_p` test with top_p = 1 drops.
    logits = torch.tensor([[0.0, -20.0, -21.0, -22.0], [0.0, 1.0, 2.0, 3.0]])
    alone = filtered_logprobs(logits[:1], *params([(1.0, 0, 1.0)]))[0]
    mixed = filtered_logprobs(logits, *params([(1.0, 0, 1.0), (1.0, 0, 0.5)]))[0]
    assert torch.isfinite(alone).all()
    assert torch.isfinite(mixed).all(), f"top_p=1 row lost tokens in a mixed batch: {mixed.tolist()}"
    assert_same_logprobs(mixed, alone, "mixed vs alone")
    assert_same_logprobs(mixed, hf_logprobs(logits[0], 1.0, 0, 1.0), "vs HF")


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999, 0.99999, 0.999999])
def test_top_p_on_a_large_vocabulary_drops_at_most_one_minus_top_p(top_p):
    # Qwen's vocabulary and a confident step: most of the 151,936 tokens share a tail mass of ~1e-5. Checked in fp64:
    # the dropped tail holds at most 1 - top_p, and without its least likely token the kept set would be under top_p.
    # Slack 1e-6: HF's fp32 warper (ascending cumsum) stays within 3e-6 of the exact answer on the conservative side
    # and passes both checks at every top_p here.
    logits = torch.randn(1, 151_936, generator=torch.Generator().manual_seed(8)) * 4
    logits[0, 0] += 30
    probs = logits[0].double().softmax(-1)
    for name, out in [
        ("filtered_logprobs", filtered_logprobs(logits, *params([(1.0, 0, top_p)]))[0]),
        ("HF", hf_logprobs(logits[0], 1.0, 0, top_p)),
    ]:
        kept = torch.isfinite(out)
        dropped_mass = float(probs[~kept].sum())
        assert dropped_mass <= 1 - top_p + 1e-6, f"{name} dropped {dropped_mass:.4g} of the mass, > 1 - top_p"
        assert float(probs[kept].sum() - probs[kept].min()) < top_p + 1e-6, f"{name} kept more than the smallest set"


def test_non_contiguous_and_half_logits():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)).half()[::2]  # [3, 50], strided
    rows = [(0.8, 5, 0.9), (1.0, 0, 0.7), (1.2, 10, 0.95)]
    got = filtered_logprobs(logits, *params(rows))
    for b, (temperature, top_k, top_p) in enumerate(rows):
        want = reference_logprobs(logits[b].float().numpy(), temperature, top_k, top_p)
        assert_same_logprobs(got[b], torch.from_numpy(want), f"row {b}")


# --- sample -----------------------------------------------------------------------------------------------------------


def test_greedy_rows_return_argmax_and_the_plain_log_softmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(4)) * 2
    # Rows 0 and 2 are greedy; their top_k / top_p settings must not matter.
    rows = [(0.0, 1, 0.1), (1.0, 0, 1.0), (0.0, 0, 1.0), (0.8, 5, 0.9)]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    tokens, logprobs = sample(logits, *params(rows), gens)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    plain = logits.log_softmax(-1)
    for b in (0, 2):
        assert int(tokens[b]) == int(logits[b].argmax())
        assert float(logprobs[b]) == pytest.approx(float(plain[b, tokens[b]]), abs=1e-6)
        assert float(logprobs[b]) < 0  # not the 0 of a point mass, nor of a top_k=1 row
    all_greedy = sample(logits, *params([(0.0, 0, 1.0)] * 4), [None] * 4)
    torch.testing.assert_close(all_greedy[0], logits.argmax(-1))
    torch.testing.assert_close(all_greedy[1], plain.gather(1, logits.argmax(-1)[:, None])[:, 0])


def test_each_row_draws_from_its_own_distribution():
    # top_k = 1 makes each row a point mass at its own argmax: the sampling path must return exactly that, with
    # logprob 0 (the log of the filtered probability 1), for seeded and unseeded rows alike.
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(9))
    rows = [(0.5 + 0.3 * b, 1, 1.0 if b % 2 else 0.9) for b in range(6)]
    seeds = [None, 1, None, 2, None, None]
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    tokens, logprobs = sample(logits, *params(rows), gens)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert logprobs.tolist() == [0.0] * 6


def draw(logits: torch.Tensor, rows, seeds: list[int | None], steps: int) -> list[list[int]]:
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    return [sample(logits, *params(rows), gens)[0].tolist() for _ in range(steps)]


def test_same_seed_same_tokens_and_different_seed_different_tokens():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    rows = [(1.0, 0, 1.0), (0.7, 20, 0.9), (1.5, 0, 0.95)]
    first = draw(logits, rows, [11, 12, 13], 40)
    assert draw(logits, rows, [11, 12, 13], 40) == first
    other = draw(logits, rows, [21, 22, 23], 40)
    for b in range(3):
        assert [step[b] for step in first] != [step[b] for step in other]


def test_a_seeded_row_does_not_depend_on_the_rest_of_the_batch():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    rows = [(1.0, 0, 0.9), (0.0, 0, 1.0), (0.8, 10, 1.0), (1.2, 0, 0.8)]
    together = draw(logits, rows, [None, None, 7, 8], 30)
    torch.manual_seed(0)  # the unseeded rows draw from here; it must not matter to the seeded ones
    alone2 = draw(logits[2:3], rows[2:3], [7], 30)
    alone3 = draw(logits[3:4], rows[3:4], [8], 30)
    assert [s[2] for s in together] == [s[0] for s in alone2]
    assert [s[3] for s in together] == [s[0] for s in alone3]


def test_unseeded_rows_follow_the_global_generator():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(7))
    rows = [(1.0, 0, 1.0)] * 5
    torch.manual_seed(123)
    first = draw(logits, rows, [None] * 5, 10)
    torch.manual_seed(123)
    assert draw(logits, rows, [None] * 5, 10) == first


# --- the distribution of the drawn tokens -----------------------------------------------------------------------------


LOGITS8 = [1.0, 2.2, 0.4, 1.6, -0.3, 0.9, 0.1, -1.2]
TEMPERATURE, TOP_K, TOP_P = 0.7, 5, 0.9


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; a count where the probability is 0 makes it infinite."""
    n = counts.sum()
    if (counts[probs == 0] > 0).any():
        return math.inf, int((probs > 0).sum()) - 1
    support = probs > 0
    expected = n * probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def fits(counts: np.ndarray, probs: np.ndarray) -> bool:
    stat, df = chi_square(counts, probs)
    return stat < CHI2_CRIT_999[df]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def exact_filtered_probs(temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P) -> np.ndarray:
    return np.exp(reference_logprobs(np.array(LOGITS8), temperature, top_k, top_p))


@pytest.mark.parametrize("seeded", [False, True])
def test_drawn_tokens_follow_the_filtered_distribution(seeded):
    probs = exact_filtered_probs()
    # The settings exercise both filters: top-k leaves 5 tokens, top-p then drops one more (mass above 0.958).
    assert int((probs > 0).sum()) == 4
    n = 4000 if seeded else 20000  # one generator per row is slower; 4000 still separates the alternatives below
    logits = torch.tensor(LOGITS8).expand(n, -1)
    rows = [(TEMPERATURE, TOP_K, TOP_P)] * n
    torch.manual_seed(2024)
    gens = [torch.Generator().manual_seed(i) for i in range(n)] if seeded else [None] * n
    tokens, logprobs = sample(logits, *params(rows), gens)
    counts = np.bincount(tokens.numpy(), minlength=8)
    assert (counts[probs == 0] == 0).all(), f"filtered tokens drawn: {counts}"
    stat, df = chi_square(counts, probs)
    assert stat < CHI2_CRIT_999[df], f"chi2 = {stat:.1f} on {df} df; counts {counts}, expected {n * probs}"
    # Each logprob is the log of the filtered probability of its token.
    np.testing.assert_allclose(logprobs.numpy(), np.log(probs[tokens.numpy()]), atol=1e-5, rtol=0)
    # The same test rejects plausible wrong distributions, so it can fail.
    x = np.array(LOGITS8)
    wrong = {
        "unfiltered": softmax(x / TEMPERATURE),
        "no temperature": exact_filtered_probs(temperature=1.0),
        "top-k only": exact_filtered_probs(top_p=1.0),
        "top-p drops the crossing token": exact_filtered_probs(top_p=0.85),
    }
    for name, alternative in wrong.items():
        assert not np.allclose(alternative, probs), name
        assert not fits(counts, alternative), f"the chi-square test does not reject the {name} distribution"


@pytest.mark.parametrize("vocab", [30, 32000])
def test_sample_with_policy_bans_and_both_log_probs(vocab):
    """Mixed rows (greedy, plain, top-k, top-p, with and without bans): logprobs under the filtered distribution with
    the bans, policy_logprobs under log_softmax(logits / T) over everything; a banned token is never drawn."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, vocab, generator=gen) * 2
    rows = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.8), (1.0, 0, 1.0)]
    banned = [(1, 2), (), (0, 3, 4), (5,), (), tuple(range(0, vocab, 2))]
    for seeded in (False, True):
        gens = [torch.Generator().manual_seed(b) if seeded else None for b in range(6)]
        tokens, logprobs, policy = sample_with_policy(logits, *params(rows), gens, banned)
        for b, (temperature, top_k, top_p) in enumerate(rows):
            token = int(tokens[b])
            assert token not in banned[b]
            masked = logits[b].clone()
            masked[list(banned[b])] = float("-inf")
            if temperature == 0:
                assert token == int(masked.argmax())
                want = masked.log_softmax(-1)[token]
            else:
                want = filtered_logprobs(masked[None], torch.tensor([temperature]), torch.tensor([top_k]),
                                         torch.tensor([top_p]))[0, token]  # fmt: skip
            torch.testing.assert_close(logprobs[b], want, atol=2e-5, rtol=0)
            scaled = logits[b] / (temperature if temperature > 0 else 1.0)
            torch.testing.assert_close(policy[b], scaled.log_softmax(-1)[token], atol=2e-5, rtol=0)
    # Without bans or filters the two log-probs are the same numbers.
    tokens, logprobs, policy = sample_with_policy(logits, *params([(1.0, 0, 1.0)] * 6), [None] * 6)
    assert torch.equal(logprobs, policy)
