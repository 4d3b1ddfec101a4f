"""The rollout's peak memory with the gradients freed after the optimizer step (the trainer) against held until the
next update's zero_grad (the trainer before issue 22, emulated by keeping the masters' gradients after `step()`):

    python scripts/make_real_format_dirs.py --out /tmp/real --widths real
    export MALLOC_MMAP_THRESHOLD_=65536
    python scripts/peak_memory_grads.py --models /tmp/real --out /tmp/peak --mode freed
    python scripts/peak_memory_grads.py --models /tmp/real --out /tmp/peak --mode held

Two bf16 steps of 2 images x 2 captions; prints each step's peak_memory_{rollout,reward,update}_mb (CPU: peak RSS
per phase). Step 1 is the one that shows it: step 0's rollout comes before any gradient exists. The fixed mmap
threshold makes glibc return every freed block of 64 KiB or more to the system at once, so the RSS follows the live
tensors; with the default allocator the same pair of runs gave 9,638 vs 11,550 MB once and 9,687 vs 9,678 another
time (measured on the 2-core development machine, shared).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from caprl_core import train
from caprl_core.precision import MasterWeightOptimizer
from caprl_core.world import make_world_data


def hold_gradients() -> None:
    """Keep every master's gradient after the step, as the optimizer did before it freed them."""
    step = MasterWeightOptimizer.step

    def held(self, max_grad_norm=None):
        grads = [m.grad for m in self.masters]
        norm = step(self, max_grad_norm)
        for m, g in zip(self.masters, grads, strict=True):
            m.grad = g
        return norm

    MasterWeightOptimizer.step = held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="directory with policy/ and reader/")
    parser.add_argument("--out", type=Path, required=True, help="work directory (data and runs)")
    parser.add_argument("--mode", choices=("freed", "held"), required=True)
    args = parser.parse_args(argv)
    if args.mode == "held":
        hold_gradients()
    data = make_world_data(args.out / "data", "train", 4)
    run = args.out / f"run-{args.mode}"
    code = train.main(["--policy", str(args.models / "policy"), "--reader", str(args.models / "reader"),
                       "--data", str(data), "--dtype", "bfloat16", "--steps", "2", "--images-per-step", "2",
                       "--group-size", "2", "--max-new-tokens", "8", "--num-draws", "2", "--kv-cache-tokens", "4096",
                       "--checkpoint-every", "100", "--progress", "false", "--output-dir", str(run)])  # fmt: skip
    if code:
        return code
    keys = ("peak_memory_rollout_mb", "peak_memory_reward_mb", "peak_memory_update_mb")
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        print(json.dumps({"mode": args.mode, "step": row["step"], **{k: round(row[k]) for k in keys}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
