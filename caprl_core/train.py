"""`python -m caprl_core.train`: CapRL with GRPO on one node.

    python -m caprl_core.train                                   # the shipped miniature world, a few CPU minutes
    python -m caprl_core.train --policy Qwen2.5-VL-3B-Instruct --reader Qwen2.5-3B-Instruct --data train.jsonl
    python -m caprl_core.train --output-dir runs/x --resume      # continue from the last complete checkpoint

One step: (1) rollout: the policy samples G captions for each of B images through the paged sampler (the policy
object itself, no weight sync), with the log-probs it sampled them with; (2) reward: the reader scores every caption
with N drawn questions (`CapRLReward`), plus an optional caption-length term, and `ops.group_advantages` turns the
rewards into advantages within each image's group; (3) update: for each micro-batch the policy's hidden states and
`ops.linear_token_logprobs` give the caption tokens' log-probs (the [tokens, vocab] logits never exist), the
clipped GRPO loss (`caprl_core.grpo`) is back-propagated, and AdamW steps once per batch (num_iterations times).
By default the update's forward packs each image's prompt once followed by its captions in the micro-batch
(`caprl_core.shared_prefix`: the vision tower encodes each image once); `shared_prefix=False` runs one padded
`prompt + caption` row per caption, the reference it equals.

Output directory: metrics.jsonl (one line per step), samples.jsonl (captions every few steps), plot.png, config.json,
checkpoints/step-*/ (Hugging Face format with safetensors + trainer state; `latest` names the newest complete one).
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from caprl_core import grpo, ops
from caprl_core.checkpoint import (
    ResumeError,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    resume_errors,
    save_checkpoint,
    saved_masters,
    saved_parameters,
)
from caprl_core.config import TrainConfig, parse_config
from caprl_core.data import Example, load_image, load_jsonl
from caprl_core.distributed import (
    TokenLogprobs,
    World,
    WorldSizeError,
    all_gather_objects,
    barrier,
    close_world,
    full_model_state,
    full_optimizer_state,
    gathered,
    init_world,
    load_optimizer_state,
    local_images,
    rank_device,
    reduce_floats,
    shard_policy,
)
from caprl_core.plot import plot_metrics
from caprl_core.policy import DTYPES, ModelLoadError, PolicyPrompter, _default_dtype, load_models
from caprl_core.precision import MasterWeightOptimizer, NonFiniteGradientError
from caprl_core.reward import DEFAULT_TEMPLATE, CapRLReward, PromptTemplate, RewardConfig
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import Completion, SamplingParams
from caprl_core.shared_prefix import Group, shared_prefix_inputs
from caprl_core.world import make_world_data
from caprl_core.world.grammar import caption_fact_counts

ONE_PROCESS = World()  # the default of functions that also run under torchrun: no process group

# Metrics that depend on the machine's speed, not on the run: excluded when comparing runs.
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


@dataclass
class Rollout:
    """One step's samples, image-major: sample i*G + j is caption j of image i."""

    prompts: list[dict]  # [B] policy prompt dicts
    completions: list[Completion]  # [B*G]
    captions: list[str]  # [B*G]
    truncated: torch.Tensor  # [B*G] bool: hit max_new_tokens


# --- setup -------------------------------------------------------------------------------------------------------


def _device_dtype(config: TrainConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(config.model.device if config.model.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))  # fmt: skip
    return device, _default_dtype(DTYPES[config.model.dtype], device)


def _load_data(config: TrainConfig, output_dir: Path, world: World = ONE_PROCESS) -> list[Example]:
    """The dataset; without --data the miniature world's train split (`world.make_world_data`), written once, by
    rank 0, into the (shared) run directory."""
    path = config.data.data
    if path is None:
        path = output_dir / "data" / "data.jsonl"
        if world.is_main:
            path = make_world_data(output_dir / "data", "train", config.data.synthetic_images)
        barrier(world)
    return load_jsonl(path, on_error=config.data.on_error).examples


def _schedule(config: TrainConfig):
    """LR multiplier per step: linear warm-up, then constant or cosine to 0 at the last step."""
    o, total = config.optim, config.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batch(examples: list[Example], step: int, size: int, seed: int) -> list[Example]:
    """Images of `step`: a fresh seeded permutation per pass over the data; depends on the step only (resumable)."""
    out = []
    for k in range(step * size, (step + 1) * size):
        epoch, index = divmod(k, len(examples))
        order = np.random.default_rng([seed, epoch]).permutation(len(examples))
        out.append(examples[int(order[index])])
    return out


# --- the three phases --------------------------------------------------------------------------------------------


def rollout(engine: Engine, prompter: PolicyPrompter, tokenizer, examples: list[Example], config: TrainConfig,
            step: int, first_image: int = 0) -> Rollout:  # fmt: skip
    """G captions for each of `examples`, which are images first_image, first_image + 1, ... of the step's global
    batch: each image's samples are seeded by (seed, step, its index in the global batch), whatever rank draws them."""
    r = config.rollout
    prompts = [prompter(load_image(ex.image)) for ex in examples]
    stop = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    params = [SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                             max_new_tokens=r.max_new_tokens, stop_token_ids=stop, seed=config.seed * 1_000_003 + step,
                             banned_token_ids=_vision_token_ids(tokenizer), seed_index=first_image + i)
              for i in range(len(prompts))]  # fmt: skip
    outs = engine.generate(prompts, params)
    engine.free_kv_cache()  # the update needs the memory; the next rollout allocates it again
    completions = [c for group in outs for c in group]
    captions = [tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() for c in completions]
    truncated = torch.tensor([c.finish_reason == "length" for c in completions])
    return Rollout(prompts, completions, captions, truncated)


def _vision_token_ids(tokenizer) -> tuple[int, ...]:
    """The policy must not write image placeholders: in the training forward each one counts as an image token
    and no longer matches the image's features. (For a real model their probability is ~0 anyway.)"""
    ids = []
    for token in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"):
        i = tokenizer.convert_tokens_to_ids(token)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.append(i)
    return tuple(ids)


def rewards_and_advantages(reward: CapRLReward, ro: Rollout, examples: list[Example], config: TrainConfig,
                           step: int, world: World = ONE_PROCESS, first_image: int = 0,
                           ) -> tuple[torch.Tensor, torch.Tensor, dict]:  # fmt: skip
    """(rewards [n, R] per component, advantages [n], metrics) of this rank's n = len(examples) * G captions, which
    start at image `first_image` of the step's global batch. Component 0 is the reader's accuracy. Question draws
    are keyed by the caption's (or, with shared_draws, the image's) global index; advantages and metrics are
    computed on every rank's captions together, as one process computes them on the whole batch."""
    g, G = config.reward, config.rollout.group_size
    questions = [list(ex.questions) for ex in examples for _ in range(G)]
    first = first_image * G
    keys = [first_image + i // G if g.shared_draws else first + i for i in range(len(questions))]
    # `score` keeps only the reader's few-shot header cached between calls, always computed alone (Engine.prefill's
    # shared_prefix), so the numbers depend on this step's captions only (bit-exact resume). The whole cache is
    # released right after scoring anyway: the policy's backward pass needs that memory more than the header's few
    # hundred tokens need caching (update-phase peak 713 MB released vs 1308 MB kept, bench_train, 3B-shaped reader).
    accuracy, details = reward.score(ro.captions, questions, step=step, draw_keys=keys)
    reward.engine.free_kv_cache()
    local = {
        "accuracy": accuracy.float().cpu().tolist(), "length": [len(c.token_ids) for c in ro.completions],
        "caption_tokens": [len(c.token_ids) - (c.finish_reason == "stop") for c in ro.completions],
        "truncated": ro.truncated.tolist(), "captions": ro.captions,
        "references": [ex.caption for ex in examples for _ in range(G)],
        # p/q of each sampled token: the share of the policy's mass that bans, top-k and top-p kept (1 = unfiltered)
        "kept": [math.exp(p - q) for c in ro.completions for p, q in zip(c.policy_logprobs, c.logprobs, strict=True)],
        "computed": details.computed_tokens, "prompt_tokens": details.prompt_tokens,
    }  # fmt: skip
    every = _concat(all_gather_objects(local, world))  # the whole step's captions, in global order
    rewards, advantages, metrics = _advantages_and_metrics(every, config, step)
    mine = slice(first, first + len(ro.completions))
    return rewards[mine], advantages[mine], metrics


def _concat(parts: list[dict]) -> dict:
    """Ranks' per-caption lists joined in rank order (= global order); counts summed."""
    return {k: sum(p[k] for p in parts) if isinstance(parts[0][k], int) else [x for p in parts for x in p[k]]
            for k in parts[0]}  # fmt: skip


def _advantages_and_metrics(every: dict, config: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rewards [N, R], advantages [N] and the step's reward metrics from the whole batch's per-caption results."""
    g, G = config.reward, config.rollout.group_size
    accuracy = torch.tensor(every["accuracy"], dtype=torch.float32)
    columns, weights = [accuracy], [1.0]
    lengths = torch.tensor(every["length"], dtype=torch.float32)
    if g.length_weight > 0:  # caption tokens without the stop token, as the recipe's server counts them
        caption_tokens = torch.tensor(every["caption_tokens"], dtype=torch.float32)
        columns.append(grpo.caption_length_reward(caption_tokens, g.length_l1, g.length_l2))
        weights.append(g.length_weight)
    rewards = torch.stack(columns, dim=1)  # [N, R]
    # sum: one score, accuracy + weight x R_len, normalised in the group (the recipe's server); else each column alone
    signal = grpo.combined_score(rewards, weights) if g.length_combine == "sum" else rewards  # [N, R'] R' in {1, R}
    if g.shuffle_rewards:  # the control run: each caption gets another caption's rewards
        signal = signal[torch.from_numpy(np.random.default_rng([config.seed, step, 7]).permutation(len(rewards)))]
    decoupled = signal.shape[1] > 1
    advantages = ops.group_advantages(
        signal if decoupled else signal[:, 0], group_size=G, method=g.advantage, scale=g.scale,
        weights=torch.tensor(weights) if decoupled else None,
    )  # fmt: skip
    total = (rewards * torch.tensor(weights)).sum(1)
    flat_groups = (total.view(-1, G).max(1).values == total.view(-1, G).min(1).values).float().mean()
    kept = every["kept"]
    metrics = {
        "sampled_mass": sum(kept) / max(1, len(kept)),
        "reward_mean": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
        "accuracy": float(accuracy.mean()), "zero_adv_groups": float(flat_groups),
        "caption_length": float(lengths.mean()),
        "truncation_rate": float(torch.tensor(every["truncated"], dtype=torch.float32).mean()),
        "reader_tokens_computed": every["computed"], "reader_tokens": every["prompt_tokens"],
    }  # fmt: skip
    metrics.update(_fact_metrics(every["captions"], every["references"]))
    return rewards, advantages, metrics


def _fact_metrics(captions: list[str], references: list[str | None]) -> dict:
    """fact_precision and fact_recall of the captions (micro-averaged) against the facts of their reference captions,
    when every reference is a complete caption of the miniature world's grammar; else nothing."""
    counts = caption_fact_counts(captions, references)
    if counts is None:
        return {}
    true, claims, stated, facts = counts
    return {"fact_precision": true / claims if claims else float("nan"), "fact_recall": stated / facts}


@dataclass
class TrainingBatch:
    """One micro-batch of the update (M captions of at most T tokens): the policy's inputs and the caption targets."""

    inputs: dict  # kwargs of `policy.model`
    index: torch.Tensor  # [M, T] into the flattened forward positions: the one whose hidden state predicts each token
    targets: torch.Tensor  # [M, T], -100 past each caption's end
    sampler_logp: torch.Tensor  # [M, T] the sampler's log-probs under the unfiltered policy
    mask: torch.Tensor  # [M, T] bool, True on caption tokens
    num_tokens: int  # tokens the forward runs through the language model (padding included)
    num_images: int  # images the vision tower encodes


def _training_batch(ro: Rollout, rows: list[int], group_size: int, device: torch.device, policy=None,
                    shared_prefix: bool = False) -> TrainingBatch:  # fmt: skip
    """The policy inputs of samples `rows` and where their caption tokens are: one right-padded `prompt + caption`
    row per sample, or (shared_prefix, needs `policy`) one packed row holding each image's prompt once followed by
    its captions among `rows` (`caprl_core.shared_prefix`)."""
    if shared_prefix:
        if policy is None:
            raise ValueError("policy: required with shared_prefix=True (its positions and attention mask form)")
        groups = [Group(g, [ro.completions[i].token_ids for i in rows if i // group_size == g])
                  for g in dict.fromkeys(i // group_size for i in rows)]  # fmt: skip
        inputs, index, num_images = shared_prefix_inputs(policy, ro.prompts, groups, device)
    else:
        inputs, index, num_images = _unshared_inputs(ro, rows, group_size, device)
    targets, old = _caption_targets(ro, rows)
    num_tokens = inputs["input_ids"].numel()
    return TrainingBatch(inputs, index, targets.to(device), old.to(device), (targets != -100).to(device), num_tokens,
                         num_images)  # fmt: skip


def _caption_targets(ro: Rollout, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """targets [M, T] (-100 on padding) and the sampler's log-probs [M, T] under the unfiltered policy."""
    t_max = max(len(ro.completions[i].token_ids) for i in rows)
    targets = torch.full((len(rows), t_max), -100, dtype=torch.long)
    old = torch.zeros(len(rows), t_max)
    for m, i in enumerate(rows):
        c = ro.completions[i]
        if c.policy_logprobs is None:
            raise ValueError(f"completion {i}: has no policy_logprobs (the unfiltered policy's log-probs the "
                             f"ratio needs; the Engine records them)")  # fmt: skip
        targets[m, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
        old[m, : len(c.token_ids)] = torch.tensor(c.policy_logprobs)  # what the fused kernel computes (module doc)
    return targets, old


def _unshared_inputs(ro: Rollout, rows: list[int], group_size: int,
                     device: torch.device) -> tuple[dict, torch.Tensor, int]:  # fmt: skip
    """One right-padded `prompt + caption` row per sample: (model kwargs, index [M, T] into the flattened [M*L]
    positions that predict each caption token, images in the batch). The reference for the shared forward."""
    ids = [ro.prompts[i // group_size]["input_ids"].tolist() + ro.completions[i].token_ids for i in rows]
    width = max(len(x) for x in ids)
    t_max = max(len(ro.completions[i].token_ids) for i in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    index = torch.zeros(len(rows), t_max, dtype=torch.long)
    for m, (x, i) in enumerate(zip(ids, rows, strict=True)):
        plen, n = len(ro.prompts[i // group_size]["input_ids"]), len(ro.completions[i].token_ids)
        input_ids[m, : len(x)] = torch.tensor(x)
        attention[m, : len(x)] = 1
        index[m, :n] = m * width + torch.arange(plen - 1, plen - 1 + n)  # position p predicts token p + 1
    kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
    if "pixel_values" not in ro.prompts[0]:
        return kwargs, index.to(device), 0
    prompts = [ro.prompts[i // group_size] for i in rows]
    kwargs["pixel_values"] = torch.cat([p["pixel_values"] for p in prompts]).to(device)
    kwargs["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in prompts]).to(device)
    types = torch.zeros_like(input_ids, dtype=torch.int)
    for m, p in enumerate(prompts):
        types[m, : len(p["mm_token_type_ids"])] = p["mm_token_type_ids"]
    kwargs["mm_token_type_ids"] = types.to(device)
    return kwargs, index.to(device), len(prompts)


def policy_logprobs(policy, batch: TrainingBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [M, T] and entropies [M, T] of the batch's caption tokens under the policy at `temperature`, from
    the base model's hidden states and the fused lm_head + log-softmax (no [tokens, vocab] logits)."""
    hidden = policy.model(**batch.inputs, use_cache=False).last_hidden_state  # [rows, L, H]: [M, L] or [1, T]
    flat = hidden.reshape(-1, hidden.shape[-1])
    selected = flat[batch.index.reshape(-1)].view(*batch.index.shape, -1)  # [M, T, H]
    head = policy.get_output_embeddings()
    return ops.linear_token_logprobs(selected, head.weight, batch.targets, bias=head.bias, temperature=temperature,
                                     return_entropy=True)  # fmt: skip


def update(policy, ref_policy, optimizer: MasterWeightOptimizer, scheduler, ro: Rollout, advantages: torch.Tensor,
           config: TrainConfig, device: torch.device, *, world: World = ONE_PROCESS,
           root: TokenLogprobs | None = None) -> dict:  # fmt: skip
    """num_iterations passes of micro-batched clipped-GRPO updates; one optimizer step per pass.

    `ro` and `advantages` are this rank's share of the step's batch; `root` (the FSDP root around `policy`, None: a
    plain one) runs the forward. Every micro-batch's loss share is taken against the whole batch's counts over all
    ranks, and FSDP sums the gradients, so N ranks step the one-process gradient.

    The policy computes in its own dtype (the sampler's), and the optimizer steps fp32 masters (caprl_core.precision).
    The ratio's old log-probs: with rollout_correction "none", the sampler's (of the same unfiltered distribution);
    otherwise the trainer's own from the first pass, with `grpo.rollout_correction_weights` correcting for the
    sampler's numbers. `sampler_kl` (k3, sampler -> trainer) and `sampler_max_abs_diff` measure that gap."""
    o, G = config.optim, config.rollout.group_size
    loss_config = grpo.LossConfig(epsilon=o.epsilon, epsilon_high=o.epsilon_high, aggregation=o.aggregation,
                                  max_completion_length=config.rollout.max_new_tokens, beta=o.beta,
                                  mask_truncated=o.mask_truncated)  # fmt: skip
    n = len(ro.completions)
    lengths = torch.tensor([len(c.token_ids) for c in ro.completions], dtype=torch.float32)
    keep = ~ro.truncated if o.mask_truncated else torch.ones(n, dtype=torch.bool)
    totals = reduce_floats({"tokens": float((lengths * keep).sum()), "seqs": float(keep.sum()), "n": n}, world)
    total_tokens, total_seqs = max(1.0, totals["tokens"]), max(1.0, totals["seqs"])
    root = root if root is not None else TokenLogprobs(policy, policy_logprobs)
    sums: dict[str, float] = {}
    first_pass: dict[int, torch.Tensor] = {}  # micro-batch start -> the trainer's log-probs [M, T] at rollout time
    counts = {"update_tokens": 0, "update_images": 0}  # what the policy's forwards ran, over all passes
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; scheduler.step() below sets the next step's
    skipped = 0
    policy.train()
    for iteration in range(o.num_iterations):
        optimizer.zero_grad()
        for start in range(0, n, o.micro_batch_size):
            rows = list(range(start, min(n, start + o.micro_batch_size)))
            batch = _training_batch(ro, rows, G, device, policy, o.shared_prefix)
            counts["update_tokens"] += batch.num_tokens
            counts["update_images"] += batch.num_images
            sampler_logp, mask = batch.sampler_logp, batch.mask
            logp, entropy = root(batch, config.rollout.temperature)
            ref = None
            if ref_policy is not None:
                with torch.no_grad():
                    ref, _ = policy_logprobs(ref_policy, batch, config.rollout.temperature)
            m: dict[str, torch.Tensor] = {}
            if iteration == 0:
                first_pass[start] = logp.detach()
                m.update(_sampler_gap(logp.detach(), sampler_logp, mask))
            if o.rollout_correction == "none":
                old, weights = sampler_logp, None
            else:
                old = first_pass[start]
                weights, wm = grpo.rollout_correction_weights(old, sampler_logp, mask, mode=o.rollout_correction,
                                                              level=o.rollout_correction_level,
                                                              cap=o.rollout_correction_cap)  # fmt: skip
                m.update(wm)
            loss, lm = grpo.policy_loss(logp, old, advantages[rows].to(device), mask, loss_config, ref_logp=ref,
                                        truncated=ro.truncated[rows].to(device), entropy=entropy,
                                        weights=weights)  # fmt: skip
            m.update(lm, loss=loss.detach())
            share = _share(o.aggregation, rows, lengths, keep, total_tokens, total_seqs, int(totals["n"]))
            (loss * share).backward()
            for key, value in m.items():
                if key == "sampler_max_abs_diff":
                    sums[key] = max(sums.get(key, 0.0), float(value))
                else:
                    sums[key] = sums.get(key, 0.0) + float(value) * share
        grad_norm = optimizer.step(o.max_grad_norm)
        skipped += optimizer.last_step_skipped
    scheduler.step()
    policy.eval()
    sums = {
        **reduce_floats({k: v for k, v in sums.items() if k != "sampler_max_abs_diff"}, world),
        **reduce_floats({k: v for k, v in sums.items() if k == "sampler_max_abs_diff"}, world, op="max"),
    }
    per_pass = ("sampler_kl", "sampler_max_abs_diff")  # measured on the first pass only
    out = {k: v if k in per_pass else v / o.num_iterations for k, v in sums.items() if k != "num_tokens"}
    out["grad_norm"] = float(grad_norm)
    out.update({k: int(v) for k, v in reduce_floats(counts, world).items()})
    out["lr"] = lr
    out["skipped_steps"] = skipped  # optimizer steps skipped for a non-finite gradient norm (caprl_core.precision)
    return out


def _share(aggregation: str, rows: list[int], lengths: torch.Tensor, keep: torch.Tensor, total_tokens: float,
           total_seqs: float, n: int) -> float:  # fmt: skip
    """A micro-batch's share of what the whole batch's aggregation divides by, so that accumulated micro-batch losses
    equal the full batch's loss. ("constant" divides by all rows, truncated ones included, as TRL's dr_grpo does.)"""
    if aggregation == "token-mean":
        return float((lengths[rows] * keep[rows]).sum()) / total_tokens
    if aggregation == "constant":
        return len(rows) / n
    return float(keep[rows].sum()) / total_seqs


def _sampler_gap(train_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the sampler's log-probs are from the trainer's for the same tokens and distribution: the k3 estimate
    of KL(sampler || trainer) and the largest absolute difference. 0 in exact arithmetic."""
    train_logp, sampler_logp = train_logp.double(), sampler_logp.double()  # k3 of ~1e-7 gaps cancels to 0 in fp32
    diff = (train_logp - sampler_logp).abs().masked_fill(~mask, 0.0)
    return {"sampler_kl": grpo.masked_mean(grpo.k3_kl(sampler_logp, train_logp), mask),
            "sampler_max_abs_diff": diff.max() if diff.numel() else torch.zeros(())}  # fmt: skip


# --- logging -----------------------------------------------------------------------------------------------------


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last `_reset_peak_memory`: CUDA allocated bytes, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else ():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the CPU figures are the process's lifetime peak


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past `last_step` (written after the checkpoint a resumed run restarts from)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    path.write_text("".join(ln + "\n" for ln in lines))


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


# --- the run -----------------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything a training step uses (see `setup`). Under torchrun `root` is the FSDP-sharded wrapper of
    `policy` (whose parameters are then shards outside `gathered(root)`)."""

    config: TrainConfig
    output_dir: Path
    device: torch.device
    policy: torch.nn.Module
    ref_policy: torch.nn.Module | None
    tokenizer: object
    prompter: PolicyPrompter
    engine: Engine
    reward: CapRLReward
    optimizer: MasterWeightOptimizer
    scheduler: object
    examples: list[Example]
    processors: list  # saved beside each checkpoint's weights: tokenizer, image processor, chat-template files
    world: World = ONE_PROCESS
    root: TokenLogprobs | None = None

    def step(self, step: int) -> dict:
        """One rollout -> reward -> update step over this rank's share of the step's images; returns the whole
        step's metrics (the same on every rank; peak memory per phase: the largest rank's)."""
        config, device, world = self.config, self.device, self.world
        _reset_peak_memory(device)
        t0 = time.perf_counter()
        mine = local_images(config.rollout.images_per_step, world)
        batch = _batch(self.examples, step, config.rollout.images_per_step, config.seed)[mine.start : mine.stop]
        self.policy.eval()
        with gathered(self.root):  # one all-gather for the whole rollout; resharded before the update
            ro = rollout(self.engine, self.prompter, self.tokenizer, batch, config, step, first_image=mine.start)
        t1, peak_rollout = time.perf_counter(), _peak_memory_mb(device)
        _reset_peak_memory(device)
        rewards, advantages, metrics = rewards_and_advantages(self.reward, ro, batch, config, step, world, mine.start)
        t2, peak_reward = time.perf_counter(), _peak_memory_mb(device)
        _reset_peak_memory(device)
        metrics.update(update(self.policy, self.ref_policy, self.optimizer, self.scheduler, ro, advantages, config,
                              device, world=world, root=self.root))  # fmt: skip
        t3, peak_update = time.perf_counter(), _peak_memory_mb(device)
        generated = reduce_floats({"tokens": sum(len(c.token_ids) for c in ro.completions)}, world)["tokens"]
        peaks = reduce_floats({"rollout": peak_rollout, "reward": peak_reward, "update": peak_update}, world, "max")
        metrics.update({"time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2, "time_step": t3 - t0,
                        "tokens_per_s": generated / max(t1 - t0, 1e-9), "peak_memory_mb": max(peaks.values()),
                        "peak_memory_rollout_mb": peaks["rollout"], "peak_memory_reward_mb": peaks["reward"],
                        "peak_memory_update_mb": peaks["update"]})  # fmt: skip
        if step % config.log.sample_every == 0 and world.is_main:  # rank 0's first images: the batch's first
            self._write_samples(step, batch, ro, rewards)
        return {"step": step, **metrics}

    def _write_samples(self, step: int, batch: list[Example], ro: Rollout, rewards: torch.Tensor) -> None:
        G = self.config.rollout.group_size
        with (self.output_dir / "samples.jsonl").open("a") as f:
            for i, ex in enumerate(batch[:2]):
                f.write(json.dumps({"step": step, "image": ex.id, "captions": ro.captions[i * G : (i + 1) * G],
                                    "rewards": rewards[i * G : (i + 1) * G, 0].tolist()}) + "\n")  # fmt: skip


def reward_config(config: TrainConfig, reader_template: PromptTemplate | None) -> RewardConfig:
    """The reward's configuration from the run's: with --reward-preset recipe the published server's prompt and
    answer letters (`RewardConfig.recipe`), else the reader directory's template or the default one."""
    g = config.reward
    values = dict(num_draws=g.num_draws, mode=g.mode, temperature=g.reader_temperature, seed=config.seed,
                  kv_cache_tokens=config.rollout.reader_kv_cache_tokens)  # fmt: skip
    if g.reward_preset == "recipe":
        return RewardConfig.recipe(**values)
    return RewardConfig(**values, template=reader_template or DEFAULT_TEMPLATE)


def setup(config: TrainConfig, world: World = ONE_PROCESS, weights_from: Path | None = None) -> Run:
    """Models, data, sampler, reward, optimizer and schedule of a run (nothing trained yet). Under torchrun
    (`world.distributed`) the policy is loaded in fp32, given the weights of checkpoint `weights_from` (a resume),
    then sharded; the sampler and the reader are this rank's own."""
    _seed_everything(config.seed)
    device, dtype = _device_dtype(config)
    device = rank_device(device, world)
    # Models first: a directory that does not load must not leave a half-made run directory behind.
    models = load_models(config.model.policy, config.model.reader, dtype=dtype, device=device, seed=config.seed)
    policy, tokenizer, image_processor = models.policy, models.tokenizer, models.image_processor
    reader, reader_tokenizer = models.reader, models.reader_tokenizer
    if world.distributed:
        # Sharded, the fp32 parameters are the masters. Loaded in the compute dtype first, they start where one
        # process's masters start (its weights rounded to that dtype), so N ranks step what one process steps.
        policy.float()
    output_dir = Path(config.log.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    output_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    reader.requires_grad_(False)
    if config.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    examples = _load_data(config, output_dir, world)
    prompter = PolicyPrompter(tokenizer, image_processor, config.rollout.instruction)
    # The KL reference is the initial policy, frozen and replicated per rank; with beta == 0 (the recipe) none.
    ref_policy = copy.deepcopy(policy).to(dtype).requires_grad_(False) if config.optim.beta > 0 else None
    root = TokenLogprobs(policy, policy_logprobs)
    if world.distributed:
        if weights_from is not None:
            _load_full_weights(weights_from, root)  # into the full fp32 model, before it is split into shards
        shard_policy(root, world, dtype)
    with gathered(root):  # the engine reads the compute dtype off the gathered weights
        engine = Engine(policy, kv_cache_tokens=config.rollout.kv_cache_tokens)
    reward = CapRLReward(reader, reader_tokenizer, reward_config(config, models.reader_template))
    # AdamW over fp32 masters of the policy's weights, whatever dtype the policy computes in (caprl_core.precision);
    # sharded, the fp32 shards are the masters and no copy is made.
    optimizer = MasterWeightOptimizer(
        root, lambda params: torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, _schedule(config))
    return Run(config, output_dir, device, policy, ref_policy, tokenizer, prompter, engine, reward, optimizer,
               scheduler, examples, models.processors, world, root if world.distributed else None)  # fmt: skip


def _load_full_weights(ckpt: Path, root: TokenLogprobs) -> None:
    """A checkpoint's weights into the (unsharded, fp32) policy; where a one-process low-precision run saved fp32
    master copies, those, not its rounded weights."""
    with resume_errors(ckpt):
        load_weights(ckpt, root.policy)
        params = [p for p in root.parameters() if p.requires_grad]  # MasterWeightOptimizer's order
        masters = saved_masters(ckpt)
        if len(masters) != len(params):
            raise ValueError(f"its optimizer state has {len(masters)} parameters, this policy {len(params)}")
        with torch.no_grad():
            for p, m in zip(params, masters, strict=True):
                if m is not None:
                    p.copy_(m)


class _OneProcessOptimizerLoader:
    """What `load_checkpoint` restores the optimizer into in one process: masters a checkpoint lacks (a torchrun
    run's, whose fp32 weights are its masters) are rebuilt from its fp32 weights."""

    def __init__(self, run: Run, ckpt: Path) -> None:
        self.run, self.ckpt = run, ckpt

    def load_state_dict(self, state: dict) -> None:
        optimizer = self.run.optimizer
        optimizer.load_state_dict(state, lambda: saved_parameters(self.ckpt, self.run.policy, optimizer.params))


class _FullOptimizerState:
    """What `save_checkpoint` stores as the optimizer: the state gathered from every rank (rank 0's copy)."""

    def __init__(self, state: dict | None) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state


class _ShardedOptimizerLoader:
    """What `load_checkpoint` restores the optimizer into: a full saved state split into this rank's shards."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.run.root, self.run.optimizer.optimizer, state)


def _save(run: Run, step: int) -> None:
    """Checkpoint `step`. Sharded: every rank takes part in gathering the full weights and optimizer state, rank 0
    writes them (the fp32 masters are the weights there), the others wait until the checkpoint is complete."""
    config, world = run.config, run.world
    state = {"step": step, "config": config.to_dict()}
    if not world.distributed:
        save_checkpoint(run.output_dir, step, model=run.policy, optimizer=run.optimizer, scheduler=run.scheduler,
                        trainer_state=state, processors=run.processors, keep_last=config.log.keep_last)  # fmt: skip
        return
    weights = full_model_state(run.root, world)
    optimizer = _FullOptimizerState(full_optimizer_state(run.root, run.optimizer.optimizer, world))
    if world.is_main:
        save_checkpoint(run.output_dir, step, model=run.policy, optimizer=optimizer, scheduler=run.scheduler,
                        trainer_state=state, processors=run.processors, keep_last=config.log.keep_last,
                        state_dict=weights)  # fmt: skip
    barrier(world)


def _resume(run: Run, ckpt: Path) -> int:
    """Restore the optimizer, schedule and RNG of `ckpt` (and one process: the weights); returns the next step."""
    with resume_errors(ckpt):
        if run.world.distributed:  # the weights went into the full model before sharding (setup)
            state = load_checkpoint(ckpt, model=None, optimizer=_ShardedOptimizerLoader(run), scheduler=run.scheduler)
        else:
            state = load_checkpoint(ckpt, model=run.policy, optimizer=_OneProcessOptimizerLoader(run, ckpt),
                                    scheduler=run.scheduler)  # fmt: skip
    return int(state["step"]) + 1


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Run training; returns the output directory. Under torchrun every rank runs this; rank 0 writes the logs."""
    device, _ = _device_dtype(config)
    world = init_world(device.type)
    try:
        local_images(config.rollout.images_per_step, world)  # before any model loads: a batch that cannot split
        return _train(config, resume, world)
    finally:
        close_world(world)


def _train(config: TrainConfig, resume: bool, world: World) -> Path:
    ckpt = latest_checkpoint(config.log.output_dir) if resume and config.log.output_dir else None
    run = setup(config, world, weights_from=ckpt)
    output_dir, main_rank = run.output_dir, world.is_main
    start = 0
    metrics_path = output_dir / "metrics.jsonl"
    if ckpt is not None:
        start = _resume(run, ckpt)
        if main_rank:
            _trim_metrics(metrics_path, start - 1)
            print(f"[caprl_core.train] resumed from {ckpt} at step {start}", file=sys.stderr)
    elif metrics_path.exists() and main_rank:
        metrics_path.unlink()  # a fresh run in an existing directory starts a fresh log

    progress = Progress(config.steps, start, config.log.progress and main_rank)
    for step in range(start, config.steps):
        metrics = run.step(step)
        if main_rank:
            with metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        progress.update(step, metrics)
        _stop_on_skips(run, step)  # before a checkpoint: the last one stays the last good one
        last = step == config.steps - 1
        if (step + 1) % config.log.checkpoint_every == 0 or last:
            _save(run, step)
    progress.close()
    if main_rank:
        plot_metrics(metrics_path, output_dir / "plot.png")
    return output_dir


def _stop_on_skips(run: Run, step: int) -> None:
    skips, limit = run.optimizer.consecutive_skips, run.config.optim.max_skipped_steps
    if skips >= limit:
        last = latest_checkpoint(run.output_dir)
        raise NonFiniteGradientError(f"step {step}: {skips} optimizer steps in a row had a non-finite gradient norm "
                                     f"and were skipped (--max-skipped-steps {limit}); the last good checkpoint is "
                                     f"{last or 'none'}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoint writes would print bars of their own between the run's
    try:
        config, resume = parse_config(argv)
    except ValueError as e:
        print(f"python -m caprl_core.train: error: {e}", file=sys.stderr)
        return 2
    try:
        out = train(config, resume=resume)
    except (ModelLoadError, WorldSizeError, ResumeError) as e:  # the user's input (a directory, a batch size, ...)
        print(f"python -m caprl_core.train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteGradientError as e:
        print(f"python -m caprl_core.train: error: {e}", file=sys.stderr)
        return 1
    print(f"[caprl_core.train] done: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
