"""Training the world's starting policy: a small Qwen2.5-VL fine-tuned (supervised) from scene images to terse
captions that mention only part of each scene, so that the reward has room to teach it to say more.

Training first uses reference captions (every cell of every image: the most supervision for seeing), then the
start style (`start_caption`): the first k cells in reading order (k = 1 most of the time), now and then the full
reference caption, so that sampling from it sometimes says more than the terse habit and GRPO can shift that habit
towards complete captions. A linear probe shared by the nine image tokens (one per cell of the 3x3 grid at 84 px)
reads each cell's content during training, so the vision tower learns one code for every cell.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from caprl_core.models import VL_SPECIAL_TOKENS
from caprl_core.policy import PolicyPrompter
from caprl_core.world import IMAGE_SIZE
from caprl_core.world.grammar import terse_caption
from caprl_core.world.scenes import COLOURS, GRID_CELLS, SHAPES, Scene, describe, draw_scene
from caprl_core.world.splits import sample_scene

P_REFERENCE = 0.1  # share of full reference captions in the start policy's training targets
P_ONE_CELL = 0.75  # of the terse ones, the share that states the first cell only (the others: the first two)
NUM_CELLS = 9  # image tokens of a world image: one per cell of the 3x3 grid, row-major
REFERENCE_SHARE = 0.7  # share of train_policy's steps on reference captions before the terse ones


def start_caption(scene: Scene, rng: random.Random) -> str:
    """A caption in the start policy's style (see the module docstring)."""
    if rng.random() < P_REFERENCE:
        return describe(scene)
    return terse_caption(scene, 1 if rng.random() < P_ONE_CELL else 2)


def policy_draws(rng: random.Random, size: int, terse: bool) -> tuple[list[Scene], list[str]]:
    """The policy's training stream, one batch at a time: scenes of the policy's part of the scene space
    (`splits.PARTS`) and their target captions (reference captions, or `start_caption` ones when `terse`)."""
    scenes = [sample_scene(rng, "policy") for _ in range(size)]
    return scenes, [start_caption(s, rng) if terse else describe(s) for s in scenes]


def make_policy(tokenizer, *, hidden_size: int = 128, num_layers: int = 4, vision_hidden: int = 64, seed: int = 0):
    """A randomly initialised Qwen2.5-VL for `tokenizer` (vocabulary padded to a multiple of 64): 2 vision blocks,
    14-px patches, 2x2 merge, M-RoPE."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    head_dim = hidden_size // 4
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # t/h/w split of the rotary half
    section[0] += head_dim // 2 - sum(section)
    special = {name: tokenizer.convert_tokens_to_ids(token) for name, token in VL_SPECIAL_TOKENS.items()}
    text = dict(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                pad_token_id=tokenizer.pad_token_id, rope_scaling={"type": "mrope", "mrope_section": section},
                tie_word_embeddings=True)  # fmt: skip
    vision = dict(depth=2, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[1])  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **special)
    return Qwen2_5_VLForConditionalGeneration(config)


def sft_batch(prompter: PolicyPrompter, scenes: list[Scene], captions: list[str], image_size: int = IMAGE_SIZE) -> dict:
    """Model inputs and labels [B, L] (-100 off the caption) for `scenes` captioned `captions`, then eos."""
    tok = prompter.tokenizer
    prompts = [prompter(draw_scene(s, image_size)) for s in scenes]
    rows = []
    for p, caption in zip(prompts, captions, strict=True):
        target = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p["input_ids"].tolist(), target))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    types = torch.zeros(len(rows), width, dtype=torch.int)
    for i, ((a, b), p) in enumerate(zip(rows, prompts, strict=True)):
        ids[i, : len(a) + len(b)] = torch.tensor(a + b)
        mask[i, : len(a) + len(b)] = 1
        labels[i, len(a) : len(a) + len(b)] = torch.tensor(b)
        types[i, : len(a)] = p["mm_token_type_ids"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "mm_token_type_ids": types,
            "cells": torch.tensor([cell_classes(s) for s in scenes]),
            "pixel_values": torch.cat([p["pixel_values"] for p in prompts]),
            "image_grid_thw": torch.cat([p["image_grid_thw"] for p in prompts])}  # fmt: skip


def sft_loss(model, batch: dict, probe: torch.nn.Module | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the caption tokens; with `probe`, plus the cell probe's loss: one image token
    per grid cell (IMAGE_SIZE), and one linear map shared by the nine must read each cell's content and which cell it
    is (its CELL_SHADES grey) off its token, so the vision tower learns a code that is the same in every cell and
    keeps the cell's identity (what the language model then looks up)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "cells")}
    out = model(**inputs, use_cache=False, output_hidden_states=probe is not None)
    logits = out.logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    if probe is not None:
        image = out.hidden_states[0][inputs["input_ids"] == model.config.image_token_id]  # [B * 9, H], row-major
        logits = probe(image)  # [B * 9, contents + 9]
        contents = logits.shape[1] - NUM_CELLS
        where = torch.arange(NUM_CELLS).repeat(len(batch["cells"]))
        loss = loss + torch.nn.functional.cross_entropy(logits[:, :contents], batch["cells"].reshape(-1))
        loss = loss + torch.nn.functional.cross_entropy(logits[:, contents:], where)
    return loss


def cell_classes(scene: Scene) -> list[int]:
    """The content of each of the 3x3 grid's cells, row-major (the order of the image tokens): 0 empty, else
    1 + colour * kinds + kind."""
    out = [0] * NUM_CELLS
    for s in scene.shapes:
        row, col = GRID_CELLS[s.position]
        out[3 * row + col] = 1 + list(COLOURS).index(s.colour) * len(SHAPES) + SHAPES.index(s.kind)
    return out


def train_policy(model, prompter: PolicyPrompter, *, steps: int, batch_size: int = 32, lr: float = 3e-3,
                 seed: int = 0, reference_share: float = REFERENCE_SHARE, log=None) -> None:  # fmt: skip
    """Supervised training of `model` in place on `steps` batches of fresh scenes. The first `reference_share` of the
    steps train on reference captions (every shape of every image: the most supervision for seeing), the rest on
    `start_caption` targets (the terse habit)."""
    rng = random.Random(seed)
    probe = torch.nn.Linear(model.config.text_config.hidden_size, 1 + len(COLOURS) * len(SHAPES) + NUM_CELLS)
    opt = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps)))
    )
    model.train()
    for step in range(steps):
        batch = sft_batch(prompter, *policy_draws(rng, batch_size, terse=step >= reference_share * steps))
        loss = sft_loss(model, batch, probe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log is not None:
            log(step, float(loss.detach()))
    model.eval()
