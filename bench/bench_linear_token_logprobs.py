"""Benchmark of linear_token_logprobs: log-probs from hidden states and the lm_head weight, forward + backward,
without materialising the [N, V] logits, against ways that do.

    .venv/bin/python -m pytest bench/bench_linear_token_logprobs.py --benchmark-only [--benchmark-json=out.json]

Shapes: "recipe" N = 4096 tokens, H = 1024, the Qwen2.5 vocabulary V = 151,936, fp32 (its logits would be
4096 x 151936 x 4 B = 2.49 GB); "small" N = 256, H = 256, same V, fp32 and bf16 (fast). Each call is forward +
backward (random upstream gradient on the log-probs, gradients for hidden and weight). Contenders:
- the kernel backend: "cpu" (C++/OpenMP, MKL GEMMs on vocab tiles) on CPU machines, "triton" on CUDA machines;
- "torch": the ops' PyTorch reference, which materialises hidden @ weight.T -> log_softmax -> gather, autograd;
- "chunked_checkpoint": the Liger/TRL-style chunked loop in plain PyTorch, below.
Targets (reported, not asserted; recipe, fp32, on the 2-core CPU): the kernel no slower than "torch", and its peak
extra memory <= 10% of the 2.49 GB of logits it avoids.

How memory is counted: `peak_extra_bytes` (bench/conftest.py) of one forward + backward call, measured once outside
the timing loop, relative to the resident memory before the call (the inputs are already resident). That includes
the gradients the call returns (N H + V H elements: 16.8 MB + 622 MB for the recipe in fp32), which every contender
must produce; extra_info `peak_extra_bytes_excl_grads` subtracts them, and `peak_vs_logits` divides that by the
bytes of fp32 logits [N, V]. TFLOP/s counts the useful work, 3 GEMMs of 2 N H V flops (forward, and the two of the
backward), for every contender; the kernel also recomputes the logits in its backward (a fourth GEMM it does not
get credit for). Every benchmarked output is checked: log-probs and grad_hidden on the first rows against the fp64
reference, grad_weight against the "torch" contender's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch
from conftest import best_seconds, machine, peak_extra_bytes, synced
from torch.utils.checkpoint import checkpoint

from caprl_core import backends, ops, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL = "triton" if DEVICE.type == "cuda" else "cpu"
CONTENDERS = ("torch", KERNEL, "chunked_checkpoint")  # "torch" first: the others' speedups and grad_weight read it
SHAPES = {"recipe": (4096, 1024, 151_936), "small": (256, 256, 151_936)}  # (N, H, V)
CASES = [("recipe", torch.float32), ("small", torch.float32), ("small", torch.bfloat16)]
CHUNK_TOKENS = 256  # chunked_checkpoint: a [256, 151936] fp32 logits chunk is 156 MB
CHECK_ROWS = 32
_torch_seconds: dict[tuple, float] = {}
_torch_results: dict[tuple, tuple] = {}  # (shape, dtype) -> the "torch" contender's (logp, grad_hidden, grad_weight)


@cache
def _problem(shape: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """hidden [N, H] ~ N(0, 1), weight [V, H] with logits ~N(0, 4), targets [N], upstream gradient [N] (fp32)."""
    n, h, vocab = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(vocab, h, generator=gen) * (2 / h**0.5)).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    grad = torch.randn(n, generator=gen).to(DEVICE)
    return hidden, weight, targets, grad


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # [chunk, V]
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def chunked_checkpoint(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The chunked approach of Liger's fused linear cross-entropy and TRL's chunked losses, written with plain
    PyTorch pieces: tokens go through in chunks of CHUNK_TOKENS; each chunk's logits are made, reduced to log-probs
    and dropped, and activation checkpointing recomputes them in the backward. (Liger computes the gradients inside
    the forward, which needs a scalar loss; per-token log-probs with an unknown upstream gradient need the
    recomputation.) Autograd materialises a [V, H] weight gradient per chunk and sums them."""
    chunks = [
        checkpoint(_chunk_logprobs, hidden[i : i + CHUNK_TOKENS], weight, targets[i : i + CHUNK_TOKENS],
                   use_reentrant=False)
        for i in range(0, hidden.shape[0], CHUNK_TOKENS)
    ]  # fmt: skip
    return torch.cat(chunks)


def _forward(contender: str) -> Callable[..., torch.Tensor]:
    if contender == "chunked_checkpoint":
        return chunked_checkpoint
    return lambda hidden, weight, targets: ops.linear_token_logprobs(hidden, weight, targets, backend=contender)


def _call(contender: str, shape: str, dtype: torch.dtype) -> Callable[[], tuple]:
    """Forward + backward; returns (logp [N], grad_hidden [N, H], grad_weight [V, H])."""
    hidden, weight, targets, grad = _problem(shape, dtype)
    forward = _forward(contender)

    def fwd_bwd() -> tuple:
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        logp = forward(h, w, targets)
        logp.backward(grad)
        return logp.detach(), h.grad, w.grad

    return fwd_bwd


def _torch_outputs(shape: str, dtype: torch.dtype) -> tuple:
    """The "torch" contender's outputs: stored by its benchmark, or computed here when it did not run first."""
    if (shape, dtype) not in _torch_results:
        _torch_results[(shape, dtype)] = _call("torch", shape, dtype)()
    return _torch_results[(shape, dtype)]


def _check(contender: str, shape: str, dtype: torch.dtype, out: tuple) -> None:
    hidden, weight, targets, grad = _problem(shape, dtype)
    h = hidden[:CHECK_ROWS].double().requires_grad_()
    expected = reference.linear_token_logprobs(h, weight.double(), targets[:CHECK_ROWS])  # fp64, first rows
    expected.backward(grad[:CHECK_ROWS].double())  # a row's grad_hidden depends on that row only
    # fp32 math on both sides of the comparison: the acceptance bound 1e-5 on log-probs; grad_hidden sums V products
    # (PyTorch's own fp32 reference is ~1e-4 relative off at V = 151,936). bf16 chunks round their logits to bf16.
    chunked_bf16 = dtype == torch.bfloat16 and contender == "chunked_checkpoint"
    tol = dict(rtol=2e-2, atol=2e-1) if chunked_bf16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][:CHECK_ROWS].double(), expected, **tol)
    grad_tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1][:CHECK_ROWS].double(), h.grad, **grad_tol)
    torch.testing.assert_close(out[2].float(), _torch_outputs(shape, dtype)[2].float(), **grad_tol)


def _torch_median(key: tuple) -> float:
    """Seconds per "torch" call: its benchmark's median when it ran first, else one timed call."""
    if key not in _torch_seconds:
        _torch_seconds[key] = best_seconds(_call("torch", *key), DEVICE, rounds=1)
    return _torch_seconds[key]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize(("shape", "dtype"), CASES, ids=[f"{s}-{str(d)[6:]}" for s, d in CASES])
def test_linear_token_logprobs(benchmark, shape: str, dtype: torch.dtype, contender: str) -> None:
    if contender != "chunked_checkpoint":
        why = backends._why_unavailable(contender, "linear_token_logprobs", DEVICE)
        if why is not None:
            pytest.skip(f"{contender} backend unavailable: {why}")
    elif dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("bf16 matmuls run ~80x slower than fp32 on this CPU (no bf16 FMA): 93 s per small call")
    fn = _call(contender, shape, dtype)

    run = synced(fn, DEVICE)

    outputs = []  # one untimed call gives both the peak memory and the outputs to check
    peak = peak_extra_bytes(lambda: outputs.append(run()), DEVICE)
    out = outputs.pop()
    if contender == "torch":
        _torch_results[(shape, dtype)] = out  # grad_weight oracle of the other contenders
    _check(contender, shape, dtype, out)
    del out
    _record_memory(benchmark, contender, shape, dtype, peak)
    if shape == "recipe" and DEVICE.type == "cpu":  # ~40 s per call on the 2-core CPU: two rounds
        benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _record_rates(benchmark, contender, (shape, dtype))


def _record_memory(benchmark, contender: str, shape: str, dtype: torch.dtype, peak: int) -> None:
    n, h, vocab = SHAPES[shape]
    itemsize = torch.empty((), dtype=dtype).element_size()
    grads = (n * h + vocab * h) * itemsize  # grad_hidden + grad_weight, returned by every contender
    logits_fp32 = n * vocab * 4
    benchmark.extra_info.update(
        machine=machine(), device=str(DEVICE), contender=contender, dtype=str(dtype), N=n, H=h, V=vocab,
        peak_extra_bytes=peak, grads_bytes=grads, peak_extra_bytes_excl_grads=peak - grads,
        logits_fp32_bytes=logits_fp32, peak_vs_logits=(peak - grads) / logits_fp32,
    )  # fmt: skip


def _record_rates(benchmark, contender: str, key: tuple) -> None:
    """TFLOP/s of the finished benchmark and its speedup over "torch" (reported only)."""
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    median = benchmark.stats.stats.median
    n, h, vocab = SHAPES[key[0]]
    benchmark.extra_info["tflops"] = 3 * 2 * n * h * vocab / median / 1e12
    if contender == "torch":
        _torch_seconds[key] = median
        return
    speedup = _torch_median(key) / median
    benchmark.extra_info["speedup_vs_torch"] = speedup
    info = benchmark.extra_info
    print(f"\nlinear_token_logprobs {contender} {key[0]}/{key[1]}: {median:.2f} s, {speedup:.2f}x vs torch, "
          f"peak +{info['peak_extra_bytes_excl_grads'] / 1e6:.0f} MB beyond the grads "
          f"({100 * info['peak_vs_logits']:.1f}% of the fp32 logits)")  # fmt: skip
