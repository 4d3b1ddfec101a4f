"""`python -m caprl_core.data`: make the synthetic dataset, validate a dataset file, convert the released QA rows.

    python -m caprl_core.data make-synthetic --out DIR [--num 32] [--seed 0]
    python -m caprl_core.data validate FILE [--strict] [--no-check-images]
    python -m caprl_core.data convert IN OUT [--image-root DIR] [--strict] [--no-check-images]

The format is caprl_core.data's docstring; `make-synthetic` writes the miniature world's scenes
(caprl_core.world.scenes); `convert` turns the official CapRL QA files (verl-style parquet or JSONL rows) into the
format (caprl_core.convert).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from caprl_core.convert import convert_file
from caprl_core.data import DataError, load_jsonl
from caprl_core.world.scenes import make_synthetic_dataset


def _validate(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # every message is printed below
            result = load_jsonl(args.file, check_images=not args.no_check_images)
    except DataError as e:
        print(e, file=sys.stderr)
        return 1
    num_questions = sum(len(ex.questions) for ex in result.examples)
    print(
        f"{args.file}: {len(result.examples)} examples, {num_questions} questions, {result.num_skipped} lines skipped"
    )
    for error in result.errors:
        print(f"  {error}")
    return 1 if args.strict and result.errors else 0


def _add_convert_parser(commands) -> None:
    convert = commands.add_parser("convert", help="convert the official CapRL QA rows (parquet or JSONL) to this "
                                  "format", description="Convert verl-style rows (prompt, images, data_source, "
                                  "reward_model.ground_truth) to this module's JSONL; every row left out is listed "
                                  "as file:row: what is wrong.")  # fmt: skip
    convert.add_argument("src", type=Path, metavar="IN", help="the released file: .parquet (needs pyarrow) or JSONL")
    convert.add_argument("dst", type=Path, metavar="OUT", help="the JSONL file to write")
    convert.add_argument("--image-root", type=Path, metavar="DIR", help="where the rows' relative image paths "
                         "start (default: IN's directory)")  # fmt: skip
    convert.add_argument("--strict", action="store_true", help="exit with status 1 if any row is left out")
    convert.add_argument("--no-check-images", action="store_true", help="do not open the image files")


def _convert(args: argparse.Namespace) -> int:
    try:
        result = convert_file(args.src, args.dst, image_root=args.image_root, check_images=not args.no_check_images)
    except DataError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{args.src}: {result.num_rows} rows, {result.num_written} written to {args.dst}, "
          f"{len(result.errors)} left out")  # fmt: skip
    for error in result.errors:
        print(f"  {error}")
    return 1 if args.strict and result.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m caprl_core.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-synthetic", help="write a synthetic shapes dataset (PNGs + data.jsonl)",
                               description="Coloured shapes at the edge cells of a 3x3 grid, with questions only the "
                               "image (or the exact reference caption) answers; deterministic for a seed.")  # fmt: skip
    make.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (created)")
    make.add_argument("--num", type=int, default=32, metavar="INT", help="number of images (default: 32)")
    make.add_argument("--seed", type=int, default=0, metavar="INT", help="random seed (default: 0)")
    make.add_argument("--image-size", type=int, default=84, metavar="PX", help="image side in pixels, >= 16 "
                      "(default: 84)")  # fmt: skip
    make.add_argument("--questions", type=int, default=6, metavar="INT", help="questions per image (default: 6)")
    check = commands.add_parser("validate", help="check a dataset file and list every bad line",
                                description="Check every line of a dataset file (format: this module's docstring) "
                                "and list each bad one as file:line: what is wrong.")  # fmt: skip
    check.add_argument("file", type=Path, metavar="FILE", help="the JSONL dataset file")
    check.add_argument("--strict", action="store_true", help="exit with status 1 if any line is bad")
    check.add_argument("--no-check-images", action="store_true", help="do not open the image files")
    _add_convert_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "validate":
        return _validate(args)
    if args.command == "convert":
        return _convert(args)
    try:
        path = make_synthetic_dataset(
            args.out, args.num, seed=args.seed, image_size=args.image_size, questions_per_image=args.questions
        )
    except ValueError as e:
        parser.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
