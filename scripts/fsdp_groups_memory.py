"""Peak memory of the update phase and step time on 2 torchrun ranks (CPU, gloo): FSDP2 with one group around the
whole policy (CAPRL_FSDP_GROUPS=whole, the old wrapping) against one group per decoder layer and vision block (the
default), on a random-weight Qwen2.5-VL wider and deeper than the test models:

    export MALLOC_MMAP_THRESHOLD_=65536
    python -m scripts.fsdp_groups_memory --out /tmp/fsdp-groups --rounds 2

Writes the policy (hidden 512, MLP 1408, 8 heads / 2 KV heads, 8 layers, a 4-block vision tower 256 wide, tied
embeddings, the small test vocabulary so that the layers, not the embeddings, hold most parameters) and a test-width
reader once, and 16 images of the miniature world's train split, then runs `train` for --steps bf16 steps (2 images x
4 captions of up to 32 tokens) with each wrapping, alternated --rounds times. Prints, per run,
each step's peak_memory_update_mb (the peak RSS during the update, max over ranks) and time_step, then the medians
over the steps after the first and the last line as JSON. The fixed mmap threshold makes glibc return freed blocks of
64 KiB or more at once, so the RSS follows the live tensors (as in scripts/peak_memory_grads.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from caprl_core.models import QWEN_VL_CHAT_TEMPLATE, _write_model_dir, tiny_tokenizer, write_real_format_dirs
from caprl_core.world import make_world_data

POLICY = {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 2,
          "num_hidden_layers": 8}  # fmt: skip
VISION = {"depth": 4, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "fullatt_block_indexes": [3]}


def write_models(out: Path) -> tuple[Path, Path]:
    """The test-width pair, then the policy rewritten at POLICY / VISION widths (head_dim 64: M-RoPE 8/12/12)."""
    policy, reader = write_real_format_dirs(out, widths="test")
    config = json.loads((policy / "config.json").read_text())
    config.update(POLICY, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
    config["vision_config"].update(VISION, out_hidden_size=POLICY["hidden_size"])
    _write_model_dir(policy, config, tiny_tokenizer(), QWEN_VL_CHAT_TEMPLATE, seed=0)
    return policy, reader


def run(groups: str, models: tuple[Path, Path], data: Path, out: Path, steps: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "caprl_core.train", "--policy", str(models[0]), "--reader", str(models[1]), "--data", str(data),
           "--dtype", "bfloat16", "--steps", str(steps),
           "--images-per-step", "2", "--group-size", "4", "--max-new-tokens", "32",
           "--checkpoint-every", "1000", "--progress", "false", "--output-dir", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAPRL_FSDP_GROUPS": groups}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{groups}: train failed\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the models and the runs")
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs of each wrapping")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is not counted)")
    args = parser.parse_args(argv)
    models = write_models(args.out / "models")
    data = make_world_data(args.out / "data", "train", 16)
    rows: dict[str, list[dict]] = {"whole": [], "layers": []}
    for r in range(args.rounds):
        for groups in ("whole", "layers") if r % 2 == 0 else ("layers", "whole"):
            steps = run(groups, models, data, args.out / f"{groups}-{r}", args.steps)
            print(groups, r, [(round(s["peak_memory_update_mb"]), round(s["time_step"], 2)) for s in steps])
            rows[groups] += steps[1:]
    keys = ("peak_memory_update_mb", "peak_memory_rollout_mb", "time_step", "time_rollout", "time_update")
    summary = {g: {k: statistics.median(s[k] for s in rows[g]) for k in keys} | {"steps": len(rows[g])} for g in rows}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
