"""Training-step benchmarks.

    .venv/bin/python -m pytest bench/bench_train.py --benchmark-only -s

1. `test_train_step`: a step of the default run, `python -m caprl_core.train` with no model or cache options: the
   shipped miniature world's start policy (Qwen2.5-VL, hidden 64, 4 layers) and trained reader (Qwen2, hidden 64,
   4 layers) on its train split, 8 images x G = 8 captions of up to 32 tokens, N = 4 question draws per caption
   (`config.WORLD_DEFAULTS`). After one warm-up step (JIT build, caches), the medians over 5 steps of rollout /
   reward / update / whole step, with the project's kernels (default backends) and with the PyTorch references
   everywhere (`CAPRL_BACKEND=torch` for the ops, `CAPRL_ATTENTION_BACKEND=reference` for the sampler's attention).
2. `test_update_peak_memory_vs_vocab`: peak extra memory of the update phase (forward + backward of 32 captions of
   64 tokens, text policy with hidden 256) at V = 32,000 and V = 151,936, fused log-probs against the reference
   backend that materialises the [tokens, vocab] logits. The fused step's growth with V is the lm_head weight and
   its gradient and Adam state; the reference also grows by the logits and their gradient.
3. `test_update_peak_memory_reader_cache`: peak memory of the update phase (the default run's policy and batch, as
   in 1) beside a reader with Qwen2.5-3B's KV geometry, with the reader's KV cache released after scoring (the
   trainer's way) and kept through the backward.
4. `test_reward_phase_header_kept`: the reward phase (`time_reward`) of the tiny default, `python -m caprl_core.train
   --policy tiny-random --reader tiny-random` at small batches (`TINY_BATCHES`, captions of up to 32 tokens: 4 images
   x G = 4 x N = 8 draws = 128 reader prompts, and 2 x 4 x 4 = 32; the recipe's 16 x 8 x 512 takes minutes a step on
   a shared CPU), when the reader's few-shot header is kept across steps (`CapRLReward.release_kv_cache`, what train
   does) and when the whole cache is freed after each step (before issue 27's part 4): one run per batch, the two
   alternated step by step after 2 warm-up steps, medians over 8 steps each and the median of the 8 paired
   differences (freed minus kept, adjacent steps: robust to the load drifting on a shared machine).
   `test_reward_call_header_kept`: the reward call alone (`CapRLReward.score` + release, the tiny-random reader, a
   4 x 4 x 8 batch of the run's questions) alternated 40 times each way: more samples than whole steps allow.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from conftest import machine, peak_extra_bytes

from caprl_core.config_cli import parse_config
from caprl_core.models import tiny_qwen2
from caprl_core.precision import MasterWeightOptimizer
from caprl_core.rl.rollout import Rollout
from caprl_core.rl.setup import setup
from caprl_core.rl.update import update
from caprl_core.sampler.sequence import Completion

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("backends", ["kernels", "reference"])
def test_train_step(benchmark, backends: str, tmp_path, monkeypatch) -> None:
    if backends == "reference":
        monkeypatch.setenv("CAPRL_BACKEND", "torch")
        monkeypatch.setenv("CAPRL_ATTENTION_BACKEND", "reference")
    config, _ = parse_config(["--output-dir", str(tmp_path), "--progress", "false"])
    run = setup(config)
    run.step(0)  # warm-up (JIT build, caches)
    steps, history = iter(range(1, 100)), []
    benchmark.pedantic(lambda: history.append(run.step(next(steps))), rounds=5, iterations=1)
    keys = ("time_rollout", "time_reward", "time_update", "time_step")
    split = {k: round(statistics.median(m[k] for m in history), 3) for k in keys}  # medians over the 5 steps
    benchmark.extra_info.update({"machine": machine(), **split})
    print(f"\n{backends}: {split}")


def _rollout(vocab: int, samples: int = 32, prompt_len: int = 32, new: int = 64) -> Rollout:
    gen = torch.Generator().manual_seed(0)
    prompts = [{"input_ids": torch.randint(0, vocab, (prompt_len,), generator=gen)} for _ in range(samples // 4)]
    completions = [Completion(torch.randint(0, vocab, (new,), generator=gen).tolist(), [-5.0] * new, "length",
                              [-5.0] * new) for _ in range(samples)]  # fmt: skip
    return Rollout(prompts, completions, [""] * samples, torch.ones(samples, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("vocab", [32000, 151936])
def test_update_peak_memory_vs_vocab(benchmark, vocab: int, backend: str, monkeypatch) -> None:
    if backend == "reference":
        monkeypatch.setenv("CAPRL_BACKEND", "torch")
    config, _ = parse_config(["--group-size", "4", "--micro-batch-size", "32", "--max-new-tokens", "64"])
    policy = tiny_qwen2(vocab_size=vocab, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2).to(DEVICE)
    optimizer = MasterWeightOptimizer(policy, lambda params: torch.optim.AdamW(params, lr=1e-4))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0)
    ro = _rollout(vocab)
    advantages = torch.randn(len(ro.completions))

    def step():
        return update(policy, None, optimizer, scheduler, ro, advantages, config, DEVICE)

    step()  # Adam state exists from here on: the peak below is the step's own working memory
    peak = peak_extra_bytes(step, DEVICE)
    logits_bytes = len(ro.completions) * 64 * vocab * 4
    benchmark.extra_info.update({"machine": machine(), "peak_extra_mb": peak / 2**20,
                                 "fp32_logits_mb": logits_bytes / 2**20})  # fmt: skip
    benchmark.pedantic(step, rounds=1, iterations=1)
    print(f"\nV={vocab} {backend}: update peak +{peak / 2**20:.0f} MB, fp32 logits {logits_bytes / 2**20:.0f} MB")


@pytest.mark.parametrize("reader_cache", ["released", "kept"])
def test_update_peak_memory_reader_cache(benchmark, reader_cache: str, tmp_path, monkeypatch) -> None:
    """Peak memory of the update phase when the reader's KV cache is released after scoring (what train does) or
    kept through the policy's backward. The reader has Qwen2.5-3B's KV geometry (36 layers, 2 KV heads of 128), so
    its cache costs what the real one does per token (74 KB in fp32), on narrow cheap layers."""
    from caprl_core.reward import CapRLReward

    config, _ = parse_config(["--output-dir", str(tmp_path), "--progress", "false"])
    run = setup(config)
    reader = tiny_qwen2(hidden_size=256, num_layers=36, num_heads=2, num_kv_heads=2, tokenizer=run.tokenizer)
    run.reward = CapRLReward(reader.to(DEVICE), run.tokenizer, run.reward.config)
    if reader_cache == "kept":
        monkeypatch.setattr(run.reward.engine, "free_kv_cache", lambda: None)
    run.step(0)  # warm-up: JIT build, Adam state
    metrics = benchmark.pedantic(lambda: run.step(1), rounds=1, iterations=1)
    bytes_per_token = run.reward.engine.block_bytes // run.reward.engine.block_size
    benchmark.extra_info.update({"machine": machine(), "peak_update_mb": metrics["peak_memory_update_mb"],
                                 "reader_tokens_computed": metrics["reader_tokens_computed"],
                                 "reader_kv_bytes_per_token": bytes_per_token})  # fmt: skip
    print(
        f"\nreader cache {reader_cache}: update-phase peak {metrics['peak_memory_update_mb']:.0f} MB "
        f"(reward phase {metrics['peak_memory_reward_mb']:.0f} MB; {metrics['reader_tokens_computed']} reader "
        f"tokens x {bytes_per_token / 1024:.0f} KB)"
    )


TINY_BATCHES = {
    "4x4x8": ["--images-per-step", "4", "--group-size", "4", "--max-new-tokens", "32"],
    "2x4x4": ["--images-per-step", "2", "--group-size", "4", "--max-new-tokens", "32", "--num-draws", "4"],
}


@pytest.mark.parametrize(("batch", "pairs"), [("4x4x8", 8), ("2x4x4", 12)])
def test_reward_phase_header_kept(benchmark, batch: str, pairs: int, tmp_path, monkeypatch) -> None:
    """Reward-phase time of the tiny default with the reader's header kept across steps against freed with the rest
    of the cache, alternated in one run: "freed" steps start from an engine whose cache `free_kv_cache()` dropped
    whole (the header is computed alone again), "kept" steps from what the previous step's release left. Beside the
    wall time (`time_reward`), the process's CPU seconds in the reward phase: less at the mercy of other processes
    on a shared machine."""
    from caprl_core.rl import step as step_module

    argv = ["--policy", "tiny-random", "--reader", "tiny-random", *TINY_BATCHES[batch], "--output-dir", str(tmp_path)]
    config, _ = parse_config([*argv, "--progress", "false"])
    run = setup(config)
    engine = run.reward.engine
    cpu: list[float] = []
    phase = step_module.rewards_and_advantages

    def timed_phase(*args, **kwargs):
        start = time.process_time()
        out = phase(*args, **kwargs)
        cpu.append(time.process_time() - start)
        return out

    monkeypatch.setattr(step_module, "rewards_and_advantages", timed_phase)
    for step in range(2):  # warm-up: JIT build, allocator, Adam state
        run.step(step)
    wall: dict[str, list[float]] = {"freed": [], "kept": []}
    cpu_by_way: dict[str, list[float]] = {"freed": [], "kept": []}
    header_tokens: dict[str, list[int]] = {"freed": [], "kept": []}
    steps = iter(range(2, 1000))

    def alternate() -> None:
        for i in range(2 * pairs):
            way = ("freed", "kept")[i % 2]
            if way == "freed":
                engine.free_kv_cache()  # what scoring did after each step before the header was kept
            before = engine.stats.shared_prefix_tokens
            wall[way].append(run.step(next(steps))["time_reward"])
            cpu_by_way[way].append(cpu[-1])
            header_tokens[way].append(engine.stats.shared_prefix_tokens - before)

    benchmark.pedantic(alternate, rounds=1, iterations=1)
    assert all(n == 0 for n in header_tokens["kept"]) and all(n > 0 for n in header_tokens["freed"])
    summary = {}
    for name, times in (("wall", wall), ("cpu", cpu_by_way)):
        summary[f"{name}_freed_ms"] = statistics.median(times["freed"]) * 1e3
        summary[f"{name}_kept_ms"] = statistics.median(times["kept"]) * 1e3
        summary[f"{name}_paired_difference_ms"] = statistics.median(
            (f - k) * 1e3 for f, k in zip(times["freed"], times["kept"], strict=True)
        )
    summary = {k: round(v, 1) for k, v in summary.items()}
    benchmark.extra_info.update({"machine": machine(), **summary, "header_tokens": len(run.reward._header_ids),
                                 "wall": wall, "cpu": cpu_by_way, "load_average": os.getloadavg()})  # fmt: skip
    print(f"\n{batch}, {pairs} steps each, header {len(run.reward._header_ids)} tokens: {summary}; "
          f"load average {os.getloadavg()}")  # fmt: skip


def test_reward_call_header_kept(benchmark, tmp_path) -> None:
    """`CapRLReward.score` then `release_kv_cache()` on the tiny-random reader, its cache freed whole before every
    other call: medians of wall and CPU time over 40 calls each way, and the paired difference."""
    argv = ["--policy", "tiny-random", "--reader", "tiny-random", *TINY_BATCHES["4x4x8"], "--output-dir", str(tmp_path)]
    config, _ = parse_config([*argv, "--progress", "false"])
    run = setup(config)
    reward = run.reward
    captions = [run.examples[i].caption or "a red circle in the top left and a blue square" for i in range(16)]
    questions = [list(run.examples[i // 4].questions) for i in range(16)]
    reward.score(captions, questions, step=0)  # warm-up
    reward.release_kv_cache()
    times: dict[str, dict[str, list[float]]] = {way: {"wall": [], "cpu": []} for way in ("freed", "kept")}

    def alternate() -> None:
        for i in range(80):
            way = ("freed", "kept")[i % 2]
            if way == "freed":
                reward.engine.free_kv_cache()
            wall, cpu = time.perf_counter(), time.process_time()
            reward.score(captions, questions, step=i // 2)  # a pair scores the same draws
            reward.release_kv_cache()
            times[way]["wall"].append(time.perf_counter() - wall)
            times[way]["cpu"].append(time.process_time() - cpu)

    benchmark.pedantic(alternate, rounds=1, iterations=1)
    summary = {}
    for kind in ("wall", "cpu"):
        freed, kept = times["freed"][kind], times["kept"][kind]
        summary[f"{kind}_freed_ms"] = round(statistics.median(freed) * 1e3, 1)
        summary[f"{kind}_kept_ms"] = round(statistics.median(kept) * 1e3, 1)
        paired = statistics.median((f - k) * 1e3 for f, k in zip(freed, kept, strict=True))
        summary[f"{kind}_paired_difference_ms"] = round(paired, 1)
    benchmark.extra_info.update({"machine": machine(), **summary, "load_average": os.getloadavg()})
    print(f"\nreward call, 40 each: {summary}; load average {os.getloadavg()}")
