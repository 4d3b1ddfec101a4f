"""ops.mcq_rewards on every backend: against caprl_core.reference (fp32, fp64, and bf16 inputs against the reference
on the same inputs upcast), with ragged option counts, ties, a full-size vocabulary and non-contiguous hidden states.

Run: pytest tests/test_mcq_rewards.py -k "torch or triton"
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import require_backend

from caprl_core import backends, ops, reference

# Option logits of size ~3 summed over H = 37 products: fp32 rounding in another summation order than the
# reference's matmul stays near 1e-6 (log-softmax and the mean over prompts keep absolute errors). bf16 inputs are
# upcast exactly to fp32 by every backend and by the reference, so bf16 is an fp32 computation: same tolerance.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def score(backend: str, hidden: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.mcq_rewards run by exactly `backend`: a fallback to another backend fails the test (the fallback warning
    is raised once per process, so the selection is also checked directly)."""
    require_backend(backend, "mcq_rewards", hidden.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"caprl_core\.mcq_rewards: backend", category=UserWarning)
        assert backends.select("mcq_rewards", hidden.device, backend) == backend
        return ops.mcq_rewards(hidden, *args, backend=backend, **kwargs)


def problem(device, dtype, *, prompts=11, hidden_size=37, vocab=50, slots=5, captions=4, seed=0):
    """A random scoring batch: non-contiguous hidden [P, H] (every other row of a wider tensor), weight [V, H],
    bias [V], distinct option ids [P, K], option counts [P] in [1, K] (the first prompt uses all K), answers, and
    caption_index [P] in a shuffled order where caption 0 has a single prompt."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(2 * prompts, hidden_size + 3, generator=gen, dtype=torch.float64)
    hidden = wide.to(device, dtype)[::2, :hidden_size]  # row stride 2 * (H + 3)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 2 / hidden_size**0.5
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:slots] for _ in range(prompts)])
    num_options = torch.randint(1, slots + 1, (prompts,), generator=gen)
    num_options[0] = slots
    answers = (torch.rand(prompts, generator=gen, dtype=torch.float64) * num_options).long()
    others = torch.randint(1, captions, (prompts - captions,), generator=gen)  # caption 0 keeps a single prompt
    caption_index = torch.cat([torch.arange(captions), others])
    caption_index = caption_index[torch.randperm(prompts, generator=gen)]
    as_device = lambda *xs: [x.to(device) for x in xs]
    return (hidden, weight.to(device, dtype), bias.to(device, dtype)) + tuple(
        as_device(ids, num_options, answers, caption_index)
    )


def assert_close_to_reference(out, expected, num_options, tolerance):
    (rewards, logprobs), (ref_rewards, ref_logprobs) = out, expected
    assert rewards.dtype == ref_rewards.dtype and logprobs.dtype == ref_logprobs.dtype
    unused = torch.arange(logprobs.shape[1], device=logprobs.device)[None, :] >= num_options[:, None]  # [P, K]
    assert torch.equal(torch.isneginf(logprobs), unused), "option_logprobs must be -inf exactly on unused slots"
    torch.testing.assert_close(logprobs[~unused], ref_logprobs[~unused], **tolerance)
    torch.testing.assert_close(rewards, ref_rewards, **tolerance)


def hard_margin(hidden, weight, bias, ids, num_options, answers) -> float:
    """Smallest |answer logit - best other valid logit| in fp64: hard scores are only comparable across backends
    when it is well above the rounding error of the logits."""
    logits = torch.einsum("ph,pkh->pk", hidden.double(), weight.double()[ids]) + bias.double()[ids]
    valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < num_options[:, None]
    others = logits.masked_fill(~valid, -torch.inf).scatter(1, answers[:, None], -torch.inf).amax(1)
    return float((logits.gather(1, answers[:, None]).squeeze(1) - others).abs().min())


@pytest.mark.parametrize("mode", reference.MCQ_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("with_bias,temperature", [(False, 1.0), (True, 0.7)])
def test_matches_reference(backend, device, mode, dtype, with_bias, temperature):
    hidden, weight, bias, ids, num_options, answers, caption_index = problem(device, dtype)
    assert not hidden.is_contiguous()
    bias = bias if with_bias else None
    args = (hidden, weight, ids, answers, caption_index, 4)
    kwargs = dict(num_options=num_options, bias=bias, temperature=temperature, mode=mode)
    out = score(backend, *args, **kwargs)
    # The reference on the same inputs upcast: for bf16 this isolates the kernel's error from bf16 rounding.
    acc = reference.acc_dtype(dtype)
    upcast = (hidden.to(acc), weight.to(acc), ids, answers, caption_index, 4)
    expected = reference.mcq_rewards(*upcast, **{**kwargs, "bias": None if bias is None else bias.to(acc)})
    if mode == "hard":
        assert hard_margin(hidden, weight, torch.zeros_like(weight[:, 0]) if bias is None else bias, ids,
                           num_options, answers) > 1e-3  # fmt: skip
    assert_close_to_reference(out, expected, num_options, TOLERANCES[dtype])
    again = score(backend, *args, **kwargs)
    assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1]), "must be deterministic"


@pytest.mark.parametrize("mode", reference.MCQ_MODES)
@pytest.mark.parametrize("num_options", [None, 3])
def test_shared_option_ids_and_int_option_count(backend, device, mode, num_options):
    """option_token_ids as [K] (one set of letters for every prompt) and num_options as an int or None."""
    hidden, weight, bias, ids, _, _, caption_index = problem(device, torch.float32, seed=1)
    letters = ids[0]  # [K]
    count = 5 if num_options is None else num_options
    answers = torch.arange(hidden.shape[0], device=device) % count
    args = (hidden, weight, letters, answers, caption_index, 4)
    kwargs = dict(num_options=num_options, bias=bias, temperature=1.5, mode=mode)
    out = score(backend, *args, **kwargs)
    expected = reference.mcq_rewards(*args, **kwargs)
    assert_close_to_reference(out, expected, torch.full_like(answers, count), TOLERANCES[torch.float32])


@pytest.mark.parametrize("mode", reference.MCQ_MODES)
def test_one_option_slot(backend, device, mode):
    """K = 1: the only option is the answer, log-prob 0, score 1 in both modes."""
    hidden, weight, _, ids, _, _, _ = problem(device, torch.float32, prompts=3, slots=1, captions=2, seed=2)
    caption_index = torch.tensor([1, 0, 1], device=device)
    answers = torch.zeros(3, dtype=torch.long, device=device)
    rewards, logprobs = score(backend, hidden, weight, ids, answers, caption_index, 2, mode=mode)
    assert torch.equal(logprobs, torch.zeros(3, 1, device=device))
    assert torch.equal(rewards, torch.ones(2, device=device))


def test_tie_is_wrong_in_hard_mode(backend, device):
    """Two valid options with identical weight rows tie: hard score 0 (strictly above is required), while the same
    prompt scores 1 once its twin is outside num_options; soft mode gives the twins equal probability."""
    hidden, weight, _, _, _, _, _ = problem(device, torch.float32, prompts=2, captions=2, seed=3)
    weight[7] = weight[3] = 2 * hidden[0] / hidden[0].norm()  # the twins are the top two options of prompt 0
    weight[[1, 2, 9]] *= 0.1
    ids = torch.tensor([[3, 1, 7, 2], [9, 3, 1, 7]], device=device)  # prompt 1: the twins are slots 1 and 3
    hidden[1] = hidden[0]
    answers = torch.tensor([0, 1], device=device)
    caption_index = torch.tensor([0, 1], device=device)
    rewards, logprobs = score(backend, hidden, weight, ids, answers, caption_index, 2, mode="hard")
    assert torch.equal(rewards, torch.zeros(2, device=device))
    assert logprobs[0, 0] == logprobs[0, 2] and logprobs[1, 1] == logprobs[1, 3]
    counts = torch.tensor([2, 3], device=device)  # the twins' partners are now unused slots
    rewards, _ = score(backend, hidden, weight, ids, answers, caption_index, 2, num_options=counts, mode="hard")
    assert torch.equal(rewards, torch.ones(2, device=device))
    rewards, logprobs = score(backend, hidden, weight, ids, answers, caption_index, 2, mode="soft")
    torch.testing.assert_close(rewards, logprobs[[0, 1], [0, 1]].exp(), rtol=1e-6, atol=1e-6)
    assert 0 < float(rewards[0]) < 0.5  # the twins share the mass: neither reaches one half


def test_full_vocabulary_reads_only_option_rows(backend, device):
    """V = 151,936 (Qwen2.5's vocabulary) with option ids up to V - 1: only K rows are read, offsets in int64."""
    vocab, hidden_size, slots = 151_936, 24, 6
    hidden, weight, bias, _, num_options, answers, caption_index = problem(
        device, torch.float32, hidden_size=hidden_size, vocab=vocab, slots=slots, seed=4
    )
    gen = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:slots] for _ in range(hidden.shape[0])]).to(device)
    ids[0, 0], ids[1, 1] = vocab - 1, 0
    args = (hidden, weight, ids, answers, caption_index, 4)
    kwargs = dict(num_options=num_options, bias=bias, temperature=0.9, mode="soft")
    out = score(backend, *args, **kwargs)
    assert_close_to_reference(out, reference.mcq_rewards(*args, **kwargs), num_options, TOLERANCES[torch.float32])


def test_hidden_longer_than_one_block(backend, device):
    """H = 700 with K = 16 option slots: the projection loops over several H chunks, the last one partial."""
    hidden, weight, bias, ids, num_options, answers, caption_index = problem(
        device, torch.float32, prompts=6, hidden_size=700, vocab=40, slots=16, captions=3, seed=6
    )
    args = (hidden, weight, ids, answers, caption_index, 3)
    kwargs = dict(num_options=num_options, bias=bias, temperature=1.0, mode="soft")
    out = score(backend, *args, **kwargs)
    # H = 700 products per logit: the fp32 summation-order error grows ~sqrt(H); 2e-5 covers it.
    assert_close_to_reference(out, reference.mcq_rewards(*args, **kwargs), num_options, dict(rtol=2e-5, atol=2e-5))


@pytest.mark.gpu  # deselected (and counted as such) without CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reader_scoring_shape_gpu(backend, device, dtype):
    """A reward step's shape: 1,024 prompts of 128 captions, H = 2,048, Qwen2.5's vocabulary, 5 option slots. Soft
    mode only: with 1,024 prompts some hard margins fall below the fp32 rounding of an H = 2,048 logit, where the
    backends may legitimately disagree on a tie-break (the hard rule is tested above at a checked margin)."""
    hidden, weight, bias, _, num_options, answers, caption_index = problem(
        device, dtype, prompts=1024, hidden_size=2048, vocab=151_936, slots=5, captions=128, seed=7
    )
    gen = torch.Generator().manual_seed(8)
    ids = torch.stack([torch.randperm(151_936, generator=gen)[:5] for _ in range(1024)]).to(device)
    kwargs = dict(num_options=num_options, bias=bias, temperature=1.0, mode="soft")
    out = score(backend, hidden, weight, ids, answers, caption_index, 128, **kwargs)
    acc = reference.acc_dtype(dtype)
    upcast = dict(kwargs, bias=bias.to(acc))
    expected = reference.mcq_rewards(hidden.to(acc), weight.to(acc), ids, answers, caption_index, 128, **upcast)
    # 2,048 products per logit: the summation-order error grows ~sqrt(H) (2e-5 at H = 700 above), so 5e-5.
    assert_close_to_reference(out, expected, num_options, dict(rtol=5e-5, atol=5e-5))


# ---- normalize="vocab": token_options [V] map every token to the slot it decides (or -1) ---------------------------


def vscore(backend: str, hidden: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.mcq_rewards(..., normalize="vocab") run by exactly `backend` (no fallback, as `score`)."""
    require_backend(backend, "mcq_rewards_vocab", hidden.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"caprl_core\.mcq_rewards_vocab: backend", category=UserWarning)
        assert backends.select("mcq_rewards_vocab", hidden.device, backend) == backend
        return ops.mcq_rewards(hidden, *args, backend=backend, normalize="vocab", **kwargs)


def token_options(vocab: int, slots: int, *, empty_slot: int | None = None, seed: int = 0) -> torch.Tensor:
    """[V] slot of each token: about a third of the tokens decide one of `slots` slots (several tokens per slot, as
    "C", " C", "Cat"), the rest -1; `empty_slot` is decided by no token."""
    gen = torch.Generator().manual_seed(seed)
    options = torch.randint(0, slots, (vocab,), generator=gen)
    options[torch.rand(vocab, generator=gen) < 0.65] = -1
    if empty_slot is not None:
        options[options == empty_slot] = -1
    return options


def vocab_margin(expected_logprobs: torch.Tensor, answers: torch.Tensor) -> float:
    """Smallest |answer slot's log-mass - best other slot's| (hard scores compare only above the rounding error)."""
    lp = expected_logprobs.double()
    others = lp.scatter(1, answers[:, None], -torch.inf).amax(1)
    return float((lp.gather(1, answers[:, None]).squeeze(1) - others).abs().min())


def assert_vocab_close(out, expected, tolerance):
    """Same dtypes, -inf on exactly the same slots (those with no tokens), finite entries and rewards close."""
    (rewards, logprobs), (ref_rewards, ref_logprobs) = out, expected
    assert rewards.dtype == ref_rewards.dtype and logprobs.dtype == ref_logprobs.dtype
    empty = torch.isneginf(ref_logprobs)
    assert torch.equal(torch.isneginf(logprobs), empty), "option_logprobs must be -inf exactly on slots with no tokens"
    torch.testing.assert_close(logprobs[~empty], ref_logprobs[~empty], **tolerance)
    torch.testing.assert_close(rewards, ref_rewards, **tolerance)


# V = 101 (prime: the last vocab tile is partial on every backend), H = 37. Log-masses are differences of two
# log-sum-exps over <= 101 logits of size ~3: fp32 rounding in another summation order stays near 1e-6, so the
# options-mode tolerances apply (bf16 is again an exact upcast to fp32).
@pytest.mark.parametrize("mode", reference.MCQ_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("with_bias,temperature", [(False, 1.0), (True, 0.7)])
def test_vocab_matches_reference(backend, device, mode, dtype, with_bias, temperature):
    hidden, weight, bias, _, num_options, answers, caption_index = problem(device, dtype, vocab=101, seed=10)
    options = token_options(101, 5, empty_slot=4, seed=11).to(device)  # slot 4 has no tokens: -inf, never wins
    bias = bias if with_bias else None
    args = (hidden, weight, options, answers, caption_index, 4)
    kwargs = dict(num_options=num_options, bias=bias, temperature=temperature, mode=mode)  # per-prompt counts
    out = vscore(backend, *args, **kwargs)
    acc = reference.acc_dtype(dtype)
    upcast = (hidden.to(acc), weight.to(acc), options, answers, caption_index, 4)
    upcast_kwargs = {**kwargs, "bias": None if bias is None else bias.to(acc), "normalize": "vocab"}
    expected = reference.mcq_rewards(*upcast, **upcast_kwargs)
    if mode == "hard":
        assert vocab_margin(expected[1], answers) > 1e-3
    assert_vocab_close(out, expected, TOLERANCES[dtype])
    again = vscore(backend, *args, **kwargs)
    assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1]), "must be deterministic"


@pytest.mark.parametrize("mode", reference.MCQ_MODES)
def test_vocab_one_prompt_int_option_count(backend, device, mode):
    """P = 1, V = 61 (prime), num_options as an int, H = 700 (several H chunks): one caption, one prompt."""
    hidden, weight, bias, *_ = problem(device, torch.float32, prompts=4, hidden_size=700, vocab=61, seed=12)
    hidden = hidden[:1]
    options = token_options(61, 3, seed=13).to(device)
    args = (hidden, weight, options, torch.tensor([2], device=device), torch.zeros(1, dtype=torch.long, device=device))
    kwargs = dict(num_options=3, bias=bias, temperature=1.3, mode=mode)
    out = vscore(backend, *args, 1, **kwargs)
    expected = reference.mcq_rewards(*args, 1, **kwargs, normalize="vocab")
    # H = 700 products per logit: the summation-order error grows ~sqrt(H), as in test_hidden_longer_than_one_block
    assert_vocab_close(out, expected, dict(rtol=2e-5, atol=2e-5))


def test_vocab_soft_score_is_dense_mass(backend, device):
    """Soft score = sum over the answer slot's tokens of softmax(logits / T), computed densely in fp64; a slot beyond
    num_options[p] and undecided tokens count 0; option_logprobs sum (as masses) to at most 1."""
    hidden, weight, bias, _, _, _, _ = problem(device, torch.float32, prompts=6, vocab=89, captions=6, seed=14)
    options = token_options(89, 6, seed=15).to(device)
    num_options = torch.tensor([6, 2, 3, 4, 5, 6], device=device)
    answers = torch.tensor([5, 1, 0, 2, 4, 3], device=device)
    caption_index = torch.arange(6, device=device)  # one prompt per caption: rewards are the scores
    rewards, logprobs = vscore(backend, hidden, weight, options, answers, caption_index, 6, num_options=num_options,
                               bias=bias, temperature=0.8, mode="soft")  # fmt: skip
    probs = torch.softmax((hidden.double() @ weight.double().T + bias.double()) / 0.8, dim=-1)  # [P, V]
    dense = (probs * (options[None, :] == answers[:, None])).sum(1)  # [P]
    torch.testing.assert_close(rewards.double(), dense, rtol=1e-5, atol=1e-6)
    assert float(logprobs.double().exp().sum(1).max()) <= 1 + 1e-5


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(option_token_ids=torch.zeros(5, dtype=torch.long)), r"option_token_ids: expected shape \(50,\)"),
        (dict(option_token_ids=torch.zeros(50)), "option_token_ids: expected an integer dtype"),
        (dict(option_token_ids=torch.full((50,), 5)), r"token_options values in \[-1, K=5\)"),
        (dict(option_token_ids=torch.full((50,), -2)), r"option_token_ids: .* got -2 at index 0"),
        (dict(num_options=None), "num_options: required with normalize='vocab'"),
        (dict(num_options=17), r"num_options: expected values in \[1, 16 \(vocab mode\)\]"),
        (dict(num_options=torch.tensor([5, 1, 5])), "num_options: expected shape"),
        (dict(answers=torch.tensor([0, 4, 1, 0])), r"answers: expected values in \[0, 2\), got 4 at index 1"),
        (dict(normalize="letters"), "normalize: expected one of"),
    ],
)
def test_vocab_bad_input(change, message):
    hidden, weight = torch.randn(4, 8), torch.randn(50, 8)
    kwargs = dict(option_token_ids=token_options(50, 5), answers=torch.tensor([0, 1, 1, 0]),
                  caption_index=torch.tensor([0, 1, 0, 1]), num_captions=2,
                  num_options=torch.tensor([5, 2, 3, 5]), normalize="vocab")  # fmt: skip
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        ops.mcq_rewards(hidden, weight, **kwargs)


@pytest.mark.gpu  # deselected (and counted as such) without CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vocab_reader_scoring_shape_gpu(backend, device, dtype):
    """normalize="vocab" at a reward step's shape: 1,024 prompts of 128 captions, H = 2,048, Qwen2.5's vocabulary,
    5 slots of 8 tokens each. Soft mode only (see test_reader_scoring_shape_gpu)."""
    hidden, weight, bias, _, num_options, answers, caption_index = problem(
        device, dtype, prompts=1024, hidden_size=2048, vocab=151_936, slots=5, captions=128, seed=16
    )
    gen = torch.Generator().manual_seed(17)
    options = torch.full((151_936,), -1, dtype=torch.long)
    options[torch.randperm(151_936, generator=gen)[:40]] = torch.arange(40) % 5
    options = options.to(device)
    kwargs = dict(num_options=num_options, bias=bias, temperature=1.0, mode="soft")
    out = vscore(backend, hidden, weight, options, answers, caption_index, 128, **kwargs)
    acc = reference.acc_dtype(dtype)
    upcast = dict(kwargs, bias=bias.to(acc), normalize="vocab")
    expected = reference.mcq_rewards(hidden.to(acc), weight.to(acc), options, answers, caption_index, 128, **upcast)
    # 2,048 products per logit (~1e-5 each in fp32, as in test_reader_scoring_shape_gpu), then two log-sum-exps over
    # V: 1e-4 leaves room for the summation order of 151,936 terms.
    assert_vocab_close(out, expected, dict(rtol=1e-4, atol=1e-4))
