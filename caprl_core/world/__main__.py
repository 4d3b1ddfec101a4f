"""`python -m caprl_core.world`: build the world's models, or write one of its data splits.

python -m caprl_core.world build --out DIR [--reader-steps N] [--policy-steps N] [--seed S]
python -m caprl_core.world data --split heldout --out DIR [--num 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from caprl_core.world import DEFAULT_SIZES, make_world_data
from caprl_core.world.build import BuildConfig, build


def main(argv: list[str] | None = None) -> int:
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
    d = commands.add_parser("data", help="write a split of the world's data (PNGs + data.jsonl)")
    d.add_argument("--split", choices=sorted(DEFAULT_SIZES), required=True, help="train or heldout")
    d.add_argument("--out", required=True, type=Path, help="output directory")
    d.add_argument("--num", type=int, help="images (default: the split's size, train 256, heldout 64)")
    args = parser.parse_args(argv)
    if args.command == "data":
        try:
            print(make_world_data(args.out, args.split, args.num))
        except ValueError as e:
            parser.error(str(e))
        return 0
    try:
        config = BuildConfig(**{f.name: getattr(args, f.name) for f in fields(BuildConfig)})
    except ValueError as e:
        parser.error(str(e))
    started = time.perf_counter()
    card = build(args.out, config, progress=not args.no_progress)
    policy = {k: v for k, v in card["policy"].items() if k != "examples"}
    summary = {"seconds": round(time.perf_counter() - started, 1), "reader": card["reader"], "policy": policy,
               "out": str(args.out)}  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
