"""Reward scoring: prefix-shared prefill vs each prompt alone vs the recipe's generate-and-parse, same tiny reader.

    .venv/bin/python -m pytest bench/bench_reward.py --benchmark-only -s [--benchmark-json=out.json]

Workload: 64 captions (synthetic scene descriptions) x 8 draws = 512 reader prompts, each made of the default
few-shot header, the caption and a question with its shuffled options. Reader: a random Qwen2 (hidden 256,
4 layers, 8 heads, 2 KV heads) with the project's tiny tokenizer, fp32 on CPU (bf16 on GPU). Three ways:
- "shared": `CapRLReward.score` (prefix cache on: the header once, each caption once, then the questions);
- "separate": the same prompts with prefix caching off (every prompt computed in full);
- "generate": `score_by_generation`, the recipe's way: up to 10 greedy tokens per prompt, first capital letter
  parsed (prefix cache on, as a vLLM server would have it).
Each stores seconds and reader tokens computed in extra_info; "shared" also stores the speedups over the others.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from conftest import machine, synced

from caprl_core.data import describe, scene_questions, synthetic_scene
from caprl_core.models import tiny_qwen2, tiny_tokenizer
from caprl_core.reward import CapRLReward, RewardConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
NUM_CAPTIONS, NUM_DRAWS = 64, 8


def _workload():
    rng = random.Random(0)
    scenes = [synthetic_scene(rng) for _ in range(NUM_CAPTIONS)]
    return [describe(s) for s in scenes], [scene_questions(s, rng, 6) for s in scenes]


def _reward(block_size: int, caching: bool) -> CapRLReward:
    tok = tiny_tokenizer()
    reader = tiny_qwen2(tokenizer=tok, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, seed=1)
    engine = {"kv_cache_tokens": 1 << 16, "block_size": block_size, "enable_prefix_caching": caching}
    return CapRLReward(reader.to(DEVICE, DTYPE), tok, RewardConfig(num_draws=NUM_DRAWS, engine_kwargs=engine))


@pytest.mark.parametrize(
    ("way", "block_size"), [("shared", 1), ("shared", 16), ("separate", 16), ("generate", 16)]
)  # fmt: skip
def test_reward_scoring(benchmark, way: str, block_size: int) -> None:
    captions, questions = _workload()
    reward = _reward(block_size, caching=way != "separate")
    if way == "generate":
        fn = lambda: reward.score_by_generation(captions, questions, step=0)  # noqa: E731
    else:
        fn = lambda: reward.score(captions, questions, step=0)  # noqa: E731

    def fresh():  # every round starts from an empty prefix cache, like a new training step's captions
        reward.engine.free_kv_cache()
        before = reward.engine.stats.prefill_tokens + reward.engine.stats.decode_tokens
        fn()
        return reward.engine.stats.prefill_tokens + reward.engine.stats.decode_tokens - before

    run = synced(fresh, DEVICE)
    tokens = run()  # warm-up
    benchmark.pedantic(run, rounds=2, iterations=1)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update({"machine": machine(), "seconds": seconds, "reader_tokens_computed": tokens})
    if way == "shared" and block_size == 16:
        for other in ("separate", "generate"):
            slow = _reward(16, caching=other != "separate")
            call = slow.score_by_generation if other == "generate" else slow.score
            start = time.perf_counter()
            synced(lambda: call(captions, questions, step=0), DEVICE)()  # noqa: B023
            benchmark.extra_info[f"speedup_vs_{other}"] = (time.perf_counter() - start) / seconds
    print(f"\n{way} (block {block_size}): {seconds:.3f} s, {tokens} reader tokens computed; "
          f"{ {k: round(v, 2) for k, v in benchmark.extra_info.items() if k.startswith('speedup')} }")  # fmt: skip
