"""A memory model of one training step: each phase's peak (rollout, reward, update), term by term, per rank.

    python -m caprl_core.memory_plan --policy qwen2.5-vl-3b --reader qwen2.5-3b --world-size 8 --sharding per-layer
    python -m caprl_core.memory_plan --policy DIR --reader DIR --dtype float32 --world-size 1

`plan_memory(policy, reader, workload)` counts bytes from the models' shapes (`caprl_core.model_dims`: from a
preset, a config.json directory or a transformers config object; no weights are read) and the run's configuration
(`Workload`, built from a `TrainConfig` by `Workload.from_train_config`). It is bookkeeping only: no model is built
and nothing runs on a device.

What each term follows in the code (per rank):
- weights: one process holds the policy in the compute dtype plus fp32 masters when that dtype is 16-bit
  (`precision.MasterWeightOptimizer`); under FSDP2 the fp32 shards (4P/W) are the masters, the rollout gathers the whole
  policy in the compute dtype (`distributed.gathered`; `rollout_gather="per-layer"` projects gathering one group at a
  time, which is not built), and the update gathers one group at a time (per-layer) or all of it (one group).
- AdamW state: two fp32 tensors per parameter (8P, or 8P/W sharded), present from the first step on.
- gradients (update only; freed by the optimizer step): fp32 masters' gradients (4P or 4P/W), plus under FSDP2 the
  unsharded compute-dtype gradients and their fp32 reduce-scatter copy of one group: the whole model with one group,
  one decoder layer (or vision block) with per-layer groups, beside the root group's (embeddings, lm_head, final norm,
  the vision patch embedding and merger), which is reduced at the end of the backward.
- the KV caches of both engines (`sampler.engine`), freed after each phase: `kv_cache="allocated"` is what CUDA holds,
  the next power of two of the blocks that every sequence needs at its full length; `"touched"` is what a CPU's
  resident set sees of that `torch.empty` buffer, the blocks actually written (a prompt once per image, shared by its
  G forks; the reader's header once and each caption once across its N questions).
- activations of one update micro-batch: the tensors autograd saves per decoder layer and vision block (counted in
  `ModelDims.layer_activation_bytes`; gradient checkpointing keeps each layer's input and one layer's own set), the
  group-shared forward's per-image K/V copies (`segment_attention`), and the fused lm_head log-prob op's 64 MiB tile and
  its [V, H] fp32 weight gradient before it is added into the parameter's (no [tokens, vocab] logits).
- the optimizer step's temporaries (after the activations are freed): torch's multi-tensor AdamW (CUDA) takes the
  square root of every state tensor at once (4P/W); the per-tensor loop (CPU) holds two of the largest tensor's size.
- transients of the engines: a prefill batch (at most max_batch_tokens) through one layer, and a decode step's logits.
- the process baseline (CPU only): the interpreter, torch and the libraries, measured in the same process before the
  models are loaded (`baseline_bytes`); on CUDA max_memory_allocated has no such term.

What it leaves out: the CUDA caching allocator's reserved-but-free blocks and fragmentation (max_memory_allocated does
not count them either, but nvidia-smi does), NCCL buffers, CUDA context (a few hundred MB per GPU), and everything
smaller than about 1% of a phase (metrics, token lists, the images). Measured against the trainer on CPU in
docs/distributed.md ("Memory plan"), `bench/bench_memory_plan.py`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from caprl_core.model_dims import PRESETS, ModelDims, TextDims, VisionDims, model_dims

__all__ = ["PRESETS", "MemoryPlan", "ModelDims", "PhasePlan", "TextDims", "VisionDims", "Workload", "largest_policy",
           "model_dims", "plan_memory"]  # fmt: skip

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
FUSED_TILE_BYTES = 64 << 20  # csrc/cpu/linear_token_logprobs.cpp kTileBytes: one logits tile of the fused op
GB = 1e9
MB = 2**20


@dataclass(frozen=True)
class Workload:
    """The run's configuration as far as memory goes, per step (images_per_step is the global batch).

    Token counts are inputs, not outputs: prompt_tokens (a policy prompt with its image tokens), image_patches (the
    vision tower's patches per image, merge**2 per image token), caption_tokens (mean; the KV cache is sized for
    max_new_tokens whatever the captions' length), and the reader's prompt: its few-shot header (cached once) then the
    caption, then one question per draw (question_tokens)."""

    images_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 512
    caption_tokens: int | None = None  # None: max_new_tokens
    prompt_tokens: int = 1000
    image_patches: int = 3600  # ~900 image tokens x 2 x 2 merge
    micro_batch_size: int = 8
    num_draws: int = 8
    reader_header_tokens: int = 300
    question_tokens: int = 80
    dtype: str = "bfloat16"
    world_size: int = 1
    sharding: str = "per-layer"  # FSDP2 groups when world_size > 1: "per-layer" or "one-group"
    # How a sharded rollout holds the policy: "whole" = gathered all at once for the whole rollout (what
    # caprl_core.distributed.gathered does); "per-layer" = one group at a time, two with prefetch (a projection)
    rollout_gather: str = "whole"
    gradient_checkpointing: bool = False
    shared_prefix: bool = True
    kv_cache: str = "allocated"  # "allocated" (CUDA) or "touched" (what a CPU resident set counts)
    block_size: int = 16
    optimizer_foreach: bool = True  # torch's AdamW default on CUDA; on CPU it loops over the tensors one by one
    max_batch_tokens: int = 8192  # the engines' prefill batch cap (sampler.engine.Engine)
    baseline_bytes: int = 0  # CPU: the process before the models are loaded; CUDA: 0

    def __post_init__(self) -> None:
        for name in ("images_per_step", "group_size", "max_new_tokens", "prompt_tokens", "micro_batch_size",
                     "num_draws", "world_size", "block_size", "max_batch_tokens"):  # fmt: skip
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.sharding not in ("per-layer", "one-group"):
            raise ValueError(f"sharding: expected 'per-layer' or 'one-group', got {self.sharding!r}")
        if self.rollout_gather not in ("whole", "per-layer"):
            raise ValueError(f"rollout_gather: expected 'whole' or 'per-layer', got {self.rollout_gather!r}")
        if self.kv_cache not in ("allocated", "touched"):
            raise ValueError(f"kv_cache: expected 'allocated' or 'touched', got {self.kv_cache!r}")
        if self.images_per_step % self.world_size:
            raise ValueError(f"images_per_step: {self.images_per_step} does not divide by world_size "
                             f"{self.world_size}")  # fmt: skip

    @classmethod
    def from_train_config(cls, config, **facts: Any) -> Workload:
        """From a `caprl_core.config.TrainConfig` (its images per step, G, max_new_tokens, micro-batch, draws, dtype
        (auto = bfloat16, the CUDA default), gradient checkpointing, shared prefix) and `facts` for the rest."""
        dtype = config.model.dtype if config.model.dtype != "auto" else "bfloat16"
        values = dict(images_per_step=config.rollout.images_per_step, group_size=config.rollout.group_size,
                      max_new_tokens=config.rollout.max_new_tokens, micro_batch_size=config.optim.micro_batch_size,
                      num_draws=config.reward.num_draws, dtype=dtype,
                      gradient_checkpointing=config.model.gradient_checkpointing,
                      shared_prefix=config.optim.shared_prefix)  # fmt: skip
        return cls(**{**values, **facts})

    @property
    def captions(self) -> int:
        return self.caption_tokens if self.caption_tokens is not None else self.max_new_tokens


@dataclass
class PhasePlan:
    """One phase's predicted peak: named terms in bytes."""

    phase: str
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass
class MemoryPlan:
    """The three phases' plans for one rank, and what they were computed for."""

    policy: ModelDims
    reader: ModelDims
    workload: Workload
    rollout: PhasePlan
    reward: PhasePlan
    update: PhasePlan

    @property
    def phases(self) -> tuple[PhasePlan, PhasePlan, PhasePlan]:
        return (self.rollout, self.reward, self.update)

    @property
    def peak(self) -> int:
        return max(p.total for p in self.phases)

    def table(self, unit: float = GB, unit_name: str = "GB") -> str:
        """A markdown table: every term's bytes in each phase (blank where a phase does not hold it), then totals."""
        names: list[str] = []
        for p in self.phases:
            names += [n for n in p.terms if n not in names]
        lines = [f"| term ({unit_name}) | rollout | reward | update |", "|---|---:|---:|---:|"]
        for n in names:
            cells = [f"{p.terms[n] / unit:.2f}" if n in p.terms else "" for p in self.phases]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("| **peak** | " + " | ".join(f"**{p.total / unit:.2f}**" for p in self.phases) + " |")
        return "\n".join(lines)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def plan_memory(policy: Any, reader: Any, workload: Workload) -> MemoryPlan:
    """Each phase's predicted peak memory per rank, term by term (see the module docstring for what each term is).

    policy, reader: anything `model_dims` takes (a preset name such as "qwen2.5-vl-3b", a config.json directory, a
    transformers config). The steady state is modelled (a step after the first: the AdamW state exists in every
    phase); the first step's rollout and reward lack the optimizer-state term."""
    p, r, w = model_dims(policy), model_dims(reader), workload
    e, W, per_layer = DTYPE_BYTES[w.dtype], w.world_size, w.sharding == "per-layer"
    P, R = p.params(), r.params()
    images = w.images_per_step // W  # this rank's images
    L, G = w.captions, w.group_size

    persistent: dict[str, int] = {}
    if w.baseline_bytes:
        persistent["process baseline (CPU)"] = w.baseline_bytes
    if W == 1:
        persistent["policy weights"] = P * e
        if e < FP32:
            persistent["fp32 master weights"] = P * FP32
    else:
        persistent["policy fp32 shards (masters)"] = P * FP32 // W
    persistent["AdamW state (fp32)"] = 2 * P * FP32 // W
    persistent["reader replica"] = R * e

    # Rollout: the sampler over the whole policy (gathered under FSDP), its KV cache, a prefill batch through one layer
    # and a decode step's fp32 logits (log-softmax and probabilities beside them).
    rollout = dict(persistent)
    if W > 1 and w.rollout_gather == "whole":
        rollout["gathered policy (compute dtype)"] = P * e
    elif W > 1:
        rollout["gathered groups: root + 2 layers (prefetch)"] = (p.root_params() + 2 * p.largest_group_params()) * e
    seq_blocks = _blocks(w.prompt_tokens + w.max_new_tokens, w.block_size)
    if w.kv_cache == "allocated":
        kv_tokens = _pow2(images * G * seq_blocks) * w.block_size
    else:  # the prompt's blocks once per image (forks share them), then each caption's own
        kv_tokens = images * (_blocks(w.prompt_tokens, w.block_size) + G * _blocks(L, w.block_size)) * w.block_size
    rollout["policy KV cache"] = kv_tokens * p.kv_bytes_per_token(e)
    prefill = min(w.max_batch_tokens, images * w.prompt_tokens)
    rollout["prefill / decode transient"] = max(
        prefill * p.inference_bytes_per_token(e), 3 * images * G * p.text.vocab * FP32
    )

    # Reward: the reader's prefill of C x N prompts (header, caption, question), its cache and transient.
    reward = dict(persistent)
    captions = images * G
    prompt = w.reader_header_tokens + L + w.question_tokens
    if w.kv_cache == "allocated":
        reader_tokens = _pow2(captions * w.num_draws * _blocks(prompt, w.block_size)) * w.block_size
    else:  # the header once, each caption once, each question on its own
        reader_tokens = w.reader_header_tokens + captions * (L + w.num_draws * w.question_tokens)
    reward["reader KV cache"] = reader_tokens * r.kv_bytes_per_token(e)
    reward["reader prefill transient"] = min(w.max_batch_tokens, captions * w.num_draws * prompt) * (
        r.inference_bytes_per_token(e)
    )

    # Update: the higher of two moments. The backward: the gradients so far (earlier micro-batches'), the gathered
    # groups and their unsharded gradients, one micro-batch's activations and the fused op's lm_head gradient. The
    # optimizer step: activations freed and groups resharded, the gradients and the step's temporaries.
    base = {**persistent, "fp32 gradients (masters)": P * FP32 // W}
    backward = dict(base)
    if W > 1:
        if per_layer:
            group = p.largest_group_params()
            backward["gathered groups: root + 2 layers (prefetch)"] = (p.root_params() + 2 * group) * e
            backward["unsharded grads + fp32 reduce copy: root + 1 layer"] = (p.root_params() + group) * (e + FP32)
        else:
            backward["gathered policy (one group)"] = P * e
            backward["unsharded grads + fp32 reduce copy (whole model)"] = P * (e + FP32)
    backward.update(_activation_terms(p, w, images))
    t = p.text
    # the fused op's [V, H] fp32 lm_head gradient before it is added into the parameter's, and its logits tile
    backward["lm_head weight grad + fused tile"] = t.vocab * t.hidden * FP32 + FUSED_TILE_BYTES
    step = dict(base)
    if w.optimizer_foreach:  # torch's multi-tensor AdamW (the CUDA default): sqrt of every state tensor at once
        step["optimizer step temporary"] = P * FP32 // W
    else:  # the per-tensor loop (CPU): sqrt(v) and its quotient, of the largest tensor, the embedding
        step["optimizer step temporary"] = 2 * t.vocab * t.hidden * FP32 // W
    update = max(backward, step, key=lambda terms: sum(terms.values()))
    return MemoryPlan(p, r, w, PhasePlan("rollout", rollout), PhasePlan("reward", reward), PhasePlan("update", update))


def _activation_terms(p: ModelDims, w: Workload, images: int) -> dict[str, int]:
    """One micro-batch's saved activations: the decoder's, the vision tower's, the shared forward's K/V copies."""
    e, t = DTYPE_BYTES[w.dtype], p.text
    captions = min(w.micro_batch_size, images * w.group_size)
    mb_images = min(images, -(-captions // w.group_size)) if w.shared_prefix else captions
    caption_tokens = captions * w.captions
    tokens = mb_images * w.prompt_tokens + caption_tokens  # the packed row (or the padded rows unshared)
    per_layer = p.layer_activation_bytes(e)
    if w.gradient_checkpointing:  # each layer's input, and one layer recomputed in the backward
        decoder = t.layers * tokens * t.hidden * e + tokens * per_layer
    else:
        decoder = t.layers * tokens * per_layer
    out = {"activations: decoder layers": decoder}
    if p.vision is not None:
        v = p.vision
        patches = mb_images * w.image_patches
        block = p.vision_block_activation_bytes(e)
        out["activations: vision tower"] = (
            v.depth * patches * v.hidden * e + patches * block
            if w.gradient_checkpointing
            else v.depth * patches * block
        )
    if w.shared_prefix:  # each caption batch's K and V carry a copy of its image's prompt (segment_attention)
        per_image = min(w.group_size, captions)
        kv = 2 * per_image * (w.prompt_tokens + w.captions) * t.kv_heads * t.head_dim * e
        out["activations: shared-prefix K/V copies"] = (1 if w.gradient_checkpointing else t.layers) * mb_images * kv
    # embeddings, final norm, the caption positions' hidden states the fused op saves
    out["activations: embeddings, final norm, selected"] = tokens * t.hidden * (e + 12) + caption_tokens * t.hidden * e
    return out


def largest_policy(reader: Any, workload: Workload, budget_bytes: float, shapes: tuple[str, ...] = (
        "qwen2.5-vl-32b", "qwen2.5-vl-72b")) -> tuple[ModelDims, MemoryPlan]:  # fmt: skip
    """The largest policy (by parameters) that fits `budget_bytes` per rank: for each preset shape in `shapes`, its
    widths with as many decoder layers as fit (1 up to twice the release's), the best over the shapes."""
    best: tuple[ModelDims, MemoryPlan] | None = None
    for name in shapes:
        base = model_dims(name)
        lo, hi = 0, 2 * base.text.layers
        while lo < hi:  # the peak grows with the layers: bisect for the most that fit
            mid = (lo + hi + 1) // 2
            dims = replace(base, name=f"{base.name} width, {mid} layers", text=replace(base.text, layers=mid))
            if plan_memory(dims, reader, workload).peak <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            dims = replace(base, name=f"{base.name} width, {lo} layers", text=replace(base.text, layers=lo))
            if best is None or dims.params() > best[0].params():
                best = (dims, plan_memory(dims, reader, workload))
    if best is None:
        raise ValueError(f"budget_bytes: no policy of the shapes {shapes} fits in {budget_bytes / GB:.1f} GB")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m caprl_core.memory_plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help=f"a preset ({', '.join(PRESETS)}) or a config.json directory")
    parser.add_argument("--reader", required=True, help="a preset or a config.json directory")
    defaults = Workload()
    for name in ("images_per_step", "group_size", "max_new_tokens", "caption_tokens", "prompt_tokens",
                 "image_patches", "micro_batch_size", "num_draws", "reader_header_tokens", "question_tokens",
                 "world_size"):  # fmt: skip
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPE_BYTES))
    parser.add_argument("--sharding", default=defaults.sharding, choices=["per-layer", "one-group"])
    parser.add_argument("--kv-cache", default=defaults.kv_cache, choices=["allocated", "touched"])
    parser.add_argument("--rollout-gather", default=defaults.rollout_gather, choices=["whole", "per-layer"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory per GPU, for the fit line (GB, 1e9 B)")
    parser.add_argument(
        "--largest",
        action="store_true",
        help="also search the largest policy that fits --gpu-gb (the 32B and 72B shapes, by layers)",
    )
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("policy", "reader", "gpu_gb", "largest")}
    try:
        workload = Workload(**values)
        dims = {}
        for flag in ("policy", "reader"):
            try:
                dims[flag] = model_dims(getattr(args, flag))
            except ValueError as e:
                raise ValueError(f"--{flag}: {str(e).removeprefix('model: ')}") from e
        plan = plan_memory(dims["policy"], dims["reader"], workload)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{plan.policy.name} ({plan.policy.params() / 1e9:.2f} B) + reader {plan.reader.name} "
          f"({plan.reader.params() / 1e9:.2f} B), {workload.dtype}, world size {workload.world_size}"
          f"{f', {workload.sharding} sharding' if workload.world_size > 1 else ''}, per rank:\n")  # fmt: skip
    print(plan.table())
    fits = "fits" if plan.peak <= args.gpu_gb * GB else "does NOT fit"
    print(f"\npeak {plan.peak / GB:.1f} GB: {fits} in {args.gpu_gb:g} GB")
    if args.largest:
        try:
            dims, best = largest_policy(plan.reader, workload, args.gpu_gb * GB)
        except ValueError as e:
            print(f"{parser.prog}: error: --largest: {e}", file=sys.stderr)
            return 2
        phases = ", ".join(f"{p.phase} {p.total / GB:.1f}" for p in best.phases)
        print(f"largest policy that fits: {dims.name}, {dims.params() / 1e9:.1f} B parameters ({phases} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
