"""`python -m caprl_core.curate`: QA curation for CapRL from your own images (docs/curate.md).

    python -m caprl_core.curate generate --model DIR --images DIR_OR_JSONL --out candidates.jsonl
    python -m caprl_core.curate filter --model DIR --in candidates.jsonl --out kept.jsonl
    python -m caprl_core.train --data kept.jsonl ...

generate: a vision-language model (a local Qwen2.5-VL directory) writes 5 multiple-choice questions per image in the
official markdown format; well-formed ones are kept, options shuffled. filter: a (small) vision-language model answers
each question with and without the image, over 4 rotations of its options, scored from its option-letter logits; the
questions answered with the image (accuracy > 0.75) and not without it (< 0.25) are kept. A killed filter run resumes
where it stopped when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from caprl_core._cli import plain_warnings
from caprl_core.curate.filter import MODES, SCORES, FilterConfig, QuestionFilter
from caprl_core.curate.generate import GenerateConfig, QuestionGenerator
from caprl_core.curate.prompts import VQA_PROMPT_FILE, VQAPrompter
from caprl_core.curate.run import filter_line, generate_line, run_filter, run_generate
from caprl_core.curate.store import list_images
from caprl_core.data import DataError
from caprl_core.evaluator import threads_for, torch_threads
from caprl_core.policy import DTYPES, DeviceError, ModelLoadError, checked_device, load_policy

PROG = "python -m caprl_core.curate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write multiple-choice questions for images with a local VLM")
    g.add_argument("--model", type=Path, required=True, metavar="DIR",
                   help="the question writer: a Qwen2.5-VL directory")  # fmt: skip
    g.add_argument("--images", type=Path, required=True, help='a directory of images, or a JSONL file of {"image", '
                   '"id"} lines (paths relative to the file)')  # fmt: skip
    g.add_argument("--out", type=Path, required=True, help="candidate questions, this project's dataset JSONL")
    g.add_argument("--num-questions", type=int, default=5, help="questions asked for per image (default 5)")
    g.add_argument("--temperature", type=float, default=0.1, help="sampling temperature (default 0.1, official)")
    g.add_argument("--repetition-penalty", type=float, default=1.05,
                   help="HF-style repetition penalty, 1 = off (default 1.05, official)")  # fmt: skip
    g.add_argument("--max-new-tokens", type=int, default=2048, help="reply length cap (default 2048, official)")
    g.add_argument("--batch-size", type=int, default=8, help="images per engine call (default 8)")
    g.add_argument("--seed", type=int, default=0, help="sampling and option shuffle seed (default 0)")
    f = sub.add_parser("filter", help="keep the questions a VLM answers with the image and not without it")
    f.add_argument("--model", type=Path, required=True, metavar="DIR",
                   help=f"the answering VLM: a Qwen2.5-VL directory (its {VQA_PROMPT_FILE} sets the prompt, if "
                   f"any)")  # fmt: skip
    f.add_argument("--in", dest="inp", type=Path, required=True, metavar="FILE",
                   help="candidate questions (dataset JSONL)")  # fmt: skip
    f.add_argument("--out", type=Path, required=True, help="kept questions (dataset JSONL); NAME.verl.jsonl, "
                   "NAME.scores.jsonl and NAME.summary.json are written beside it")  # fmt: skip
    f.add_argument("--rotations", type=int, default=4, help="option orders per question (default 4)")
    f.add_argument("--min-visual-accuracy", type=float, default=0.75, help="keep when accuracy with the image is "
                   "above this (default 0.75)")  # fmt: skip
    f.add_argument("--max-text-accuracy", type=float, default=0.25, help="keep when accuracy without the image is "
                   "below this (default 0.25)")  # fmt: skip
    f.add_argument("--mode", choices=MODES, default="logits", help="logits: option-letter logits of one prefill "
                   "(default); sampled: generate a reply and parse its letter (the official way)")  # fmt: skip
    f.add_argument("--score", choices=SCORES, default="hard", help="--mode logits: hard, a rotation is right when the "
                   "right letter's logit is highest (default); soft, the right letter's probability over the options "
                   "(docs/curate.md: why a blind model cannot pass 'hard' on every visual question)")  # fmt: skip
    f.add_argument("--no-resume", action="store_true", help="start over even if a progress log of OUT exists")
    for sp in (g, f):
        sp.add_argument("--device", default="cpu", help="torch device (default cpu)")
        sp.add_argument("--dtype", choices=list(DTYPES), default="auto", help="model dtype (auto: bf16 on CUDA, "
                        "fp32 on CPU)")  # fmt: skip
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fail(message: str) -> NoReturn:
    """An input error after parsing: one line, without argparse's usage block."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load(args):
    if not args.model.exists():
        _fail(f"--model: {args.model} does not exist")
    try:
        checked_device(args.device)
        return load_policy(args.model, dtype=DTYPES[args.dtype], device=args.device, what="--model")
    except (ModelLoadError, DeviceError) as e:
        _fail(str(e))


def _generate(args) -> dict:
    try:
        config = GenerateConfig(num_questions=args.num_questions, temperature=args.temperature,
                                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    except ValueError as e:
        _fail(str(e))
    try:
        items = list_images(args.images)
    except ValueError as e:
        _fail(f"--images: {e}")
    model, tokenizer, image_processor = _load(args)
    with torch_threads(threads_for(model)):
        summary = run_generate(QuestionGenerator(model, tokenizer, image_processor, config), items, args.out,
                               progress=not args.no_progress)  # fmt: skip
    print(generate_line(summary))
    return summary


def _filter(args) -> dict:
    try:
        config = FilterConfig(rotations=args.rotations, min_visual=args.min_visual_accuracy,
                              max_text=args.max_text_accuracy, mode=args.mode, score=args.score)  # fmt: skip
    except ValueError as e:
        _fail(str(e))
    if not args.inp.is_file():
        _fail(f"--in: {args.inp} does not exist")
    model, tokenizer, image_processor = _load(args)
    try:
        prompter = VQAPrompter.from_directory(args.model, tokenizer, image_processor)
    except ValueError as e:
        _fail(f"--model: {e}")
    with torch_threads(threads_for(model)):
        try:
            summary = run_filter(QuestionFilter(model, prompter, config), args.inp, args.out,
                                 resume=not args.no_resume, progress=not args.no_progress)  # fmt: skip
        except DataError as e:
            _fail(f"--in: {str(e).splitlines()[0]}")
    print(filter_line(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Run a curation command from command-line arguments; returns its summary (also written beside --out)."""
    plain_warnings()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return _generate(args) if args.command == "generate" else _filter(args)


if __name__ == "__main__":
    main()
