"""The measuring steps of `make gpu-check` (scripts/gpu_check.py), one subcommand each, each writing its figures as
JSON to --result. On a CUDA machine they run at real shapes; with --tiny (the dry run on a CPU machine) at shapes
small enough for a 2-core CPU, on the CPU kernels, to prove the code paths run, not to measure anything.

    python -m scripts.gpu_bench kernels --backend triton --result r.json   # every kernel once at small shapes
    python -m scripts.gpu_bench token_logprobs --result r.json             # GB/s against the card's bandwidth
    python -m scripts.gpu_bench linear_token_logprobs --result r.json      # TFLOP/s against bf16 peak, vs Liger
    python -m scripts.gpu_bench mcq_rewards --result r.json
    python -m scripts.gpu_bench decode --result r.json                     # engine vs HF generate vs the roofline
    python -m scripts.gpu_bench train --result r.json --out DIR            # 3 training steps, time split

Each correctness comparison raises (non-zero exit) when a kernel disagrees with caprl_core.reference: a benchmark
is a claim only for a kernel that computes the right thing. `kernels` is what compute-sanitizer runs over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the dry run: Triton through its interpreter, set before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from caprl_core import backends, ops, reference  # noqa: E402
from scripts.gpu_machine import CUDA, DEVICE, VOCAB, card_peaks, percent, synced_seconds  # noqa: E402


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` synchronised calls after one warm-up call (compiles, fills caches)."""
    fn()
    return statistics.median(synced_seconds(fn) for _ in range(repeats))


def assert_close(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float) -> float:
    """Max |got - expected|; raises naming `name` when it exceeds atol (a wrong kernel is never benchmarked)."""
    err = (got.double() - expected.double()).abs().max().item()
    if not err <= atol:  # also catches NaN
        raise AssertionError(f"{name}: max error {err:.3g} > {atol:.3g}")
    return err


def require(op: str, backend: str) -> None:
    """Raises unless `backend` itself runs `op` here: the ops fall back with a warning, and a sanitizer run or a
    benchmark of the fallback would check or measure another kernel."""
    chosen = backends.select(op, DEVICE, backend)
    if chosen != backend:
        raise RuntimeError(f"{op}: backend {backend!r} cannot run here (it would fall back to {chosen!r})")


def _logprob_inputs(n: int, v: int, h: int | None, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    targets = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
    if h is None:
        return torch.randn(n, v, generator=gen, device=DEVICE).mul_(3).to(dtype), targets
    hidden = torch.randn(n, h, generator=gen, device=DEVICE).to(dtype)
    weight = (torch.randn(v, h, generator=gen, device=DEVICE) * (3 / h**0.5)).to(dtype)
    return hidden, weight, targets


def kernel_backends(backend: str) -> dict[str, Callable[[], None]]:
    """Each kernel of `backend` once at small shapes, checked against the reference: compute-sanitizer's workload.
    The CUDA backend has group_advantages (both storage paths) and mcq_rewards (both modes); Triton has every op and
    the paged attention kernels (store, prefill, decode, through the engine). "cpu" stands in for both in the dry
    run."""
    runs = {"group_advantages": lambda: _check_group_advantages(backend, num_groups=50)}
    if backend != "triton":  # the CUDA kernel's global-memory path starts above ~5,800 groups (227 KiB shared)
        runs["group_advantages_global"] = lambda: _check_group_advantages(backend, num_groups=6000)
    runs["mcq_rewards"] = lambda: _check_mcq(backend)
    runs["mcq_rewards_vocab"] = lambda: _check_mcq_vocab(backend)
    if backend != "cuda":
        runs["token_logprobs"] = lambda: _check_token_logprobs(backend)
        runs["linear_token_logprobs"] = lambda: _check_linear(backend)
    if backend == "triton":
        runs["paged_attention"] = _check_paged_attention
    return runs


def _check_group_advantages(backend: str, num_groups: int) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, num_groups, (3 * num_groups,), generator=gen).to(DEVICE)
    rewards = (torch.randint(0, 9, (len(ids), 2), generator=gen).double() / 8).to(DEVICE, torch.float32)
    got = ops.group_advantages(rewards, group_ids=ids, method="rloo", backend=backend)
    expected = reference.group_advantages(rewards.double(), group_ids=ids, method="rloo")
    assert_close(f"group_advantages[{backend}, G={num_groups}]", got, expected, 1e-4)


def _check_mcq(backend: str) -> None:
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(12, 40, generator=gen), torch.randn(300, 40, generator=gen)
    ids = torch.randint(0, 300, (12, 5), generator=gen)
    answers, caption = torch.randint(0, 4, (12,), generator=gen), torch.arange(12) % 3
    args = [t.to(DEVICE) for t in (hidden, weight, ids, answers, caption)]
    kwargs = dict(num_options=4, mode="soft")
    got = ops.mcq_rewards(*args, 3, backend=backend, **kwargs)[0]
    expected = reference.mcq_rewards(*[a.double() if a.is_floating_point() else a for a in args], 3, **kwargs)[0]
    assert_close(f"mcq_rewards[{backend}]", got, expected, 1e-4)


def _check_mcq_vocab(backend: str) -> None:
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(12, 40, generator=gen), torch.randn(301, 40, generator=gen)
    token_options = torch.randint(-1, 5, (301,), generator=gen)
    answers, caption = torch.randint(0, 4, (12,), generator=gen), torch.arange(12) % 3
    args = [t.to(DEVICE) for t in (hidden, weight, token_options, answers, caption)]
    kwargs = dict(num_options=5, mode="soft", normalize="vocab")
    got = ops.mcq_rewards(*args, 3, backend=backend, **kwargs)[0]
    expected = reference.mcq_rewards(*[a.double() if a.is_floating_point() else a for a in args], 3, **kwargs)[0]
    assert_close(f"mcq_rewards_vocab[{backend}]", got, expected, 1e-4)


def _check_token_logprobs(backend: str) -> None:
    for dtype, atol in [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)]:
        logits, targets = _logprob_inputs(5, 1009, None, dtype)
        x = logits.detach().requires_grad_()
        got = ops.token_logprobs(x, targets, backend=backend)
        (grad,) = torch.autograd.grad(got.sum(), x)
        y = logits.detach().double().requires_grad_()
        expected = reference.token_logprobs(y, targets)
        (ref_grad,) = torch.autograd.grad(expected.sum(), y)
        assert_close(f"token_logprobs[{backend}, {dtype}]", got, expected, atol)
        assert_close(f"token_logprobs grad[{backend}, {dtype}]", grad, ref_grad, atol)


def _check_linear(backend: str) -> None:
    for dtype, atol in [(torch.float32, 1e-4), (torch.bfloat16, 1e-1)]:
        hidden, weight, targets = _logprob_inputs(5, 1009, 37, dtype)
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        got = ops.linear_token_logprobs(h, w, targets, backend=backend)
        grads = torch.autograd.grad(got.sum(), (h, w))
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        expected = reference.linear_token_logprobs(h64, w64, targets)
        ref_grads = torch.autograd.grad(expected.sum(), (h64, w64))
        assert_close(f"linear_token_logprobs[{backend}, {dtype}]", got, expected, atol)
        for name, g, r in zip(("hidden", "weight"), grads, ref_grads, strict=True):
            assert_close(f"linear_token_logprobs grad_{name}[{backend}, {dtype}]", g, r, atol)


def _check_paged_attention() -> None:
    """Greedy decoding through the Triton store/prefill/decode kernels equals the PyTorch attention path."""
    from caprl_core.models import tiny_qwen2
    from caprl_core.sampler.engine import Engine
    from caprl_core.sampler.sequence import SamplingParams

    model = tiny_qwen2().to(DEVICE)
    prompts, params = [[1, 2, 3], list(range(5, 22))], SamplingParams(temperature=0, max_new_tokens=4)
    outs = {}
    for name in ("triton", "torch"):
        engine = Engine(model, num_kv_blocks=16, block_size=4, attn_backend=name)
        if engine.attn_backend != name:
            raise RuntimeError(f"paged attention: {name!r} unavailable, the engine chose {engine.attn_backend!r}")
        outs[name] = [o[0].token_ids for o in engine.generate(prompts, params)]
    if outs["triton"] != outs["torch"]:
        raise AssertionError(f"paged attention: triton {outs['triton']} != torch {outs['torch']}")


def run_kernels(args: argparse.Namespace) -> dict:
    ran = {}
    for name, check in kernel_backends(args.backend).items():
        if name != "paged_attention":  # the engine checks its own attention backend
            require(name.removesuffix("_global"), args.backend)
        start = time.perf_counter()
        check()
        ran[name] = round(time.perf_counter() - start, 3)
    if CUDA:
        torch.cuda.synchronize()
    return {"backend": args.backend, "device": DEVICE.type, "kernels_s": ran}


def bench_token_logprobs(args: argparse.Namespace) -> dict:
    """Forward and forward+backward of token_logprobs on bf16 logits: bytes moved / time against the bandwidth."""
    n, v = (8, 1000) if args.tiny else (4096, VOCAB)
    backend = "cpu" if args.tiny else "triton"
    require("token_logprobs", backend)
    logits, targets = _logprob_inputs(n, v, None, torch.bfloat16)
    check = ops.token_logprobs(logits, targets, backend=backend)
    err = assert_close("token_logprobs", check, reference.token_logprobs(logits.double(), targets), 5e-2)
    x = logits.detach().requires_grad_()
    fwd = median_seconds(lambda: ops.token_logprobs(logits, targets, backend=backend), args.repeats)
    both = median_seconds(lambda: torch.autograd.grad(ops.token_logprobs(x, targets, backend=backend).sum(), x),
                          args.repeats)  # fmt: skip
    logit_bytes = logits.numel() * logits.element_size()
    fwd_gbs, both_gbs = logit_bytes / fwd / 1e9, 3 * logit_bytes / both / 1e9  # fwd+bwd: read, read, write grad
    peak = card_peaks()["bandwidth_gbs"]
    return {
        "backend": backend, "shape": [n, v], "dtype": "bfloat16", "max_error_vs_fp64": err,
        "fwd_ms": fwd * 1e3, "fwd_gbs": fwd_gbs, "fwd_pct_bandwidth": percent(fwd_gbs, peak),
        "fwd_bwd_ms": both * 1e3, "fwd_bwd_gbs": both_gbs, "fwd_bwd_pct_bandwidth": percent(both_gbs, peak),
    }  # fmt: skip


def _liger_fwd_bwd(hidden, weight, targets) -> Callable[[], object] | str:
    """Liger-Kernel's fused linear cross-entropy (sum of -logp, the same matmuls) as a callable, or why not."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # not installed, or a broken install
        return f"not importable: {type(e).__name__}: {e}"
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    return lambda: torch.autograd.grad(loss_fn(w, h, targets), (h, w))


def bench_linear_token_logprobs(args: argparse.Namespace) -> dict:
    """Forward+backward of linear_token_logprobs: 6 N H V model FLOPs (one forward and two backward matmuls; the
    kernel's recomputation of the logits is not counted) / time, against the card's dense bf16 peak."""
    n, h, v = (8, 16, 1000) if args.tiny else (4096, 2048, VOCAB)
    backend = "cpu" if args.tiny else "triton"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    require("linear_token_logprobs", backend)
    hidden, weight, targets = _logprob_inputs(n, v, h, dtype)
    got = ops.linear_token_logprobs(hidden, weight, targets, backend=backend)
    expected = torch.log_softmax(hidden.float() @ weight.float().T, -1).gather(1, targets[:, None]).squeeze(1)
    err = assert_close("linear_token_logprobs", got, expected, 5e-2)  # bf16 inputs, fp32 logits on both sides
    del expected
    hw = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    fn = lambda: torch.autograd.grad(ops.linear_token_logprobs(*hw, targets, backend=backend).sum(), hw)
    ours = median_seconds(fn, args.repeats)
    flops, peak = 6 * n * h * v, card_peaks()["bf16_tflops"]
    result = {"backend": backend, "shape": {"N": n, "H": h, "V": v}, "dtype": str(dtype).removeprefix("torch."),
              "max_error_vs_fp32": err,
              "fwd_bwd_ms": ours * 1e3, "tflops": flops / ours / 1e12,
              "pct_bf16_peak": percent(flops / ours / 1e12, peak)}  # fmt: skip
    liger = _liger_fwd_bwd(hidden, weight, targets)
    if isinstance(liger, str):
        result["liger"] = liger
    else:
        theirs = median_seconds(liger, args.repeats)
        result["liger"] = {"fwd_bwd_ms": theirs * 1e3, "tflops": flops / theirs / 1e12,
                           "pct_bf16_peak": percent(flops / theirs / 1e12, peak)}  # fmt: skip
    return result


def bench_mcq_rewards(args: argparse.Namespace) -> dict:
    """mcq_rewards at reader-scoring shapes on each CUDA backend (cpu in the dry run), checked against the
    reference, beside the full-vocabulary projection it replaces."""
    p, h, k = (16, 32, 5) if args.tiny else (1024, 2048, 5)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(p, h, generator=gen, device=DEVICE).to(torch.bfloat16)
    weight = (torch.randn(VOCAB, h, generator=gen, device=DEVICE) / h**0.5).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (k,), generator=gen, device=DEVICE)
    answers = torch.randint(0, k, (p,), generator=gen, device=DEVICE)
    caption = torch.arange(p, device=DEVICE) // 8
    call = lambda backend: ops.mcq_rewards(hidden, weight, ids, answers, caption, p // 8, mode="soft", backend=backend)
    expected = reference.mcq_rewards(hidden.float(), weight.float(), ids, answers, caption, p // 8, mode="soft")[0]
    result = {"shape": {"P": p, "H": h, "K": k, "V": VOCAB}, "dtype": "bfloat16"}
    for backend in ("cpu",) if args.tiny else ("triton", "cuda"):
        require("mcq_rewards", backend)
        err = assert_close(f"mcq_rewards[{backend}]", call(backend)[0], expected, 1e-2)
        result[backend] = {"ms": median_seconds(lambda b=backend: call(b), args.repeats) * 1e3, "max_error": err}
    full = lambda: torch.log_softmax((hidden @ weight.T).float(), -1)[:, ids]  # [P, K] through [P, V]
    result["full_vocab_projection_ms"] = median_seconds(full, args.repeats) * 1e3
    # normalize="vocab": 8 tokens decide each slot; one pass over all V rows (2 P V H flops), checked likewise
    token_options = torch.full((VOCAB,), -1, dtype=torch.long, device=DEVICE)
    token_options[torch.randperm(VOCAB, generator=gen, device=DEVICE)[: 8 * k]] = torch.arange(8 * k, device=DEVICE) % k
    vocab_args = (hidden, weight, token_options, answers, caption, p // 8)
    vocab = lambda backend: ops.mcq_rewards(*vocab_args, num_options=k, normalize="vocab", backend=backend)
    upcast = (hidden.float(), weight.float(), *vocab_args[2:])
    expected = reference.mcq_rewards(*upcast, num_options=k, normalize="vocab")[1]  # [P, K] log-masses
    for backend in ("cpu",) if args.tiny else ("triton", "cuda"):
        require("mcq_rewards_vocab", backend)
        err = assert_close(f"mcq_rewards_vocab[{backend}]", vocab(backend)[1], expected, 1e-3)
        ms = median_seconds(lambda b=backend: vocab(b), args.repeats) * 1e3
        result[f"{backend}_vocab"] = {"ms": ms, "max_error": err, "tflops": 2 * p * VOCAB * h / ms / 1e9}
    return result


def bench_decode(args: argparse.Namespace) -> dict:
    from scripts.gpu_bench_decode import bench_decode  # imports transformers (seconds): only for this command

    return bench_decode(args)


def bench_train(args: argparse.Namespace) -> dict:
    from scripts.gpu_bench_decode import bench_train

    return bench_train(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = {"kernels": run_kernels, "token_logprobs": bench_token_logprobs, "decode": bench_decode,
                "linear_token_logprobs": bench_linear_token_logprobs, "mcq_rewards": bench_mcq_rewards,
                "train": bench_train}  # fmt: skip
    parser.add_argument("command", choices=sorted(commands))
    parser.add_argument("--result", type=Path, required=True, help="where the JSON figures go")
    parser.add_argument("--backend", default="triton", choices=["triton", "cuda", "cpu"], help="kernels: whose")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes (the dry run)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu-check-train"), help="train: run dir")
    args = parser.parse_args()
    args.result.write_text(json.dumps(commands[args.command](args), indent=2))
    sys.exit(0)
