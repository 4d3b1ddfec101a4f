"""Self-check of the fused ops: every backend that can run here against the PyTorch reference, with timings.

    python -m caprl_core.selfcheck [--vocab 151936] [--tokens 256] [--hidden 512]

Prints one line per (op, backend): max abs error against the fp64 reference (forward, and gradients where the op
has them), the median time of a forward call (`fwd`, under torch.no_grad) and, for differentiable ops, of a forward
plus backward (`fwd+bwd`); the last line is a JSON summary. Exits non-zero if any backend
disagrees with the reference beyond 1e-4. Triton runs through its interpreter on CPU-only machines (slow: it is
checked on a small shape there).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from caprl_core import backends, ops, reference  # noqa: E402

TOLERANCE = 1e-4


def _median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _op(name: str, backend: str | None) -> Callable[..., object]:
    """The reference op (backend None) or the public op pinned to `backend`."""
    if backend is None:
        return getattr(reference, name)
    return functools.partial(getattr(ops, name), backend=backend)


# Ops with a backward: their cases compute gradients when asked, and get a fwd+bwd timing too.
DIFFERENTIABLE = ("token_logprobs", "linear_token_logprobs")


def _cases(n: int, h: int, v: int, device: torch.device) -> dict[str, Callable[..., list[torch.Tensor]]]:
    """Per op: a function of the backend (None = fp64 reference) and `backward` returning the outputs, and the
    gradients of their sum when `backward` is true, to compare."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 3).to(device)
    hidden, weight = torch.randn(n, h, generator=g).to(device), (torch.randn(v, h, generator=g) / h**0.5).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    rewards, ids = torch.rand(n, 2, generator=g).to(device), torch.randint(0, n // 4 + 1, (n,), generator=g).to(device)
    letters = torch.randint(0, v, (5,), generator=g).to(device)
    answers, n_captions = torch.randint(0, 5, (n,), generator=g).to(device), max(n // 8, 1)
    captions = (torch.arange(n) % n_captions).to(device)

    def grads(backward: bool, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> list[torch.Tensor]:
        if not backward:
            with torch.no_grad():
                return [fn(*inputs)]
        inputs = tuple(x.detach().requires_grad_() for x in inputs)
        out = fn(*inputs)
        return [out, *torch.autograd.grad(out.sum(), inputs)]

    def token(backend, backward=True):
        x = logits.double() if backend is None else logits
        return grads(backward, lambda x: _op("token_logprobs", backend)(x, targets), x)

    def linear(backend, backward=True):
        hh, ww = (hidden.double(), weight.double()) if backend is None else (hidden, weight)
        return grads(backward, lambda hh, ww: _op("linear_token_logprobs", backend)(hh, ww, targets), hh, ww)

    def advantages(backend, backward=False):
        r = rewards.double() if backend is None else rewards
        return [_op("group_advantages", backend)(r, group_ids=ids, method="rloo")]

    def mcq(backend, backward=False):
        hh, ww = (hidden.double(), weight.double()) if backend is None else (hidden, weight)
        return list(_op("mcq_rewards", backend)(hh, ww, letters, answers, captions, n_captions, mode="soft"))

    return {"token_logprobs": token, "linear_token_logprobs": linear, "group_advantages": advantages,
            "mcq_rewards": mcq}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32_003, help="vocabulary size V (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens / prompts N (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H (default: %(default)s)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interpreted = device.type == "cpu" and backends.triton_interpreter()
    summary, failed = {}, False
    for backend in ("torch", "cpu", "cuda", "triton"):
        small = backend == "triton" and interpreted
        n, h, v = (8, 32, 1009) if small else (args.tokens, args.hidden, args.vocab)
        for op, case in _cases(n, h, v, device).items():
            why = backends._why_unavailable(backend, op, device)
            if why is not None:
                print(f"{op:<22} {backend:<7} skipped: {why}")
                continue
            expected = case(None)
            got = case(backend)
            err = max(
                float((a.detach().double() - b.detach().double()).abs().max())
                for a, b in zip(got, expected, strict=True)
            )
            seconds = {"fwd": _median_seconds(functools.partial(case, backend, backward=False))}
            if op in DIFFERENTIABLE:
                seconds["fwd+bwd"] = _median_seconds(functools.partial(case, backend, backward=True))
            failed |= not err <= TOLERANCE
            summary[f"{op}/{backend}"] = {"max_abs_err": err, "seconds": seconds, "shape": [n, h, v]}
            status = "ok" if err <= TOLERANCE else "MISMATCH"
            times = " ".join(f"{name} {t * 1e3:.2f} ms" for name, t in seconds.items())
            print(f"{op:<22} {backend:<7} N={n:<5} H={h:<5} V={v:<7} max|err|={err:.2e} {times} {status}")
    print(json.dumps({"device": str(device), "ok": not failed, "results": summary}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
