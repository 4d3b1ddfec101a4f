"""Reward scoring: prefix-shared prefill vs each prompt alone vs the recipe's generate-and-parse, same tiny reader.

    .venv/bin/python -m pytest bench/bench_reward.py --benchmark-only -s [--benchmark-json=out.json]

Workload: 64 captions (synthetic scene descriptions) x 8 draws = 512 reader prompts, each made of the default
few-shot header, the caption and a question with its shuffled options. Reader: a random Qwen2 (hidden 256,
4 layers, 8 heads, 2 KV heads) with the project's tiny tokenizer, fp32 on CPU (bf16 on GPU). Three ways:
- "shared": `CapRLReward.score` (prefix cache on: the header once, each caption once, then the questions);
- "separate": the same prompts with prefix caching off (every prompt computed in full);
- "generate": `score_by_generation`, the recipe's way: up to 10 greedy tokens per prompt, first capital letter
  parsed (prefix cache on, as a vLLM server would have it).
Cache state, labelled in the test id, the same for every way:
- "cold": the reader's cache is freed before every timed call (a first call, or a trainer that frees it each step);
- "warm": the call follows one on other captions (the next training step): "shared" then finds its few-shot
  header cached (kept across calls, computed alone), "generate" finds whatever its prefix cache kept.
Every way gets one untimed warm-up call, then 2 timed calls (best kept). Each stores seconds and reader tokens
computed in extra_info; "shared" (block 16) also stores its speedups over the others in the same cache state.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from conftest import machine, synced

from caprl_core.models import tiny_qwen2, tiny_tokenizer
from caprl_core.reward import CapRLReward
from caprl_core.reward_config import RewardConfig
from caprl_core.world.scenes import describe, scene_questions, synthetic_scene

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
NUM_CAPTIONS, NUM_DRAWS = 64, 8


def _workload(seed: int = 0):
    rng = random.Random(seed)
    scenes = [synthetic_scene(rng) for _ in range(NUM_CAPTIONS)]
    return [describe(s) for s in scenes], [scene_questions(s, rng, 6) for s in scenes]


def _reward(block_size: int, caching: bool) -> CapRLReward:
    tok = tiny_tokenizer()
    reader = tiny_qwen2(tokenizer=tok, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, seed=1)
    engine = {"block_size": block_size, "enable_prefix_caching": caching}
    return CapRLReward(reader.to(DEVICE, DTYPE), tok, RewardConfig(num_draws=NUM_DRAWS, engine_kwargs=engine))


def _timed(reward: CapRLReward, way: str, cache: str, rounds: int = 2) -> tuple[float, int]:
    """Best seconds of `rounds` calls on the workload in the given cache state, and the reader tokens computed."""
    call = reward.score_by_generation if way == "generate" else reward.score
    captions, questions = _workload(0)
    other = _workload(1)
    call(captions, questions, step=0)  # warm-up (process, allocator, cache sizing)
    best, tokens = float("inf"), 0
    for _ in range(rounds):
        if cache == "cold":
            reward.engine.free_kv_cache()
        else:
            call(*other, step=1)  # the previous step's captions
        stats = reward.engine.stats
        before = stats.prefill_tokens + stats.decode_tokens
        start = time.perf_counter()
        synced(lambda: call(captions, questions, step=0), DEVICE)()  # noqa: B023
        best = min(best, time.perf_counter() - start)
        tokens = stats.prefill_tokens + stats.decode_tokens - before
    return best, tokens


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize(
    ("way", "block_size"), [("shared", 1), ("shared", 16), ("separate", 16), ("generate", 16)]
)  # fmt: skip
def test_reward_scoring(benchmark, way: str, block_size: int, cache: str) -> None:
    reward = _reward(block_size, caching=way != "separate")
    # One pedantic round wraps the whole protocol (its own timer keeps the untimed steps out).
    seconds, tokens = benchmark.pedantic(lambda: _timed(reward, way, cache), rounds=1, iterations=1)
    benchmark.extra_info.update({"machine": machine(), "cache": cache, "seconds": seconds,
                                 "reader_tokens_computed": tokens})  # fmt: skip
    if way == "shared" and block_size == 16:
        for other in ("separate", "generate"):
            other_seconds, _ = _timed(_reward(16, caching=other != "separate"), other, cache)
            benchmark.extra_info[f"speedup_vs_{other}"] = other_seconds / seconds
    speedups = {k: round(v, 2) for k, v in benchmark.extra_info.items() if k.startswith("speedup")}
    print(f"\n{way} (block {block_size}, {cache} cache): {seconds:.3f} s, {tokens} reader tokens computed; {speedups}")
