"""What a run shows while it trains: per-phase peak memory, the progress bar, and the metrics log kept in step with
the checkpoints (and samples.jsonl with it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TIMING_KEYS = (
    "time_rollout",
    "time_reward",
    "time_update",
    "time_step",
    "tokens_per_s",
    "peak_memory_mb",
    "peak_memory_rollout_mb",
    "peak_memory_reward_mb",
    "peak_memory_update_mb",
)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last `reset_peak_memory`: CUDA allocated bytes, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else ():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the CPU figures are the process's lifetime peak


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop the lines of a step log (metrics.jsonl, samples.jsonl) past `last_step`: those written after the checkpoint
    a resumed run restarts from, which it writes again. A line cut short (the process killed mid-write) goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


class Progress:
    """The run's progress bar on stderr (tqdm): step, ETA, and the step's reward, accuracy, caption length, tokens/s."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        from tqdm import tqdm  # a dependency of transformers

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)  # fmt: skip

    def update(self, step: int, metrics: dict) -> None:
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                             len=f"{metrics['caption_length']:.1f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                             refresh=False)  # fmt: skip
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
