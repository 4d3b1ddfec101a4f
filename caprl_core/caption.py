"""`python -m caprl_core.caption`: caption images with a policy (a training checkpoint, or any local Hugging Face
vision-language model directory) and print the captions.

    python -m caprl_core.caption IMAGE [IMAGE ...]                                   # the shipped start policy
    python -m caprl_core.caption --policy runs/x/checkpoints/latest --n 4 --temperature 1.0 photo.jpg
    python -m caprl_core.caption --policy DIR --json *.png > captions.jsonl          # one JSON line per image

The prompt is the one training uses (`PolicyPrompter`), and sampling runs through the trainer's own engine. Greedy
with --temperature 0. Every bad input is one line on stderr naming the argument, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from caprl_core.policy import (
    DTYPES,
    ModelLoadError,
    PolicyPrompter,
    caption_tokens,
    load_policy,
    shipped_dir,
    stop_token_ids,
)

DEFAULTS = {"n": 1, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 128, "seed": 0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m caprl_core.caption", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files to caption")
    parser.add_argument("--policy", type=Path, metavar="DIR",
                        help="policy directory, e.g. RUN/checkpoints/step-000039 or RUN/checkpoints/latest "
                             "(default: the shipped miniature-world start policy)")  # fmt: skip
    parser.add_argument("--n", type=int, default=DEFAULTS["n"], help="captions per image")
    parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], help="nucleus sampling threshold, 1 = off")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"], help="caption length cap")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="sampling seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="model dtype; auto = bfloat16 on CUDA, float32 elsewhere")  # fmt: skip
    parser.add_argument("--json", action="store_true", help='print {"image", "captions"} JSON lines')
    return parser


def _check(args: argparse.Namespace) -> str | None:
    """The first bad argument, as a one-line message; None when all are good."""
    if args.n < 1:
        return f"--n: expected an integer >= 1, got {args.n}"
    if args.temperature < 0:
        return f"--temperature: expected >= 0 (0 = greedy), got {args.temperature}"
    if not 0 < args.top_p <= 1:
        return f"--top-p: expected a number in (0, 1], got {args.top_p}"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens: expected an integer >= 1, got {args.max_new_tokens}"
    for image in args.images:
        if not image.is_file():
            return f"IMAGE {image}: {'not a file' if image.exists() else 'no such file'}"
    return None


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"IMAGE {path}: cannot read it as an image ({e})") from e


def caption_images(policy, prompter: PolicyPrompter, images: list, *, n: int = 1, temperature: float = 0.7,
                   top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0) -> list[list[str]]:  # fmt: skip
    """`n` captions of each PIL image by `policy` (a loaded vision-language model), through the sampler engine."""
    from caprl_core.sampler.engine import Engine
    from caprl_core.sampler.sequence import SamplingParams

    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                            stop_token_ids=stop_token_ids(policy, prompter.tokenizer))  # fmt: skip
    outs = Engine(policy).generate([prompter(image) for image in images], params)
    decode = prompter.tokenizer.decode
    return [[decode(caption_tokens(c), skip_special_tokens=True).strip() for c in out] for out in outs]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check(args)
    try:
        if problem:
            raise ValueError(problem)
        images = [_open(path) for path in args.images]
        policy_dir = args.policy or shipped_dir("policy")
        policy, tokenizer, image_processor = load_policy(policy_dir, dtype=DTYPES[args.dtype], device=args.device)
    except (ValueError, ModelLoadError) as e:  # ModelLoadError names --policy's directory
        print(f"error: {e}", file=sys.stderr)
        return 2
    captions = caption_images(policy.eval(), PolicyPrompter(tokenizer, image_processor), images, n=args.n,
                              temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)  # fmt: skip
    for path, caps in zip(args.images, captions, strict=True):
        if args.json:
            print(json.dumps({"image": str(path), "captions": caps}))
            continue
        print(path)
        for i, caption in enumerate(caps, 1):
            print(f"  [{i}] {caption}" if args.n > 1 else f"  {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
