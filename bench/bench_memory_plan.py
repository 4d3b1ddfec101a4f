"""The memory model (`caprl_core.memory_plan`) against the trainer's measured peaks, per phase, at several widths.

    .venv/bin/python bench/bench_memory_plan.py --out /tmp/memplan --hidden 256 512 1024

For each hidden width: random-weight Qwen2.5-VL / Qwen2.5 directories in the real layout (`caprl_core.models`'s
writer, real vocabulary of 151,936, 2 layers, MLP 5.375 x hidden, 64-wide heads, 2 KV heads, a vision tower half as
wide), then `python -m caprl_core.train` for 2 steps in fp32 on the world's images in a fresh process that first
imports the trainer's libraries and reads its resident set, plus what loading the tokenizers and the image
processor adds to it (the baseline term: the process's own memory, none of it tensors), with glibc's mmap threshold
fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_`) so that freed tensors leave the resident set (as they leave CUDA's
max_memory_allocated).
Step 1's `peak_memory_{rollout,reward,update}_mb` (step 0 has no AdamW state yet in its rollout and reward) are set
against `plan_memory` with `kv_cache="touched"` (a CPU resident set counts the cache pages written, not the buffer).
Token counts are the run's: the policy prompt from its prompter, the captions' mean length and the reader's prompt
tokens from the step's metrics. Prints a markdown table; `--json FILE` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's caprl_core, run as a script
from caprl_core.memory_plan import MB, Workload, plan_memory  # noqa: E402

RUN_ARGS = ["--steps", "2", "--images-per-step", "2", "--group-size", "4", "--max-new-tokens", "32",
            "--num-draws", "2", "--micro-batch-size", "4", "--dtype", "float32", "--progress", "false",
            "--checkpoint-every", "100"]  # fmt: skip
NUM_IMAGES = 16

# Runs in the measured process: import what the trainer imports, read VmRSS (the baseline), then train.
PROBE = """
import sys, json
from pathlib import Path
import torch, transformers
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2 import modeling_qwen2
import caprl_core.train as train
from caprl_core import policy

def rss():
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))

baseline = rss()
def counted(load):  # the tokenizers and image processor: the process's own, loaded beside the weights
    def wrapped(*args, **kwargs):
        global baseline
        before = rss()
        out = load(*args, **kwargs)
        baseline += rss() - before
        Path(sys.argv[1]).write_text(json.dumps({"baseline_kib": baseline}))
        return out
    return wrapped
policy._load_tokenizer = counted(policy._load_tokenizer)
policy._load_image_processor = counted(policy._load_image_processor)
Path(sys.argv[1]).write_text(json.dumps({"baseline_kib": baseline}))
sys.exit(train.main(sys.argv[2:]))
"""


def write_dirs(out: Path, hidden: int) -> tuple[Path, Path]:
    """Random-weight policy (Qwen2.5-VL layout) and reader (Qwen2.5) directories at `hidden`, real vocabulary."""
    from caprl_core import models

    tokenizer = models.qwen_id_tokenizer()

    policy, reader = out / "policy", out / "reader"
    if (reader / "model.safetensors").is_file():
        return policy, reader
    text = dict(hidden_size=hidden, intermediate_size=hidden * 43 // 8, num_attention_heads=hidden // 64,
                num_key_value_heads=2, mrope_section=[8, 12, 12])  # fmt: skip
    vision = dict(hidden_size=hidden // 2, intermediate_size=hidden * 43 // 16, num_heads=max(1, hidden // 128),
                  window_size=112)  # fmt: skip
    config = models._hub_vl_config(text, vision, models.REAL_VOCAB, tokenizer)
    config["num_hidden_layers"] = 2
    models._write_model_dir(policy, config, tokenizer, models.QWEN_VL_CHAT_TEMPLATE, 0)
    pre = {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
           "processor_class": "Qwen2_5_VLProcessor"}  # fmt: skip
    (policy / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (policy / "chat_template.json").write_text(json.dumps({"chat_template": models.QWEN_VL_CHAT_TEMPLATE}) + "\n")
    reader_config = models._hub_text_config(text, models.REAL_VOCAB, tokenizer, "Qwen2ForCausalLM", "qwen2")
    reader_config["num_hidden_layers"] = 2
    models._write_model_dir(reader, reader_config, tokenizer, models.QWEN_CHAT_TEMPLATE, 1)
    return policy, reader


def prompt_facts(policy: Path, data: Path) -> tuple[int, int]:
    """(policy prompt tokens, vision patches) of the data's first image, from the policy's own prompter."""
    from caprl_core.data import load_image
    from caprl_core.policy import PolicyPrompter, _load_image_processor, _load_tokenizer

    prompter = PolicyPrompter(_load_tokenizer(policy, "policy"), _load_image_processor(policy, "policy"))
    image = json.loads(data.read_text().splitlines()[0])["image"]
    prompt = prompter(load_image(data.parent / image if not Path(image).is_absolute() else image))
    return int(prompt["input_ids"].numel()), int(prompt["pixel_values"].shape[0])


def measure(out: Path, policy: Path, reader: Path, data: Path, run_args: list[str]) -> tuple[dict, int]:
    """Step 1's metrics and the baseline bytes of one training run in a fresh process."""
    run = out / "run"
    baseline = out / "baseline.json"
    argv = ["--policy", str(policy), "--reader", str(reader), "--data", str(data), "--output-dir", str(run),
            "--overwrite", *run_args]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    subprocess.run([sys.executable, "-c", PROBE, str(baseline), *argv], check=True, env=env,
                   stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return steps[1], json.loads(baseline.read_text())["baseline_kib"] * 1024


def workload_of(step: dict, baseline: int, prompt: int, patches: int, args: dict) -> Workload:
    """The run's Workload: its flags, the measured baseline, and its token counts (the reader's header and question
    lengths solved from the step's total and computed reader tokens: total = C N (H + L + Q), computed = H + C (L +
    N Q), C captions, N draws, L the mean caption length)."""
    C, N = args["images_per_step"] * args["group_size"], args["num_draws"]
    L = round(step["caption_length"])
    per_prompt = step["reader_tokens"] / (C * N) - L  # H + Q
    header = (C * N * per_prompt + C * L - step["reader_tokens_computed"]) / (C * N - 1)
    return Workload(
        images_per_step=args["images_per_step"], group_size=args["group_size"], max_new_tokens=args["max_new_tokens"],
        caption_tokens=L, prompt_tokens=prompt, image_patches=patches, micro_batch_size=args["micro_batch_size"],
        num_draws=N, reader_header_tokens=max(0, round(header)), question_tokens=max(1, round(per_prompt - header)),
        dtype="float32", world_size=1, kv_cache="touched", optimizer_foreach=False, baseline_bytes=baseline,
    )  # fmt: skip


def _run_args_dict(run_args: list[str]) -> dict:
    pairs = dict(zip(run_args[::2], run_args[1::2], strict=True))
    return {k[2:].replace("-", "_"): int(v) for k, v in pairs.items() if v.isdigit()}


def compare(out: Path, hidden: int, data: Path, run_args: list[str] = RUN_ARGS) -> dict:
    """One width: write the models, run the trainer, plan; the row of predicted and measured peaks (MB)."""
    policy, reader = write_dirs(out / f"h{hidden}", hidden)
    step, baseline = measure(out / f"h{hidden}", policy, reader, data, run_args)
    prompt, patches = prompt_facts(policy, data)
    plan = plan_memory(policy, reader, workload_of(step, baseline, prompt, patches, _run_args_dict(run_args)))
    row = {"hidden": hidden, "policy_params": plan.policy.params(), "reader_params": plan.reader.params(),
           "baseline_mb": baseline / MB, "plan": {p.phase: {k: v / MB for k, v in p.terms.items()}
                                                  for p in plan.phases}}  # fmt: skip
    for p in plan.phases:
        row[f"{p.phase}_predicted_mb"] = p.total / MB
        row[f"{p.phase}_measured_mb"] = step[f"peak_memory_{p.phase}_mb"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| hidden | policy + reader params | baseline | rollout pred / meas | reward pred / meas | "
             "update pred / meas |", "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        cells = []
        for phase in ("rollout", "reward", "update"):
            pred, meas = r[f"{phase}_predicted_mb"], r[f"{phase}_measured_mb"]
            cells.append(f"{pred:,.0f} / {meas:,.0f} MB ({100 * (pred - meas) / meas:+.1f}%)")
        params = f"{r['policy_params'] / 1e6:.0f} M + {r['reader_params'] / 1e6:.0f} M"
        lines.append(f"| {r['hidden']} | {params} | {r['baseline_mb']:,.0f} MB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the models and runs")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    from caprl_core.world import make_world_data

    data = make_world_data(args.out / "data", "train", NUM_IMAGES)
    rows = []
    for hidden in args.hidden:
        rows.append(compare(args.out, hidden, data))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
