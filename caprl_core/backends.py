"""Backend selection and loading: which implementation of an op runs for a tensor on a device.

Backends, in fallback order: "triton" (kernels/, CUDA tensors; CPU tensors only under TRITON_INTERPRET=1),
"cuda" (csrc/cuda, CUDA tensors), "cpu" (csrc/cpu, C++/OpenMP, CPU tensors), "torch" (caprl_core.reference,
anything). The default is "triton" for CUDA tensors and "cpu" for CPU tensors; `backend=` on an op or the
environment variable CAPRL_BACKEND picks another. A backend that cannot run the op on that device falls back to
the next in the order with one warning: never to a different answer.

Every kernel backend is a module exposing the same functions on 2-D, validated, last-dim-contiguous inputs
(the ops layer flattens, checks and converts before calling; outputs are fp32, fp64 for fp64 inputs):

    token_logprobs_fwd(logits[N, V], targets[N] i64, temperature, ignore_index, return_entropy)
        -> (logp[N], lse[N], entropy[N] | None)          # lse = logsumexp(logits / T) per row
    token_logprobs_bwd(logits, targets, lse, entropy | None, grad_logp[N], grad_entropy[N] | None,
                       temperature, ignore_index) -> grad_logits[N, V] (dtype of logits)
    linear_token_logprobs_fwd(hidden[N, H], weight[V, H], bias[V] | None, targets, temperature, ignore_index,
                              return_entropy) -> (logp[N], lse[N], entropy[N] | None)
    linear_token_logprobs_bwd(hidden, weight, bias, targets, lse, entropy | None, grad_logp, grad_entropy | None,
                              temperature, ignore_index) -> (grad_hidden[N, H], grad_weight[V, H], grad_bias[V] | None)
    group_advantages(rewards[N, R] (acc dtype), group_index[N] i64 dense in [0, G), num_groups, method, scale,
                     weights[R] (acc dtype), eps) -> adv[N]
    mcq_rewards(hidden[P, H], weight[V, H], bias[V] | None, option_ids[P, K] i64, answers[P] i64,
                num_options[P] i64, prompt_order[P] i64, caption_offsets[C + 1] i64, temperature, mode)
        -> (rewards[C], option_logprobs[P, K])
        # prompt_order lists the prompts of caption c at prompt_order[caption_offsets[c]:caption_offsets[c + 1]]
    mcq_rewards_vocab(hidden[P, H], weight[V, H], bias[V] | None, token_options[V] i64 in [-1, K), answers[P] i64
                      in [0, K), prompt_order[P] i64, caption_offsets[C + 1] i64, num_slots K, temperature, mode)
        -> (rewards[C], option_logprobs[P, K])
        # normalize="vocab" of ops.mcq_rewards: option_logprobs[p, k] = logsumexp of logits / T over the columns
        # with token_options == k minus the logsumexp over all V columns (-inf for a slot with no tokens), in one
        # pass over V; K <= 16. Lives in the same kernel files as mcq_rewards.

A backend module may leave an op out (the CUDA backend has no token_logprobs): `has_op` tells, and dispatch then
falls back along the order with one warning.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import cache
from types import ModuleType

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
# The Triton ops, one module each: caprl_core.kernels.<op> (kernels/<op>.py in the repository). kernels/ has no
# __init__.py on purpose (see pyproject.toml), so the backend module is assembled here from the op files.
TRITON_OPS = ("token_logprobs", "linear_token_logprobs", "group_advantages", "mcq_rewards")
ENV_VAR = "CAPRL_BACKEND"
OPS = ("token_logprobs", "linear_token_logprobs", "group_advantages", "mcq_rewards", "mcq_rewards_vocab")
_warned: set[tuple[str, str, str]] = set()


def triton_interpreter() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _triton_importable() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # an ImportError, or a broken install raising anything else
        return f"triton does not import ({e})"
    return None


def _why_unavailable(name: str, op: str, device: torch.device) -> str | None:
    """None when backend `name` can run `op` on `device`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreter()):
            return f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
        if _triton_importable() is not None:
            return _triton_importable()
    if name == "cuda" and device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got {device.type}"
    if name == "cpu" and device.type != "cpu":
        return f"the C++ CPU kernels need CPU tensors, got {device.type}"
    why = _load_error(name)
    if why is not None:
        return why
    return None if has_op(load(name), op) else f"the {name} backend has no kernel for {op}"


@cache
def _load_error(name: str) -> str | None:
    """Why the kernel module of `name` does not load (None if it does). Cached: a failed build is not retried
    on every call."""
    try:
        load(name)
    except Exception as e:  # a compiler error, a missing toolchain, a broken kernel file
        last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        return f"the {name} kernels did not load: {last}"
    return None


def has_op(module: ModuleType, op: str) -> bool:
    """Whether a backend module implements `op` (as `op` or as `op_fwd` + `op_bwd`)."""
    return hasattr(module, op) or (hasattr(module, op + "_fwd") and hasattr(module, op + "_bwd"))


def select(op: str, device: torch.device, backend: str | None = None) -> str:
    """Name of the backend that runs `op` on `device`: the requested one (argument, then CAPRL_BACKEND), else the
    device default, falling back along BACKENDS with one warning per (request, fallback, reason)."""
    requested = backend or os.environ.get(ENV_VAR) or None
    if requested is not None and requested not in BACKENDS:
        source = "backend" if backend else ENV_VAR
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {requested!r}")
    start = requested or ("triton" if device.type == "cuda" else "cpu")
    reasons = []
    for name in BACKENDS[BACKENDS.index(start) :]:
        why = _why_unavailable(name, op, device)
        if why is None:
            if name != start:
                key = (op, start, name)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(
                        f"caprl_core.{op}: backend {start!r} unavailable ({reasons[0]}); using {name!r}", stacklevel=3
                    )
            return name
        reasons.append(why)
    raise AssertionError("unreachable: the torch backend is always available")


@cache
def load(name: str) -> ModuleType:
    """The kernel module of backend `name` ("triton", "cpu" or "cuda"); builds the C++ extensions on first use."""
    if name == "triton":
        return _load_triton()
    if name in ("cpu", "cuda"):
        from caprl_core import _build

        return _build.load_extension(name)
    raise ValueError(f"backend: no kernel module for {name!r}")


def _load_triton() -> ModuleType:
    """The triton backend: the entry points (`op`, or `op_fwd` and `op_bwd`, for every op in OPS) of every
    kernels/<op>.py in one module. A file may hold variants of its op (kernels/mcq_rewards.py: mcq_rewards_vocab)."""
    backend = ModuleType("caprl_core.kernels", "the Triton backend: one kernels/<op>.py per op")
    for op_file in TRITON_OPS:
        module = importlib.import_module(f"caprl_core.kernels.{op_file}")
        for name in (f"{op}{suffix}" for op in OPS for suffix in ("", "_fwd", "_bwd")):
            if hasattr(module, name):
                setattr(backend, name, getattr(module, name))
    return backend
