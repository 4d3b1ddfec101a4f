"""The end-to-end measuring steps of `make gpu-check`: paged decode throughput and a short training run.
Called through `python -m scripts.gpu_bench decode|train` (see scripts/gpu_bench.py).

Decode: a ~0.5B Qwen2 (Qwen2.5-0.5B's shape, random weights, bf16) greedy-decodes B prompts of PROMPT_LEN tokens
for NEW_TOKENS tokens, through the engine (Triton paged attention) and through HF `generate` (one batch, no padding:
every prompt has the same length). Decode tokens/s excludes the prefill: (time of the full call - time of a
1-token call) over B x (NEW_TOKENS - 1) tokens. Every call gets fresh prompts, so neither side finds a prefix
cached. The roofline is the bandwidth bound of one decode step: every weight read once (the embedding table
only as the lm_head, when tied) plus the KV cache at the mean context length, B tokens per step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from caprl_core.models import tiny_qwen2
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import SamplingParams
from scripts.gpu_machine import DEVICE, VOCAB, card_peaks, percent, synced_seconds

PROMPT_LEN, NEW_TOKENS = 128, 128
QWEN2_0_5B = dict(vocab_size=VOCAB, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                  intermediate_size=4864)  # fmt: skip


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (batch, length), generator=gen).tolist()


def _engine_call(engine: Engine, vocab: int):
    def run(batch: int, length: int, new: int, seed: int) -> None:
        engine.generate(_prompts(batch, length, vocab, seed), SamplingParams(temperature=0, max_new_tokens=new))
        engine.free_kv_cache()  # cold for the next call, as the trainer frees it after each rollout

    return run


def _hf_call(model, vocab: int):
    def run(batch: int, length: int, new: int, seed: int) -> None:
        ids = torch.tensor(_prompts(batch, length, vocab, seed), device=DEVICE)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, eos_token_id=None, pad_token_id=0)  # fmt: skip

    return run


def decode_rate(call, batch: int, length: int, new: int, seed: int) -> dict:
    """tokens/s of the decode steps alone and of the whole call, for `call(batch, length, new, seed)`."""
    call(2, length, 2, seed + 1)  # warm-up: kernel compilation, allocator
    prefill_s = synced_seconds(lambda: call(batch, length, 1, seed + 2))
    full_s = synced_seconds(lambda: call(batch, length, new, seed + 3))
    decode_s = max(full_s - prefill_s, 1e-9)
    return {"decode_tokens_per_s": batch * (new - 1) / decode_s, "total_tokens_per_s": batch * new / full_s,
            "prefill_s": prefill_s, "full_s": full_s}  # fmt: skip


def roofline_tokens_per_s(model, batch: int, mean_context: float, bandwidth_gbs: float | None) -> dict:
    """The bandwidth bound of decoding: bytes one step reads (weights + KV cache) and B / (bytes / bandwidth)."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # unique parameters
    if embed.data_ptr() != head.data_ptr():
        weights -= embed.numel() * embed.element_size()  # only B rows of an untied embedding table are read
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * embed.element_size()
    step_bytes = weights + batch * mean_context * kv_per_token
    bound = None if bandwidth_gbs is None else batch / (step_bytes / (bandwidth_gbs * 1e9))
    return {"bytes_per_step": step_bytes, "weight_bytes": weights, "tokens_per_s": bound}


def bench_decode(args: argparse.Namespace) -> dict:
    cfg = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2) if args.tiny else QWEN2_0_5B
    length, new = (8, 4) if args.tiny else (PROMPT_LEN, NEW_TOKENS)
    model = tiny_qwen2(**cfg).to(DEVICE, torch.float32 if args.tiny else torch.bfloat16)
    engine = Engine(model, attn_backend="torch" if args.tiny else "triton")
    if not args.tiny and engine.attn_backend != "triton":
        raise RuntimeError(f"decode: the Triton attention kernels are unavailable (engine chose {engine.attn_backend})")
    bandwidth = card_peaks()["bandwidth_gbs"]
    result = {"model": cfg, "prompt_len": length, "new_tokens": new, "attn_backend": engine.attn_backend}
    for batch in (2, 4) if args.tiny else (64, 256):
        ours = decode_rate(_engine_call(engine, cfg["vocab_size"]), batch, length, new, seed=10 * batch)
        hf = decode_rate(_hf_call(model, cfg["vocab_size"]), batch, length, new, seed=10 * batch)
        roof = roofline_tokens_per_s(model, batch, length + new / 2, bandwidth)
        result[f"batch_{batch}"] = {
            "engine": ours, "hf_generate": hf, "roofline": roof,
            "speedup_vs_hf_decode": ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
            "engine_pct_roofline": percent(ours["decode_tokens_per_s"], roof["tokens_per_s"]),
        }  # fmt: skip
    return result


# The tiny train run's sizes for the dry run (as tests/test_train.py's SMALL, one checkpoint at the end).
TINY_TRAIN = ["--images-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--num-draws", "2",
              "--synthetic-images", "4", "--device", "cpu"]  # fmt: skip


def bench_train(args: argparse.Namespace) -> dict:
    """Three steps of `python -m caprl_core.train` (the built-in tiny models; on CUDA in bf16), per-step time split
    into rollout / reward / update from the run's metrics.jsonl."""
    from caprl_core.rl.progress import TIMING_KEYS
    from caprl_core.train import main

    argv = ["--steps", "3", "--output-dir", str(args.out), "--progress", "false", "--checkpoint-every", "3"]
    argv += TINY_TRAIN if args.tiny else ["--device", "cuda"]
    start = time.perf_counter()
    status = main(argv)
    if status != 0:
        raise RuntimeError(f"caprl_core.train exited {status}")
    rows = [json.loads(line) for line in (args.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{k: row[k] for k in ("step", *TIMING_KEYS) if k in row} for row in rows]
    return {"argv": argv, "wall_s": time.perf_counter() - start, "steps": steps}
