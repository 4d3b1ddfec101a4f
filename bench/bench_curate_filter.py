"""Curation filter throughput (questions/s): ours (answers read from the option-letter logits of one prefill, prompts
sharing their image and question prefixes) against generate-and-parse (the official scripts' way: a greedy reply of
up to 8 tokens, its first option letter parsed) through the same engine and the same `QuestionFilter`.

    .venv/bin/python -m pytest bench/bench_curate_filter.py --benchmark-only -s
    .venv/bin/python bench/bench_curate_filter.py world|3b     # one scale, printed as JSON (no pytest)

Each question is answered with and without its image, R = 4 rotations of its options: 8 prompts per question.
Cold against cold: every timed pass builds a fresh `Engine` (empty prefix cache, cache allocated on first use), after
one warm-up pass per side on the same model (first-call overheads); the sides' passes alternate, so that other load
on the machine falls on both; each side reports its best pass. Scales:
- world: the shipped miniature-world VLM (caprl_core/world/shipped/policy, hidden 128, 9 image tokens per 84-px
  image), 8 held-out world images with their own questions (2 to 4 options); also logits with the prefix cache off
  (what the prefix sharing saves).
- 3b: Qwen2.5-VL-3B widths (`write_real_format_dirs(widths="real")`: hidden 2,048, MLP 11,008, 16 heads / 2 KV heads,
  vision 1,280 wide, vocabulary 151,936; random weights, 2 layers, fp32 on CPU), images of 448 x 448 pixels (256
  image tokens; the directory's max_pixels raised to allow them), 5 questions of 4 options per image, 2 images.
extra_info and the JSON line hold questions/s per side, seconds, and the engine's prefill / cached / decode tokens.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from caprl_core.curate.filter import FilterConfig, QuestionFilter
from caprl_core.curate.prompts import VQAPrompter
from caprl_core.data import MCQ, load_image, load_jsonl
from caprl_core.evaluator import threads_for, torch_threads
from caprl_core.models import write_real_format_dirs
from caprl_core.policy import load_policy
from caprl_core.sampler.engine import Engine
from caprl_core.world import SHIPPED, make_world_data

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROTATIONS, ROUNDS = 4, 2
SIDES = {"logits": ("logits", True), "sampled": ("sampled", True), "logits_no_prefix_cache": ("logits", False)}


def _world(tmp: Path):
    model, tokenizer, image_processor = load_policy(SHIPPED / "policy", device=DEVICE)
    examples = load_jsonl(make_world_data(tmp, "heldout", 8)).examples
    items = [(load_image(ex.image), list(ex.questions)) for ex in examples]
    return model, VQAPrompter.from_directory(SHIPPED / "policy", tokenizer, image_processor), items, list(SIDES)


def _qwen_3b(tmp: Path, num_images: int = 2):
    policy, _ = write_real_format_dirs(tmp, widths="real")
    config = json.loads((policy / "preprocessor_config.json").read_text())
    config.update(min_pixels=448 * 448, max_pixels=448 * 448)  # 32 x 32 patches, 2 x 2 merged: 256 image tokens
    (policy / "preprocessor_config.json").write_text(json.dumps(config))
    model, tokenizer, image_processor = load_policy(policy, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
    items = []
    for i in range(num_images):
        pixels = torch.randint(0, 256, (448, 448, 3), generator=gen, dtype=torch.uint8).numpy()
        options = [tuple(colours[(q + k) % len(colours)] for k in range(4)) for q in range(5)]
        questions = [MCQ(f"What colour is object number {q + 1} in picture {i}?", options[q], q % 4) for q in range(5)]
        items.append((Image.fromarray(pixels), questions))
    return model, VQAPrompter.from_directory(policy, tokenizer, image_processor), items, ["logits", "sampled"]


def _pass(model, prompter, items, side: str) -> dict:
    """One cold pass of `side` over `items`: a fresh engine, every image's questions."""
    mode, prefix_caching = SIDES[side]
    engine = Engine(model, enable_prefix_caching=prefix_caching)
    qfilter = QuestionFilter(model, prompter, FilterConfig(rotations=ROTATIONS, mode=mode), engine=engine)
    start = time.perf_counter()
    for image, questions in items:
        qfilter.accuracies(image, questions)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    stats = engine.stats
    return {"seconds": time.perf_counter() - start, "prefill_tokens": stats.prefill_tokens,
            "cached_tokens": stats.cached_tokens, "decode_tokens": stats.decode_tokens,
            "vision_calls": stats.vision_calls}  # fmt: skip


def measure(scale: str) -> dict:
    """Questions/s of every side of `scale` ("world" or "3b"), best of ROUNDS alternated cold passes."""
    with tempfile.TemporaryDirectory() as tmp:
        model, prompter, items, sides = (_world if scale == "world" else _qwen_3b)(Path(tmp))
        with torch_threads(threads_for(model)), torch.inference_mode():
            threads = torch.get_num_threads()
            for side in sides:  # warm-up: first-call overheads, not measured
                _pass(model, prompter, items[:1], side)
            passes: dict[str, list[dict]] = {side: [] for side in sides}
            for _ in range(ROUNDS):
                for side in sides:
                    passes[side].append(_pass(model, prompter, items, side))
    num_questions = sum(len(q) for _, q in items)
    out = {"scale": scale, "device": DEVICE, "threads": threads, "images": len(items),
           "questions": num_questions, "prompts": num_questions * 2 * ROTATIONS, "rotations": ROTATIONS}  # fmt: skip
    for side, runs in passes.items():
        best = min(runs, key=lambda r: r["seconds"])
        out[side] = {**best, "questions_per_s": num_questions / best["seconds"],
                     "all_seconds": [round(r["seconds"], 3) for r in runs]}  # fmt: skip
    out["speedup_vs_sampled"] = out["logits"]["questions_per_s"] / out["sampled"]["questions_per_s"]
    return out


@pytest.mark.parametrize("scale", ["world", "3b"])
def test_filter_throughput(benchmark, scale: str) -> None:
    info = measure(scale)
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the numbers are in extra_info (alternated passes)
    print(f"\nfilter throughput {scale}: {json.dumps(info)}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("world", "3b"):
        sys.exit("usage: bench_curate_filter.py world|3b")
    print(json.dumps(measure(sys.argv[1])))
