"""Update-phase memory and time of the group-shared forward: the segment attention against the dense [T, T] mask.

    .venv/bin/python -m pytest bench/bench_shared_prefix_memory.py --benchmark-only -s

Memory (`test_update_peak_memory`): the policy and prompt of bench/bench_shared_prefix.py (Qwen2.5-VL, hidden 256,
2 layers, 8 heads, 2 KV heads, vocabulary 4,096; a prompt of 1,026 tokens, 960 of them image tokens), one image with
G = 8 captions of CAPTION_TOKENS each (256, 1,024, 2,048: T = 3,074, 9,218, 17,410 packed tokens), one micro-batch,
`rl.update.update` (forward, fused log-probs, loss, backward, AdamW). Each case in a fresh process with glibc told to
unmap freed blocks, a warm-up update, then the peak extra memory of one more update: on CPU the resident set's
high-water mark above what was live before it (bench/conftest.py `peak_extra_bytes`), on CUDA the allocator's peak.
extra_info holds T, the peak, and the bytes of the dense path's [T, T] bool mask alone.

Time (`test_update_time`): bench/bench_shared_prefix.py's shape (captions of 230 to 270 tokens), both forms in one
process on one policy, both warm, the best of ROUNDS updates per form, the forms' rounds alternated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from bench_shared_prefix import DEVICE, GRID, GROUP_SIZE, TEXT_TOKENS, VOCAB, _release_freed_memory, _update_fn
from conftest import best_seconds, machine, peak_extra_bytes

from caprl_core.config_cli import parse_config
from caprl_core.models import tiny_qwen2_5_vl, vl_prompt_inputs
from caprl_core.precision import MasterWeightOptimizer
from caprl_core.rl.rollout import Rollout
from caprl_core.rl.update import update
from caprl_core.sampler.sequence import Completion
from caprl_core.shared_prefix import ATTENTION_ENV

CAPTION_TOKENS, FORMS, ROUNDS = (256, 1024, 2048), ("dense", "segments"), 3


@contextmanager
def _attention(form: str):
    previous = os.environ.get(ATTENTION_ENV)
    os.environ[ATTENTION_ENV] = form
    try:
        yield
    finally:
        os.environ.pop(ATTENTION_ENV) if previous is None else os.environ.__setitem__(ATTENTION_ENV, previous)


def _memory_update_fn(caption_tokens: int):
    """A warm update of one image's G captions of `caption_tokens` tokens each, and the packed row's length."""
    policy = tiny_qwen2_5_vl(vocab_size=VOCAB, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, seed=0)
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, VOCAB, (TEXT_TOKENS,), generator=gen).tolist()
    prompt = vl_prompt_inputs(policy, text[:8], [GRID], text[8:], seed=0)
    ids = torch.randint(0, VOCAB - 16, (GROUP_SIZE, caption_tokens), generator=gen)  # the last ids: image specials
    completions = [Completion(c, [-8.0] * caption_tokens, "stop", [-8.0] * caption_tokens) for c in ids.tolist()]
    ro = Rollout([prompt], completions, [""] * GROUP_SIZE, torch.zeros(GROUP_SIZE, dtype=torch.bool))
    config, _ = parse_config(["--group-size", str(GROUP_SIZE), "--micro-batch-size", str(GROUP_SIZE),
                              "--max-new-tokens", str(caption_tokens)])  # fmt: skip
    policy = policy.to(DEVICE)
    optimizer = MasterWeightOptimizer(policy, lambda params: torch.optim.AdamW(params, lr=1e-6))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0)
    advantages = torch.linspace(-1, 1, GROUP_SIZE)

    def step() -> dict:
        return update(policy, None, optimizer, scheduler, ro, advantages, config, DEVICE)

    step()
    return step, len(prompt["input_ids"]) + GROUP_SIZE * caption_tokens


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("caption_tokens", CAPTION_TOKENS)
def test_update_peak_memory(benchmark, caption_tokens: int, form: str) -> None:
    """Each case in a fresh process (`_release_freed_memory` must act before the first allocation)."""
    cmd = [sys.executable, __file__, "--peak-memory", str(caption_tokens)]
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's caprl_core, not an installed one
    env = {**os.environ, ATTENTION_ENV: form, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = benchmark.pedantic(lambda: subprocess.run(cmd, capture_output=True, text=True, check=True, env=env),
                              rounds=1, iterations=1)  # fmt: skip
    info = json.loads(done.stdout.splitlines()[-1])
    benchmark.extra_info.update(info)
    print(f"\n{form} memory: {info}")


def _peak_memory_main(caption_tokens: int) -> None:
    _release_freed_memory()
    step, length = _memory_update_fn(caption_tokens)
    peak = peak_extra_bytes(step, DEVICE)
    info = {"machine": machine(), "attention": os.environ.get(ATTENTION_ENV, "segments"), "group_size": GROUP_SIZE,
            "caption_tokens": caption_tokens, "packed_tokens": length, "peak_extra_mb": peak / 2**20,
            "dense_mask_mb": length * length / 2**20}  # fmt: skip
    print(json.dumps(info))


def test_update_time(benchmark) -> None:
    """bench_shared_prefix.py's batch; the two forms' rounds alternated, so other load on the machine falls on both.
    The form is read at each update (the environment variable), so one policy serves both."""
    step, info = _update_fn(True)
    times: dict[str, list[float]] = {form: [] for form in FORMS}
    for form in FORMS:  # warm both forms once more (the first update above ran the default)
        with _attention(form):
            step()
    for _ in range(ROUNDS):
        for form in FORMS:
            with _attention(form):
                times[form].append(best_seconds(step, DEVICE, rounds=1))
    best = {form: min(t) for form, t in times.items()}
    load = os.getloadavg()
    benchmark.extra_info.update({**info, "seconds": best, "all_seconds": times, "load_average": load,
                                 "dense_over_segments": best["dense"] / best["segments"]})  # fmt: skip
    with _attention("segments"):
        benchmark.pedantic(step, rounds=1, iterations=1)
    ratio = best["dense"] / best["segments"]
    print(f"\nupdate time, best of {ROUNDS} alternated: {times}; dense/segments {ratio:.2f}x; load average {load}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--peak-memory":
        sys.exit("usage: bench_shared_prefix_memory.py --peak-memory CAPTION_TOKENS (run by test_update_peak_memory)")
    _peak_memory_main(int(sys.argv[2]))
