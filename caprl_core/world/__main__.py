"""`python -m caprl_core.world`: build the world's models, or write one of its data splits or candidate-question files.

python -m caprl_core.world build --out DIR [--reader-steps N] [--policy-steps N] [--vqa-read-steps N] ... [--seed S]
python -m caprl_core.world build --only vqa --out DIR      # the VQA stage alone, on an existing build
python -m caprl_core.world data --split heldout --out DIR [--num 64]
python -m caprl_core.world questions --split heldout --out DIR [--num 64] [--leaky-fraction 0.5]
python -m caprl_core.world filter-truth --candidates DIR/data.jsonl --scores OUT.scores.jsonl
python -m caprl_core.world ablations --out DIR [--families ...] [--seeds 0 1 2]   # see caprl_core.world.ablations
python -m caprl_core.world qa-reader --out DIR [--steps 2000]   # the qa ablation's reader (world.qa_reader)
python -m caprl_core.world read-candidates --candidates DIR/data.jsonl [--reader DIR]   # how a reader reads them
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from caprl_core.world import DEFAULT_SIZES, make_world_data
from caprl_core.world.build import BuildConfig, build, build_vqa
from caprl_core.world.qa_reader import STEPS as QA_READER_STEPS
from caprl_core.world.questions import DEFAULT_LEAKY_FRACTION, QUESTIONS_PER_IMAGE, filter_truth, make_question_data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ablations"]:  # a command of its own, with its own options (--help there lists them)
        from caprl_core.world import ablations

        return ablations.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m caprl_core.world", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="train the reader and the start policy; write them as HF directories",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    b.add_argument("--out", required=True, type=Path, help="output directory (gets reader/, policy/, card.json)")
    defaults = BuildConfig()
    for f in fields(BuildConfig):
        b.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"default {getattr(defaults, f.name)}")  # fmt: skip
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--only", choices=["vqa"], help="run one stage on the existing build in --out (vqa: the VQA model, "
                   "from its policy/; card.json gets its section)")  # fmt: skip
    d = commands.add_parser("data", help="write a split of the world's data (PNGs + data.jsonl)")
    d.add_argument("--split", choices=sorted(DEFAULT_SIZES), required=True, help="train or heldout")
    d.add_argument("--out", required=True, type=Path, help="output directory")
    d.add_argument("--num", type=int, help="images (default: the split's size, train 256, heldout 64)")
    d.add_argument("--faint", type=float, default=0.0, help="fade every shape this far towards its cell's grey, in "
                   "[0, 1) (default 0): the same scenes with facts that are hard to see")  # fmt: skip
    q = commands.add_parser("questions", help="write candidate questions for QA curation, visual and leaky ones with "
                            "their ground truth (PNGs + data.jsonl)")  # fmt: skip
    q.add_argument("--split", choices=sorted(DEFAULT_SIZES), required=True, help="train or heldout")
    q.add_argument("--out", required=True, type=Path, help="output directory")
    q.add_argument("--num", type=int, help="images (default: the split's size, train 256, heldout 64)")
    q.add_argument("--leaky-fraction", type=float, default=DEFAULT_LEAKY_FRACTION,
                   help="share of leaky questions (answerable from their text)")  # fmt: skip
    q.add_argument("--per-image", type=int, default=QUESTIONS_PER_IMAGE, help="questions per image")
    commands.add_parser("ablations", help="the CapRL paper's ablations over seeds: a table with 95%% intervals and a "
                        "figure (python -m caprl_core.world ablations --help)", add_help=False)  # fmt: skip
    t = commands.add_parser("filter-truth", help="a curation filter's decisions on `questions` candidates against "
                            "their ground truth: visual questions kept, leaky ones dropped")  # fmt: skip
    t.add_argument("--candidates", required=True, type=Path, help="the candidates' data.jsonl")
    t.add_argument("--scores", required=True, type=Path, help="the filter's NAME.scores.jsonl")
    r = commands.add_parser("qa-reader", help="fine-tune the shipped reader to read `questions` candidates and answer "
                            "leaky ones from their text (what the ablations' qa family is rewarded by)")  # fmt: skip
    r.add_argument("--out", required=True, type=Path, help="output directory (a reader directory with card.json)")
    r.add_argument("--steps", type=int, default=QA_READER_STEPS, help="fine-tuning steps")
    c = commands.add_parser("read-candidates", help="a reader's mean probability of the right option on "
                            "`questions` candidates by question kind, from each image's reference caption, its "
                            "first cell, and no caption")  # fmt: skip
    c.add_argument("--candidates", required=True, type=Path, help="the candidates' data.jsonl")
    c.add_argument("--reader", type=Path, help="reader directory (default: the shipped one)")
    args = parser.parse_args(argv)
    if args.command in ("qa-reader", "read-candidates"):
        return _qa_reader_command(args, parser)
    if args.command == "filter-truth":
        try:
            print(json.dumps(filter_truth(args.candidates, args.scores)))
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e))
        return 0
    if args.command in ("data", "questions"):
        try:
            if args.command == "data":
                print(make_world_data(args.out, args.split, args.num, args.faint))
            else:
                print(make_question_data(args.out, args.split, args.num, leaky_fraction=args.leaky_fraction,
                                         questions_per_image=args.per_image))  # fmt: skip
        except ValueError as e:
            names = {
                "leaky_fraction:": "--leaky-fraction:",
                "questions_per_image:": "--per-image:",
                "faint:": "--faint:",
            }
            parser.error(next((str(e).replace(k, v) for k, v in names.items() if str(e).startswith(k)), str(e)))
        return 0
    try:
        config = BuildConfig(**{f.name: getattr(args, f.name) for f in fields(BuildConfig)})
    except ValueError as e:
        parser.error(str(e))
    started = time.perf_counter()
    if args.only == "vqa":
        try:
            card = build_vqa(args.out, config, progress=not args.no_progress)
        except ValueError as e:
            parser.error(str(e))
        summary = {"seconds": round(time.perf_counter() - started, 1), "vqa": card["vqa"], "out": str(args.out)}
        print(json.dumps(summary))
        return 0
    card = build(args.out, config, progress=not args.no_progress)
    policy = {k: v for k, v in card["policy"].items() if k != "examples"}
    summary = {"seconds": round(time.perf_counter() - started, 1), "reader": card["reader"], "policy": policy,
               "vqa": card["vqa"], "out": str(args.out)}  # fmt: skip
    print(json.dumps(summary))
    return 0


def _qa_reader_command(args, parser: argparse.ArgumentParser) -> int:
    from caprl_core.world import qa_reader

    if args.command == "qa-reader":
        if args.steps < 1:
            parser.error(f"--steps: expected >= 1, got {args.steps}")
        out = qa_reader.build_qa_reader(args.out, steps=args.steps, progress=True)
        print(json.dumps(json.loads((out / "card.json").read_text())))
        return 0
    from caprl_core.policy import load_reader
    from caprl_core.world import SHIPPED

    try:
        rows = [json.loads(line) for line in args.candidates.read_text().splitlines() if line.strip()]
        model, tokenizer = load_reader(args.reader or SHIPPED / "reader", what="--reader")
        print(json.dumps(qa_reader.candidate_scores(model, tokenizer, rows)))
    except (OSError, ValueError, KeyError) as e:
        parser.error(f"--candidates: {args.candidates}: {type(e).__name__}: {e}" if not isinstance(e, ValueError)
                     else str(e))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
