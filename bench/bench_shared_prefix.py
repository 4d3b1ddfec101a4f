"""Update-phase benchmark: the group-shared training forward against one padded row per caption.

    .venv/bin/python -m pytest bench/bench_shared_prefix.py --benchmark-only -s

One image with G = 8 captions, shapes where the prompt matters: a Qwen2.5-VL policy with hidden 256 (2 layers, 8
heads, 2 KV heads, vocabulary 4,096; the tiny 2-block vision tower), a prompt of 1,026 tokens (960 image tokens of a
60 x 64 patch grid, their 2 markers, 64 text tokens) and captions of 230 to 270 tokens (1,997 in all). One
micro-batch of the 8 captions, `rl.update.update` (forward, fused log-probs, GRPO loss, backward, AdamW on fp32
masters). Both sides warm: one update first (Adam state, allocator). `test_update_time`: the best of `ROUNDS`
updates per side, the two sides' rounds alternated. `test_update_peak_memory`: each side in a fresh process, with
glibc told to unmap freed blocks (`_release_freed_memory`), the peak extra memory of one more update (RSS high-water
mark above what was live before; on CUDA the allocator's peak). extra_info holds the time or the peak, the tokens
the language model ran and the images the vision tower encoded.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest
import torch
from conftest import best_seconds, machine, peak_extra_bytes

from caprl_core.config_cli import parse_config
from caprl_core.models import tiny_qwen2_5_vl, vl_prompt_inputs
from caprl_core.precision import MasterWeightOptimizer
from caprl_core.rl.rollout import Rollout
from caprl_core.rl.update import update
from caprl_core.sampler.sequence import Completion

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GROUP_SIZE, GRID, TEXT_TOKENS, VOCAB, ROUNDS = 8, [1, 60, 64], 64, 4096, 3


def _release_freed_memory() -> None:
    """glibc keeps freed blocks resident once its mmap threshold has grown (it does so after large frees), so after
    a warm-up the RSS high-water mark would measure the heap's leftovers, not the update's working set. A fixed
    threshold of 128 KiB maps every large tensor on its own and unmaps it when freed. (Measured before this: a warm
    unshared update +61 MB, i.e. its working set mostly hidden in memory the warm-up had left resident.)"""
    if sys.platform.startswith("linux") and DEVICE.type == "cpu":
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def _setup():
    policy = tiny_qwen2_5_vl(vocab_size=VOCAB, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, seed=0)
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, VOCAB, (TEXT_TOKENS,), generator=gen).tolist()
    prompt = vl_prompt_inputs(policy, text[:8], [GRID], text[8:], seed=0)
    lengths = [230 + 40 * j // (GROUP_SIZE - 1) for j in range(GROUP_SIZE)]  # 230 .. 270
    completions = [Completion(torch.randint(0, VOCAB, (n,), generator=gen).tolist(), [-8.0] * n, "stop", [-8.0] * n)
                   for n in lengths]  # fmt: skip
    ro = Rollout([prompt], completions, [""] * GROUP_SIZE, torch.zeros(GROUP_SIZE, dtype=torch.bool))
    return policy.to(DEVICE), ro


def _update_fn(shared: bool):
    """A warm `rl.update.update` of the benchmark's batch (one update already run: Adam state, allocator) and its
    metrics."""
    config, _ = parse_config(["--group-size", str(GROUP_SIZE), "--micro-batch-size", str(GROUP_SIZE),
                              "--max-new-tokens", "512", "--shared-prefix", str(shared).lower()])  # fmt: skip
    policy, ro = _setup()
    optimizer = MasterWeightOptimizer(policy, lambda params: torch.optim.AdamW(params, lr=1e-6))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0)
    advantages = torch.linspace(-1, 1, GROUP_SIZE)

    def step() -> dict:
        return update(policy, None, optimizer, scheduler, ro, advantages, config, DEVICE)

    metrics = step()
    info = {"machine": machine(), "prompt_tokens": len(ro.prompts[0]["input_ids"]),
            "caption_tokens": sum(len(c.token_ids) for c in ro.completions), "update_tokens": metrics["update_tokens"],
            "update_images": metrics["update_images"], "loss": metrics["loss"]}  # fmt: skip
    return step, info


def test_update_time(benchmark) -> None:
    """Both sides in one process, their rounds alternated, so that other load on the machine falls on both."""
    sides = {"shared": _update_fn(True), "unshared": _update_fn(False)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(ROUNDS):
        for name, (step, _) in sides.items():
            times[name].append(best_seconds(step, DEVICE, rounds=1))
    info = {name: {**side_info, "seconds": min(times[name]), "all_seconds": times[name]}
            for name, (_, side_info) in sides.items()}  # fmt: skip
    speedup = info["unshared"]["seconds"] / info["shared"]["seconds"]
    benchmark.extra_info.update({"machine": machine(), **info, "speedup": speedup})
    benchmark.pedantic(sides["shared"][0], rounds=1, iterations=1)
    print(f"\nupdate time, best of {ROUNDS} alternated: {info}; shared {speedup:.2f}x faster")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_update_peak_memory(benchmark, shared: bool) -> None:
    """Each side in a fresh process (`_release_freed_memory` must act before the first allocation)."""
    cmd = [sys.executable, __file__, "--peak-memory", "--shared" if shared else "--unshared"]
    done = benchmark.pedantic(lambda: subprocess.run(cmd, capture_output=True, text=True, check=True), rounds=1,
                              iterations=1)  # fmt: skip
    info = json.loads(done.stdout.splitlines()[-1])
    benchmark.extra_info.update(info)
    print(f"\n{'shared' if shared else 'unshared'} memory: {info}")


def _peak_memory_main(shared: bool) -> None:
    """One process's measurement: glibc set to unmap freed blocks, a warm-up update, then one more update's peak."""
    _release_freed_memory()
    step, info = _update_fn(shared)
    step()
    info["peak_extra_mb"] = peak_extra_bytes(step, DEVICE) / 2**20
    print(json.dumps(info))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--peak-memory" or sys.argv[2] not in ("--shared", "--unshared"):
        sys.exit("usage: bench_shared_prefix.py --peak-memory --shared|--unshared (run by test_update_peak_memory)")
    _peak_memory_main(sys.argv[2] == "--shared")
