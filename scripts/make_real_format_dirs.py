"""Write local model directories laid out like Qwen2.5-VL-3B-Instruct (policy) and Qwen2.5-3B-Instruct (reader), with
2 layers and random weights, for trying `train` and `eval` as on real checkpoints without downloading any:

    python scripts/make_real_format_dirs.py --out /tmp/real-format --widths real   # real widths, vocab 151,936
    python -m caprl_core.train --policy /tmp/real-format/policy --reader /tmp/real-format/reader --steps 2 ...

See `caprl_core.models.write_real_format_dirs` for what each directory holds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from caprl_core.models import write_real_format_dirs
from caprl_core.qwen3_dirs import write_qwen3_format_dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write policy/ and reader/ into")
    parser.add_argument("--widths", choices=["test", "real"], default="test", help="small widths or the 3B ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--family", choices=["qwen2.5", "qwen3"], default="qwen2.5",
                        help="qwen2.5: Qwen2.5-VL-3B policy + Qwen2.5-3B reader; qwen3: Qwen3-VL-4B policy + "
                        "Qwen3-4B reader (CapRL++)")  # fmt: skip
    args = parser.parse_args(argv)
    start = time.perf_counter()
    write = write_qwen3_format_dirs if args.family == "qwen3" else write_real_format_dirs
    policy, reader = write(args.out, widths=args.widths, seed=args.seed)
    print(f"policy {policy}\nreader {reader}\n({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
