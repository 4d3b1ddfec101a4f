"""Benchmark of token_logprobs: log_softmax(logits)[target] from materialised logits, kernel against PyTorch.

    .venv/bin/python -m pytest bench/bench_token_logprobs.py --benchmark-only [--benchmark-json=out.json]

Shapes: N = 2048 tokens x the Qwen2.5 vocabulary V = 151,936 ("recipe", 1.24 GB of fp32 logits), and N = 256
("small", fast); fp32 and bf16; the forward alone ("fwd") and forward + backward with a random upstream gradient
("fwd_bwd"). Contenders:
- the kernel backend: "cpu" (C++/OpenMP) on CPU machines, "triton" on CUDA machines;
- "torch": the ops' PyTorch reference (upcast to fp32, log_softmax, gather);
- "log_softmax_gather": the plain one-liner `torch.log_softmax(x, -1).gather(-1, t[:, None])` in the input dtype;
- "trl_selective": TRL's `selective_log_softmax` approach, re-implemented below (TRL is not a dependency).
Target (reported, not asserted): the CPU kernel's fp32 recipe forward >= 2x faster than log_softmax_gather. Each
benchmark stores in extra_info: the machine, the peak extra memory of one call (measured once, outside the timing
loop; the outputs count, the inputs do not), GB/s (bytes of logits moved / median: the forward reads them once;
fwd_bwd reads them twice and writes the gradient, 3x), and for every contender but log_softmax_gather its speedup
over log_softmax_gather. Every benchmarked output (and gradient) is checked against the fp64 reference on a slice.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch
from conftest import best_seconds, machine, peak_extra_bytes, synced

from caprl_core import backends, ops, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL = "triton" if DEVICE.type == "cuda" else "cpu"
CONTENDERS = ("log_softmax_gather", KERNEL, "torch", "trl_selective")  # the baseline first: speedups read it
SHAPES = {"recipe": (2048, 151_936), "small": (256, 151_936)}  # (N, V)
SEQ_LEN = 256  # TRL sees [B, T, V] logits; the N tokens are B = N / 256 sequences
CHECK_ROWS = 64  # rows compared with the fp64 reference (a full fp64 copy of the recipe logits is 2.5 GB)
_baseline_seconds: dict[tuple, float] = {}


@cache
def _problem(shape: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] (~N(0, 9): a peaked but not one-hot softmax), targets [N], upstream gradient [N] (fp32)."""
    n, vocab = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    grad = torch.randn(n, generator=gen).to(DEVICE)
    return logits, targets, grad


def log_softmax_gather(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def trl_selective(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """TRL's selective_log_softmax, in our words. TRL gets [B, T, V] logits and avoids a full log_softmax output:
    in fp32/fp64 it gathers the target logits and subtracts a logsumexp computed one sequence at a time (a [T, V]
    slice per step, so the temporaries are one sequence big); in bf16/fp16, where that subtraction would lose
    precision, it runs log_softmax + gather sequence by sequence instead."""
    seqs, ids = logits.view(-1, SEQ_LEN, logits.shape[-1]), targets.view(-1, SEQ_LEN)  # [B, T, V], [B, T]
    if logits.dtype in (torch.float32, torch.float64):
        picked = seqs.gather(-1, ids[..., None]).squeeze(-1)  # [B, T]
        lse = torch.stack([torch.logsumexp(seq, dim=-1) for seq in seqs])  # [B, T]
        return (picked - lse).view(-1)
    rows = [torch.log_softmax(seq, -1).gather(-1, t[:, None]).squeeze(-1) for seq, t in zip(seqs, ids, strict=True)]
    return torch.stack(rows).view(-1)


def _forward(contender: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if contender == "log_softmax_gather":
        return log_softmax_gather
    if contender == "trl_selective":
        return trl_selective
    return lambda logits, targets: ops.token_logprobs(logits, targets, backend=contender)


def _call(contender: str, mode: str, shape: str, dtype: torch.dtype) -> Callable[[], tuple]:
    """One timed unit: the forward (returns (logp,)), or forward + backward (returns (logp, grad_logits))."""
    logits, targets, grad = _problem(shape, dtype)
    forward = _forward(contender)
    if mode == "fwd":
        return lambda: (forward(logits, targets),)

    def fwd_bwd() -> tuple:
        x = logits.detach().requires_grad_()
        logp = forward(x, targets)
        logp.backward(grad.to(logp.dtype))
        return logp, x.grad

    return fwd_bwd


def _check(mode: str, shape: str, dtype: torch.dtype, out: tuple) -> None:
    """The first CHECK_ROWS rows against the fp64 reference (and its autograd gradient)."""
    logits, targets, grad = _problem(shape, dtype)
    x = logits[:CHECK_ROWS].double().requires_grad_()
    expected = reference.token_logprobs(x, targets[:CHECK_ROWS])
    # fp32 kernels: <= 1e-5 absolute on log-probs (the acceptance bound); bf16 one-liners round the log-probs
    # themselves to bf16 (8 mantissa bits on values ~ -15: ~0.06).
    tol = dict(rtol=1e-2, atol=1e-1) if out[0].dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][:CHECK_ROWS].double(), expected, **tol)
    if mode == "fwd_bwd":
        expected.backward(grad[:CHECK_ROWS].double())
        grad_tol = dict(rtol=2e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out[1][:CHECK_ROWS].double(), x.grad, **grad_tol)


def _baseline_median(key: tuple) -> float:
    """Seconds per log_softmax_gather call: its benchmark's median when it ran first, else the best of two."""
    if key not in _baseline_seconds:
        _baseline_seconds[key] = best_seconds(_call("log_softmax_gather", *key), DEVICE, rounds=2)
    return _baseline_seconds[key]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_token_logprobs(benchmark, shape: str, mode: str, dtype: torch.dtype, contender: str) -> None:
    if contender not in ("log_softmax_gather", "trl_selective"):
        why = backends._why_unavailable(contender, "token_logprobs", DEVICE)
        if why is not None:
            pytest.skip(f"{contender} backend unavailable: {why}")
    fn = _call(contender, mode, shape, dtype)

    run = synced(fn, DEVICE)

    outputs = []  # one untimed call gives both the peak memory and the output to check
    peak = peak_extra_bytes(lambda: outputs.append(run()), DEVICE)
    _check(mode, shape, dtype, outputs.pop())
    n, vocab = SHAPES[shape]
    benchmark.extra_info.update(
        machine=machine(), device=str(DEVICE), contender=contender, mode=mode, dtype=str(dtype), N=n, V=vocab,
        peak_extra_bytes=peak, logits_bytes=n * vocab * torch.empty((), dtype=dtype).element_size(),
    )  # fmt: skip
    if shape == "recipe" and DEVICE.type == "cpu":  # 0.1 s to 5 s per call on the 2-core CPU: few rounds
        benchmark.pedantic(run, rounds=5 if mode == "fwd" else 3, iterations=1, warmup_rounds=1)
    else:
        benchmark(run)
    _record_rates(benchmark, contender, (mode, shape, dtype))


def _record_rates(benchmark, contender: str, key: tuple) -> None:
    """GB/s of the finished benchmark and its speedup over log_softmax_gather (reported only)."""
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    median = benchmark.stats.stats.median
    passes = 1 if key[0] == "fwd" else 3  # fwd: read the logits; fwd_bwd: read them twice, write the gradient
    benchmark.extra_info["gbps"] = passes * benchmark.extra_info["logits_bytes"] / median / 1e9
    if contender == "log_softmax_gather":
        _baseline_seconds[key] = median
        return
    speedup = _baseline_median(key) / median
    benchmark.extra_info["speedup_vs_log_softmax_gather"] = speedup
    print(f"\ntoken_logprobs {contender} {'/'.join(map(str, key))}: {median * 1e3:.1f} ms, {speedup:.2f}x vs "
          f"log_softmax_gather, peak +{benchmark.extra_info['peak_extra_bytes'] / 1e6:.0f} MB")  # fmt: skip
