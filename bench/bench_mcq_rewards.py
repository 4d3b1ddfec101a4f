"""Benchmark of mcq_rewards: option-row scoring (the kernels) against projecting onto the full vocabulary.

    .venv/bin/python -m pytest bench/bench_mcq_rewards.py --benchmark-only [--benchmark-json=out.json]

The CapRL reward step at recipe scale: P = 1024 reader prompts (128 captions x 8 questions), H = 2048, K = 5
options, the Qwen2.5 vocabulary V = 151,936, fp32 and bf16. Contenders:
- the kernel backends ("cpu" on CPU machines; "triton" and "cuda" on CUDA machines) and "torch" (the reference,
  which gathers the K option rows per prompt: [P, K, H]);
- "full_vocab", the naive way: hidden @ weight.T -> [P, V] logits, gather the option columns, log-softmax, reduce
  (2 P V H flops and a [P, V] buffer where the kernels do 2 P K H flops and hold nothing).
Target (reported, not asserted): the kernel >= 20x faster than full_vocab; each kernel benchmark stores
`speedup_vs_full_vocab` in extra_info. Also in extra_info: the machine, peak extra memory of one call (measured
once, outside the timing loop), and achieved GB/s (kernels: hidden + option rows read) or TFLOP/s (full_vocab).
Every benchmarked output is checked against the fp64 reference.

normalize="vocab" (test_mcq_rewards_vocab): the mass of each option's tokens over the whole vocabulary, which must
read all V rows of the weight. Shapes: "gpu-recipe" (P = 1024, H = 2048, V = 151,936; CUDA only, as the gpu-*
shapes of bench_engine.py) and "cpu" (P = 64, H = 256, V = 32,768; runs anywhere). Contenders: "vocab-<kernel>"
(the fused op: one pass over V, no [P, V] buffer), "options-<kernel>" (normalize="options" on the same batch: the
K-row lower bound, a different quantity) and "full_vocab_softmax" (torch: hidden @ weight.T, log_softmax, then a
logsumexp over each slot's token columns). The vocab kernels' outputs are checked against full_vocab_softmax
computed in fp64 (cpu shape) or fp32 on upcast inputs (gpu shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import pytest
import torch
from conftest import best_seconds, machine, peak_extra_bytes, synced

from caprl_core import backends, ops, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNELS = ("triton", "cuda") if DEVICE.type == "cuda" else ("cpu",)
CONTENDERS = ("full_vocab", *KERNELS, "torch")  # full_vocab first: the kernels' speedups read its median
P, H, K, V, NUM_CAPTIONS = 1024, 2048, 5, 151_936, 128
FULL_VOCAB_ROUNDS = 3 if DEVICE.type == "cuda" else 1
TEMPERATURE, MODE = 1.0, "soft"  # soft: rewards compare with a tolerance (hard could flip on a near-tie)
_full_vocab_seconds: dict[torch.dtype, float] = {}


@dataclass(frozen=True)
class Problem:
    hidden: torch.Tensor  # [P, H]
    weight: torch.Tensor  # [V, H]
    option_ids: torch.Tensor  # [K], the same letters for every prompt
    answers: torch.Tensor  # [P]
    caption_index: torch.Tensor  # [P], 8 prompts per caption, interleaved (prompts are not sorted by caption)


@cache
def _problem(dtype: torch.dtype) -> Problem:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(P, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.02  # lm_head-like scale: option logits of order 1
    option_ids = torch.randperm(V, generator=gen)[:K]
    answers = torch.randint(0, K, (P,), generator=gen)
    caption_index = torch.arange(P) % NUM_CAPTIONS
    to = dict(device=DEVICE)
    return Problem(hidden.to(dtype=dtype, **to), weight.to(dtype=dtype, **to), option_ids.to(**to),
                   answers.to(**to), caption_index.to(**to))  # fmt: skip


def full_vocab(pb: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive reward: logits over the whole vocabulary, then the option columns. Returns (rewards [C],
    option_logprobs [P, K])."""
    logits = (pb.hidden @ pb.weight.T).float()  # [P, V]
    option_logits = logits.gather(1, pb.option_ids.expand(P, K))  # [P, K]
    option_logprobs = torch.log_softmax(option_logits / TEMPERATURE, dim=-1)
    score = option_logprobs.gather(1, pb.answers[:, None]).squeeze(1).exp()  # [P], soft
    total = torch.zeros(NUM_CAPTIONS, device=DEVICE).index_add_(0, pb.caption_index, score)
    return total / torch.bincount(pb.caption_index, minlength=NUM_CAPTIONS), option_logprobs


def _call(contender: str, pb: Problem):
    if contender == "full_vocab":
        return lambda: full_vocab(pb)
    return lambda: ops.mcq_rewards(
        pb.hidden, pb.weight, pb.option_ids, pb.answers, pb.caption_index, NUM_CAPTIONS,
        temperature=TEMPERATURE, mode=MODE, backend=contender,
    )  # fmt: skip


@cache
def _expected(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp64 reference on the same inputs. Only the K option rows of the weight matter (no bias): they are
    passed as a [K, H] weight with ids 0..K-1, which spares a 2.5 GB fp64 copy of the [V, H] weight."""
    pb = _problem(dtype)
    rows = pb.weight[pb.option_ids].double()  # [K, H]
    return reference.mcq_rewards(
        pb.hidden.double(), rows, torch.arange(K, device=DEVICE), pb.answers, pb.caption_index, NUM_CAPTIONS,
        temperature=TEMPERATURE, mode=MODE,
    )  # fmt: skip


def _check(contender: str, dtype: torch.dtype, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    expected = _expected(dtype)
    # Kernels accumulate H = 2048 products in fp32: ~1e-5 on logits of order 1. full_vocab in bf16 rounds the
    # logits themselves to bf16 (8 bits of mantissa: ~4e-3 on logits of order 1).
    loose = contender == "full_vocab" and dtype == torch.bfloat16
    tol = dict(rtol=2e-2, atol=2e-2) if loose else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1].double(), expected[1], **tol)
    torch.testing.assert_close(out[0].double(), expected[0], **tol)


def _full_vocab_median(dtype: torch.dtype) -> float:
    """Seconds per full_vocab call: its benchmark's median when it ran first, else the best of two timed calls."""
    if dtype not in _full_vocab_seconds:
        pb = _problem(dtype)
        _full_vocab_seconds[dtype] = best_seconds(lambda: full_vocab(pb), DEVICE, rounds=2)
    return _full_vocab_seconds[dtype]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mcq_rewards(benchmark, contender: str, dtype: torch.dtype) -> None:
    if contender != "full_vocab":
        why = backends._why_unavailable(contender, "mcq_rewards", DEVICE)
        if why is not None:
            pytest.skip(f"{contender} backend unavailable: {why}")
    pb = _problem(dtype)
    fn = _call(contender, pb)

    run = synced(fn, DEVICE)

    outputs = []  # one untimed call gives both the peak memory and the output to check
    peak = peak_extra_bytes(lambda: outputs.append(run()), DEVICE)
    _check(contender, dtype, outputs.pop())
    benchmark.extra_info.update(
        machine=machine(), device=str(DEVICE), contender=contender, dtype=str(dtype), P=P, H=H, K=K, V=V,
        num_captions=NUM_CAPTIONS, peak_extra_bytes=peak,
    )  # fmt: skip
    if contender == "full_vocab":  # 15 s (fp32) to 90 s (bf16) per call on the 2-core CPU: few rounds
        benchmark.pedantic(run, rounds=FULL_VOCAB_ROUNDS, iterations=1, warmup_rounds=0)
    else:
        benchmark(run)
    _record_rates(benchmark, contender, dtype)


def _record_rates(benchmark, contender: str, dtype: torch.dtype) -> None:
    """Throughput of the finished benchmark, and the speedup over full_vocab for the kernels (reported only)."""
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    median = benchmark.stats.stats.median
    itemsize = torch.empty((), dtype=dtype).element_size()
    if contender == "full_vocab":
        _full_vocab_seconds[dtype] = median
        benchmark.extra_info["tflops"] = 2 * P * V * H / median / 1e12
        return
    benchmark.extra_info["gbps"] = (P + K) * H * itemsize / median / 1e9  # hidden rows + the K option rows
    if contender in KERNELS:
        speedup = _full_vocab_median(dtype) / median
        benchmark.extra_info["speedup_vs_full_vocab"] = speedup
        print(f"\nmcq_rewards {contender} {dtype}: {median * 1e3:.3f} ms, {speedup:.0f}x faster than full_vocab")


# ---- normalize="vocab" ----------------------------------------------------------------------------------------------

VOCAB_SHAPES = {"gpu-recipe": (1024, 2048, 151_936, 128), "cpu": (64, 256, 32_768, 8)}  # P, H, V, C
TOKENS_PER_SLOT = 8  # "C", " C", "C)", "Cat", ...: a handful of vocabulary ids decide each letter
VOCAB_CONTENDERS = ("full_vocab_softmax", *(f"vocab-{k}" for k in KERNELS), *(f"options-{k}" for k in KERNELS))


@dataclass(frozen=True)
class VocabProblem:
    hidden: torch.Tensor  # [P, H]
    weight: torch.Tensor  # [V, H]
    token_options: torch.Tensor  # [V], slot in [0, K) or -1
    letter_ids: torch.Tensor  # [K], the first token of each slot (for the options-mode contender)
    answers: torch.Tensor  # [P]
    caption_index: torch.Tensor  # [P]
    num_captions: int


@cache
def _vocab_problem(shape: str, dtype: torch.dtype) -> VocabProblem:
    p, h, v, c = VOCAB_SHAPES[shape]
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(p, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.02 * (2048 / h) ** 0.5  # logits of order 1 at every H
    tokens = torch.randperm(v, generator=gen)[: K * TOKENS_PER_SLOT].view(K, TOKENS_PER_SLOT)
    token_options = torch.full((v,), -1, dtype=torch.long)
    for k in range(K):
        token_options[tokens[k]] = k
    to = dict(device=DEVICE)
    return VocabProblem(
        hidden.to(dtype=dtype, **to), weight.to(dtype=dtype, **to), token_options.to(**to), tokens[:, 0].to(**to),
        torch.randint(0, K, (p,), generator=gen).to(**to), (torch.arange(p) % c).to(**to), c,
    )  # fmt: skip


def full_vocab_softmax(pb: VocabProblem, upcast: torch.dtype | None = None) -> torch.Tensor:
    """[P, K] slot log-masses the dense way: [P, V] logits (matmul in the input dtype, or in `upcast` for the
    checks), fp32 log_softmax, logsumexp over each slot's columns."""
    hidden, weight = (pb.hidden, pb.weight) if upcast is None else (pb.hidden.to(upcast), pb.weight.to(upcast))
    logits = (hidden @ weight.T).to(upcast or torch.float32)  # [P, V]
    logp = torch.log_softmax(logits / TEMPERATURE, dim=-1)
    columns = [(pb.token_options == k).nonzero().squeeze(1) for k in range(K)]
    return torch.stack([torch.logsumexp(logp[:, cols], dim=-1) for cols in columns], dim=1)


def _vocab_call(contender: str, pb: VocabProblem):
    if contender == "full_vocab_softmax":
        return lambda: full_vocab_softmax(pb)
    normalize, backend = contender.split("-")
    ids = pb.token_options if normalize == "vocab" else pb.letter_ids
    return lambda: ops.mcq_rewards(
        pb.hidden, pb.weight, ids, pb.answers, pb.caption_index, pb.num_captions, num_options=K,
        temperature=TEMPERATURE, mode=MODE, normalize=normalize, backend=backend,
    )  # fmt: skip


@pytest.mark.parametrize("contender", VOCAB_CONTENDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(VOCAB_SHAPES))
def test_mcq_rewards_vocab(benchmark, shape: str, contender: str, dtype: torch.dtype) -> None:
    if shape.startswith("gpu") and DEVICE.type != "cuda":
        pytest.skip(f"{shape} runs on a GPU only")
    if contender != "full_vocab_softmax":
        op = "mcq_rewards_vocab" if contender.startswith("vocab") else "mcq_rewards"
        why = backends._why_unavailable(contender.split("-")[1], op, DEVICE)
        if why is not None:
            pytest.skip(f"{contender} unavailable: {why}")
    pb = _vocab_problem(shape, dtype)
    run = synced(_vocab_call(contender, pb), DEVICE)
    outputs = []
    peak = peak_extra_bytes(lambda: outputs.append(run()), DEVICE)
    if contender.startswith("vocab"):
        # fp64 dense on the cpu shape; fp32 on upcast inputs at the gpu shape (an fp64 [V, H] copy is 2.5 GB).
        expected = full_vocab_softmax(pb, torch.float64 if shape == "cpu" else torch.float32)
        # H products per logit in fp32 and two log-sum-exps: ~1e-5 absolute on log-masses of order 1 to 10.
        torch.testing.assert_close(outputs.pop()[1].double(), expected.double(), rtol=1e-4, atol=1e-4)
    p, h, v, _ = VOCAB_SHAPES[shape]
    benchmark.extra_info.update(
        machine=machine(), device=str(DEVICE), contender=contender, dtype=str(dtype), P=p, H=h, K=K, V=v,
        peak_extra_bytes=peak,
    )  # fmt: skip
    if shape.startswith("gpu") or contender.startswith("options"):
        benchmark(run)
    else:  # 10-100 ms per call on the 2-core CPU: a fixed number of rounds keeps the run short
        benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None and not contender.startswith("options"):
        benchmark.extra_info["tflops"] = 2 * p * v * h / benchmark.stats.stats.median / 1e12  # the [P, V] projection
