"""Prism-style caption evaluation: how many questions about an image a vision-free reader answers from a caption.

    python -m caprl_core.eval --policy DIR --reader DIR --data FILE [--k 4] [--num-draws 8] [--out DIR] ...
    python -m caprl_core.eval            # the shipped miniature-world models on its 64 held-out images
    python -m caprl_core.eval --policy runs/X/checkpoints/step-N   # a trained policy, the shipped reader
    python -m caprl_core.eval --policy DIR --reader DIR --data FILE --preset prism --reward-preset recipe
        # Prism's sampling (4 captions at T = 1.0, top-p 1.0, <= 2,048 tokens) read with the recipe's reader prompt

For every image the policy samples k captions (one `Engine.generate` call per batch of images, n=k). The reader then
answers *every* question of the image once from each caption, through `CapRLReward` with one question per reward
row: each (image, caption, question) becomes its own row whose question pool is that single MCQ, scored with
num_draws=1, so the draw "with replacement" can only pick it and the row's hard reward is exactly 1 (right) or 0.
Rows of one caption share the header and caption tokens, so the reader's prefix cache computes them once.
Options are shuffled (seeded) and a "cannot be answered from the caption" option is appended, as in training; the k
captions of an image see each question with the same option order.

Reported (summary.json, and printed):
- mean_accuracy: per caption, the fraction of its image's questions answered right; averaged over the k captions of
  an image, then over images (each image weighs the same, whatever its number of questions).
- best_of_k: per image, the best of its k captions' accuracies, averaged over images (>= mean_accuracy).
- mean_p_correct: the same average of the reader's probability of the right option (the soft score).
- mean_caption_tokens: generated tokens per caption, a final stop token not counted.
- train_reward: the training reward (num_draws random draws per caption, hard), for comparison; --num-draws 0 skips.
- fact_precision, fact_recall: when every image's reference caption is a complete caption of the miniature world's
  grammar (`caprl_core.world.grammar`), the share of the captions' claims that are true and of the images' facts
  that the captions state, micro-averaged over all captions (None otherwise).
details.jsonl holds one line per image: captions, per-caption accuracy and per-question correctness; plot.png the
distribution of per-image accuracy and accuracy against caption length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import torch

from caprl_core._cli import plain_warnings
from caprl_core.data import DataError, Example, load_jsonl
from caprl_core.evaluator import (
    PRISM,
    CaptionEvaluator,
    EvalConfig,
    evaluate,
    threads_for,
    torch_threads,
)
from caprl_core.plot import plot_eval
from caprl_core.policy import (
    DTYPES,
    TINY_RANDOM,
    DeviceError,
    ModelLoadError,
    Models,
    PolicyPrompter,
    checked_device,
    load_models,
)
from caprl_core.world import make_world_data


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="python -m caprl_core.eval", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--policy", type=Path, metavar="DIR", help="local Hugging Face directory of the VL policy, e.g. a training "
        f"checkpoint (default: the shipped miniature-world start policy; {TINY_RANDOM} with --reader {TINY_RANDOM}: "
        "the random pair)")  # fmt: skip
    add("--reader", type=Path, metavar="DIR", help="local Hugging Face directory of the reader LLM (default: the "
        "shipped miniature-world reader)")  # fmt: skip
    add("--data", type=Path, metavar="FILE", help="dataset JSONL (default: the miniature world's 64 held-out images, "
        "written to a temp dir)")  # fmt: skip
    add("--k", type=int, default=d.k, metavar="INT", help=f"captions per image (default: {d.k})")
    add(
        "--num-draws",
        type=int,
        default=d.num_draws,
        metavar="INT",
        help=f"draws per caption of the training reward, for comparison; 0 skips it (default: {d.num_draws})",
    )
    add(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        metavar="INT",
        help=f"caption length cap in tokens (default: {d.max_new_tokens})",
    )
    add(
        "--temperature",
        type=float,
        default=d.temperature,
        metavar="FLOAT",
        help=f"sampling temperature; 0 = greedy (default: {d.temperature})",
    )
    add("--top-p", type=float, default=d.top_p, metavar="FLOAT", help=f"nucleus sampling threshold, 1 = off "
        f"(default: {d.top_p})")  # fmt: skip
    add(
        "--batch-size",
        type=int,
        default=d.batch_size,
        metavar="INT",
        help=f"images per generate call (default: {d.batch_size})",
    )
    add("--limit", type=int, default=d.limit, metavar="INT", help="evaluate the first INT images only (default: all)")
    add("--seed", type=int, default=d.seed, metavar="INT", help=f"seed of sampling, option shuffles and the tiny "
        f"models (default: {d.seed})")  # fmt: skip
    add("--reward-preset", choices=["default", "recipe"], default="default", help="the reader's prompt and readout: "
        "recipe = the published reward server's (caprl_core.reward_config.RewardConfig.recipe), as a recipe-trained "
        "policy was rewarded; default = the reader directory's or this project's (default: default)")  # fmt: skip
    add("--preset", choices=["none", "prism"], default="none", help="prism = the official Prism evaluation: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRISM.items())
        + "; flags given explicitly win (default: none)")  # fmt: skip
    add("--out", type=Path, metavar="DIR", help="output directory (default: runs/eval-<date-time>)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    add("--device", default=device, metavar="TEXT", help=f"torch device (default here: {device})")
    add("--dtype", choices=list(DTYPES), default="auto", help="model dtype; auto = bfloat16 on CUDA, float32 "
        "elsewhere (default: auto)")  # fmt: skip
    return p


def _apply_preset(args: argparse.Namespace, argv: list[str]) -> None:
    """--preset prism: its settings, under the flags given explicitly."""
    if args.preset != "prism":
        return
    for name, value in PRISM.items():
        flag = "--" + name.replace("_", "-")
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            setattr(args, name, value)


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EvalConfig:
    try:
        return EvalConfig(k=args.k, num_draws=args.num_draws, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                          seed=args.seed, limit=args.limit)  # fmt: skip
    except ValueError as e:
        _fail(str(e))


def _fail(message: str) -> NoReturn:
    """An input error after parsing: one line, without argparse's usage block (the flags were well-formed)."""
    print(f"python -m caprl_core.eval: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_device(name: str) -> None:
    try:
        checked_device(name)
    except DeviceError as e:
        _fail(str(e))


def _models(parser, args) -> Models:
    """The policy and reader by the rule `train` uses too (`load_models`): a directory, or the shipped one."""
    for flag in ("policy", "reader", "data"):
        path = getattr(args, flag)
        if path is not None and str(path) != TINY_RANDOM and not path.exists():
            _fail(f"--{flag}: {path} does not exist")
    try:
        return load_models(args.policy, args.reader, dtype=DTYPES[args.dtype], device=args.device, seed=args.seed)
    except ModelLoadError as e:
        _fail(str(e))


def _examples(parser, data: Path, limit: int | None) -> tuple[list[Example], int]:
    try:
        result = load_jsonl(data, on_error="skip")
    except DataError as e:
        _fail(f"--data: {e}")
    return result.examples[:limit], result.num_skipped


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation from command-line arguments; returns the summary (also written to OUT/summary.json)."""
    plain_warnings()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    _apply_preset(args, argv)
    config = _config(parser, args)
    _check_device(args.device)
    started = time.perf_counter()
    models = _models(parser, args)
    prompter = PolicyPrompter(models.tokenizer, models.image_processor)
    threads = threads_for(models.policy, models.reader)
    out = args.out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    with torch_threads(threads):
        # The world's held-out split is written beside the results, so that details.jsonl's images exist afterwards.
        data = args.data or make_world_data(out / "data", "heldout")
        examples, skipped = _examples(parser, data, config.limit)
        # The letters of the longest question plus "cannot answer": at most data.MAX_OPTIONS + 1, as in training.
        max_options = max(len(q.options) for ex in examples for q in ex.questions)
        evaluator = CaptionEvaluator(models.policy, prompter, models.reader, models.reader_tokenizer, config,
                                     max_options=max_options + 1, template=models.reader_template,
                                     reward_preset=args.reward_preset)  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        summary = evaluate(evaluator, examples, out)
        title = (f"{args.policy or 'the shipped start policy'}: mean accuracy {summary['mean_accuracy']:.1%} over "
                 f"{summary['num_images']} images")  # fmt: skip
        plot_eval(out / "details.jsonl", out / "plot.png", title=title)
    summary.update(
        k=config.k, num_draws=config.num_draws, skipped_lines=skipped, preset=args.preset,
        reward_preset=args.reward_preset,
        reader_prompt_tokens=evaluator.reader_prompt_tokens, reader_computed_tokens=evaluator.reader_computed_tokens,
        seconds=round(time.perf_counter() - started, 2), config=asdict(config), device=str(args.device),
        policy=str(args.policy or "shipped"), reader=str(args.reader or "shipped"),
        data=str(args.data or "world-heldout"), out=str(out),
    )  # fmt: skip
    tmp = out / f"summary.json.tmp-{os.getpid()}"  # written whole or not at all
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "summary.json")
    print(json.dumps({k: summary[k] for k in ("mean_accuracy", "best_of_k", "mean_caption_tokens", "train_reward",
                                              "fact_precision", "fact_recall", "num_images", "seconds",
                                              "out")}))  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
