"""End-to-end rollout benchmark: `Engine.generate` against Hugging Face `generate` on the same model.

    .venv/bin/python -m pytest bench/bench_engine.py --benchmark-only -s [--benchmark-json=out.json]

Workload, shaped like a GRPO rollout: 16 prompts of mixed lengths (uniform in 16..256 tokens), n = 8 samples
each, 64 new tokens per sample (no stop token, so both sides generate exactly 16 x 8 x 64 = 8192 tokens),
temperature 1. Hugging Face gets the usual batched call: a left-padded batch with num_return_sequences = 8.

Models (random weights, built from configs):
- CPU: a small Qwen2 (vocab 32000, hidden 256, 4 layers, 8 heads, 2 KV heads), fp32, the engine's PyTorch
  attention path.
- GPU: a ~0.5B Qwen2 (Qwen2.5-0.5B's shape: vocab 151936, hidden 896, 24 layers, 14 heads, 2 KV heads), bf16,
  Triton attention, and 64 prompts (512 samples) so the batch is GPU-sized.
Cache state, labelled in the test id:
- "cold": the engine's cache is freed before every timed round (as the trainer does after each rollout), so the
  prompts are computed in full each round, like Hugging Face's (which keeps nothing between calls): the speedup
  over HF is measured here, cold against cold.
- "warm": the engine keeps its prefix cache across rounds, so every round after the first finds the prompts cached
  (a server answering the same prompts again). HF has no such state; no speedup is claimed for it.
Both sides report the best of 2 timed rounds after one warm-up call. Each benchmark stores tokens/s, the speedup
(cold) and the engine's step counters in extra_info, and prints them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import best_seconds, machine, synced

from caprl_core.models import tiny_qwen2
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import SamplingParams

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N_SAMPLES, NEW_TOKENS = 8, 64

CONFIGS = {
    "cpu-qwen2-tiny": dict(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                           dtype=torch.float32, prompts=16),
    "gpu-qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                           intermediate_size=4864, dtype=torch.bfloat16, prompts=64),
}  # fmt: skip


def _model(cfg: dict):
    model = tiny_qwen2(cfg["vocab_size"], cfg["hidden_size"], cfg["num_layers"], cfg["num_heads"], cfg["num_kv_heads"],
                       intermediate_size=cfg.get("intermediate_size"))  # fmt: skip
    return model.to(device=DEVICE, dtype=cfg["dtype"])


def _prompts(num: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 257, (num,), generator=gen).tolist()
    return [torch.randint(0, vocab - 1, (n,), generator=gen).tolist() for n in lengths]


def _hf_generate(model, prompts: list[list[int]]):
    """Left-padded batch, num_return_sequences = N_SAMPLES, exactly NEW_TOKENS new tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1

    def run():
        with torch.inference_mode():
            return model.generate(
                input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, num_return_sequences=N_SAMPLES, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )  # fmt: skip

    return run


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_rollout_tokens_per_second(benchmark, name: str, cache: str) -> None:
    if name.startswith("gpu") != (DEVICE.type == "cuda"):
        pytest.skip(f"{name} runs on {'a GPU' if name.startswith('gpu') else 'the CPU'} only")
    cfg = CONFIGS[name]
    model = _model(cfg)
    prompts = _prompts(cfg["prompts"], cfg["vocab_size"])
    tokens = len(prompts) * N_SAMPLES * NEW_TOKENS
    params = SamplingParams(n=N_SAMPLES, temperature=1.0, max_new_tokens=NEW_TOKENS)
    engine = Engine(model, block_size=16)  # the default cache size: the call's need
    run_engine = synced(lambda: engine.generate(prompts, params), DEVICE)
    run_engine()  # warm-up: allocates the cache, compiles the Triton kernels on GPU
    setup = (lambda: engine.free_kv_cache()) if cache == "cold" else None

    engine.reset_stats()
    out = benchmark.pedantic(run_engine, setup=setup, rounds=2, iterations=1)
    assert sum(len(c.token_ids) for samples in out for c in samples) == tokens
    engine_seconds = benchmark.stats.stats.min
    info = {
        "machine": machine(),
        "cache": cache,
        "generated_tokens": tokens,
        "engine_tokens_per_s": tokens / engine_seconds,
        "engine_stats_per_call": {k: v // 2 for k, v in engine.stats.as_dict().items()},
    }
    if cache == "cold":
        run_hf = synced(_hf_generate(model, prompts), DEVICE)
        run_hf()
        hf_seconds = best_seconds(run_hf, DEVICE, rounds=2)
        info.update({"hf_tokens_per_s": tokens / hf_seconds, "speedup_cold_vs_hf": hf_seconds / engine_seconds})
    benchmark.extra_info.update(info)
    hf = (
        f", HF generate {info['hf_tokens_per_s']:.0f} tok/s, {info['speedup_cold_vs_hf']:.2f}x"
        if cache == "cold"
        else ""
    )
    print(f"\n{name} ({cache} cache): engine {info['engine_tokens_per_s']:.0f} tok/s{hf}  ({info['machine']})")
