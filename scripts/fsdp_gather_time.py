"""How `gathered` should unshard the per-layer groups before a rollout: all at once (every all-gather issued, then
all waited on: what `caprl_core.distributed.gathered` does) or layer by layer (one blocking all-gather per group, in
module order). Run under torchrun on the policy that scripts/fsdp_groups_memory.py writes:

    torchrun --standalone --nproc_per_node=2 -m scripts.fsdp_gather_time --policy /tmp/fsdp-groups/models/policy

Times --repeats gathers and reshards of each kind, alternated, on rank 0 after a barrier; prints the medians in ms.
Both end with the whole policy gathered (the sampler needs every layer at each decode step), so they hold the same
memory; only the time differs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from caprl_core.distributed import TokenLogprobs, close_world, gathered, init_world, is_sharded, shard_policy
from caprl_core.rl.batches import policy_logprobs


def layer_by_layer(root: torch.nn.Module) -> None:
    """The alternative: each group's all-gather waited on before the next is issued, then all resharded."""
    groups = [m for m in root.modules() if is_sharded(m)]
    for module in groups:
        module.unshard()
    root.reset_iter_state()


def all_at_once(root: torch.nn.Module) -> None:
    with gathered(root):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, required=True, help="a Qwen2.5-VL directory")
    parser.add_argument("--repeats", type=int, default=20, help="gathers of each kind")
    args = parser.parse_args(argv)
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(1)
    world = init_world("cpu")
    policy = AutoModelForImageTextToText.from_pretrained(args.policy, dtype=torch.float32)
    root = TokenLogprobs(policy, policy_logprobs)
    units = shard_policy(root, world, torch.bfloat16)
    times: dict[str, list[float]] = {"all_at_once": [], "layer_by_layer": []}
    for i in range(2 * args.repeats + 2):  # the first two are warm-up
        name = "all_at_once" if i % 2 == 0 else "layer_by_layer"
        dist.barrier()
        start = time.perf_counter()
        (all_at_once if name == "all_at_once" else layer_by_layer)(root)
        if i >= 2:
            times[name].append(1000 * (time.perf_counter() - start))
    if world.is_main:
        params = sum(p.numel() for p in policy.parameters())
        print(f"{len(units)} layer groups + the root, {params / 1e6:.1f} M parameters, bf16 gathers, 2 ranks")
        for name, ms in times.items():
            print(f"{name}: median {statistics.median(ms):.1f} ms (min {min(ms):.1f}, max {max(ms):.1f})")
    close_world(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
