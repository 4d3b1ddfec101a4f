"""Benchmark of the lm_head step of TRL's GRPOTrainer: TRL's own fused head against ours
(`caprl_core.integrations.trl`, i.e. `ops.linear_token_logprobs`), forward + backward.

    .venv/bin/python -m pytest bench/bench_trl_fused_logprobs.py --benchmark-only -s [--benchmark-json=out.json]

The same work on both sides: the completion positions' hidden states only, [B * K, H] = 8 sequences x 32 completion
tokens, H = 2,048 (Qwen2.5-3B), the Qwen2.5 vocabulary V = 151,936, fp32, temperature 1.0; log-probs and entropies
computed (GRPO asks for both), a random upstream gradient on the log-probs, gradients for hidden and weight.
Contenders:
- "trl": `trl.kernels.ChunkedLogProbFunction`, the function `trl.trainer.utils.add_fused_lm_head` installs in the
  model's forward (32,768-wide vocabulary chunks; Triton on CUDA, torch ops elsewhere);
- "caprl": `ops.linear_token_logprobs` with its default backend (C++/OpenMP on CPU, Triton on CUDA).
Memory: `peak_extra_bytes` (bench/conftest.py) of one untimed call, including the gradients every contender returns
(grad_weight alone is V H x 4 B = 1.24 GB); `peak_extra_bytes_excl_grads` subtracts them. Outputs are checked against
each other (log-probs, entropies, both gradients). TFLOP/s counts 3 GEMMs of 2 N H V flops for both.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch
from conftest import machine, peak_extra_bytes, synced

from caprl_core import ops

trl_kernels = pytest.importorskip("trl.kernels", reason="the baseline is TRL's fused lm_head")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_SEQUENCES, COMPLETION_TOKENS, HIDDEN, VOCAB = 8, 32, 2048, 151_936
TEMPERATURE = 1.0
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, what add_fused_lm_head passes
_outputs: dict[str, tuple] = {}


@cache
def _problem() -> tuple[torch.Tensor, ...]:
    """hidden [N, H] ~ N(0, 1), weight [V, H] with logits ~N(0, 4), targets [N], upstream gradient [N]."""
    n = NUM_SEQUENCES * COMPLETION_TOKENS
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, HIDDEN, generator=gen).to(DEVICE)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * (2 / HIDDEN**0.5)).to(DEVICE)
    targets = torch.randint(0, VOCAB, (n,), generator=gen).to(DEVICE)
    grad = torch.randn(n, generator=gen).to(DEVICE)
    return hidden, weight, targets, grad


def _trl_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp, entropy, *_ = trl_kernels.ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, TEMPERATURE, TRL_CHUNK, None, 1.0, ("log_probs", "entropy")
    )
    return logp, entropy


def _caprl_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.linear_token_logprobs(hidden, weight, targets, temperature=TEMPERATURE, return_entropy=True)


def _call(contender: str) -> Callable[[], tuple]:
    """Forward + backward; returns (logp [N], entropy [N], grad_hidden [N, H], grad_weight [V, H])."""
    hidden, weight, targets, grad = _problem()
    head = _trl_head if contender == "trl" else _caprl_head

    def fwd_bwd() -> tuple:
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        logp, entropy = head(h, w, targets)
        logp.backward(grad)
        return logp.detach(), entropy.detach(), h.grad, w.grad

    return fwd_bwd


def _check(out: tuple) -> None:
    """Against the other contender's outputs, when it ran first: fp32 on both sides."""
    other = next(iter(_outputs.values()), None)
    if other is None:
        return
    for got, want, tol in zip(out, other, (1e-4, 1e-4, 1e-4, 1e-4), strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=1e-4)


@pytest.mark.parametrize("contender", ["trl", "caprl"])
def test_trl_fused_logprobs(benchmark, contender: str) -> None:
    run = synced(_call(contender), DEVICE)
    outputs = []  # one untimed call gives the peak memory and the outputs to check
    peak = peak_extra_bytes(lambda: outputs.append(run()), DEVICE)
    out = outputs.pop()
    _check(out)
    _outputs[contender] = out
    n = NUM_SEQUENCES * COMPLETION_TOKENS
    grads = (n * HIDDEN + VOCAB * HIDDEN) * 4
    benchmark.extra_info.update(
        machine=machine(), device=str(DEVICE), contender=contender, dtype="float32", N=n, H=HIDDEN, V=VOCAB,
        peak_extra_bytes=peak, peak_extra_bytes_excl_grads=peak - grads, logits_fp32_bytes=n * VOCAB * 4,
    )  # fmt: skip
    rounds = 2 if DEVICE.type == "cpu" else 5  # a call is seconds on the 2-core CPU
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0 if DEVICE.type == "cpu" else 1)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["tflops"] = 3 * 2 * n * HIDDEN * VOCAB / median / 1e12
        print(f"\nlm_head logp+entropy fwd+bwd {contender}: {median:.2f} s, "
              f"{benchmark.extra_info['tflops'] * 1e3:.1f} GFLOP/s, peak +{peak / 1e6:.0f} MB "
              f"(+{(peak - grads) / 1e6:.0f} MB beyond the grads)")  # fmt: skip
