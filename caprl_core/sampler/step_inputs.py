"""One engine step's model inputs, from the scheduler's batch: the packed token ids (or embeddings with each image's
vision-tower rows in place), their positions (M-RoPE for vision-language models), and the paged-attention metadata
(`StepContext`: cache slots, block tables, cumulative query lengths).

Shapes: T tokens computed this step (all sequences packed), B sequences, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from caprl_core.sampler.attention import build_gather_slots
from caprl_core.sampler.model import ModelAdapter, StepContext
from caprl_core.sampler.scheduler import Batch
from caprl_core.sampler.sequence import Sequence


@dataclass
class StepInputs:
    """What `ModelAdapter.forward` takes for one step, and where each sequence's last row is."""

    ctx: StepContext
    positions: torch.Tensor  # [T] or [3, T] (M-RoPE)
    input_ids: torch.Tensor | None  # [T]; None when inputs_embeds is given
    inputs_embeds: torch.Tensor | None  # [T, H] for vision-language models
    deepstack: tuple | None  # Qwen3-VL: (image token mask [T], per DeepStack layer [image tokens, H]) or None
    last_rows: torch.Tensor  # [B] row of each sequence's last token
    spans: list[tuple[int, int]]  # per sequence: the token range [start, end) this step computes


def step_spans(batch: Batch) -> list[tuple[int, int]]:
    """Per sequence, the token range [start, end) the step computes: the uncached prompt at prefill, else the last."""
    return [(seq.num_cached_tokens if batch.is_prefill else len(seq) - 1, len(seq)) for seq in batch.seqs]


def step_inputs(
    batch: Batch, adapter: ModelAdapter, kv_cache: torch.Tensor, block_size: int, attn_backend: str, on_image=None
) -> StepInputs:
    """The model inputs of `batch`. on_image() is called once per image whose vision tower runs in this step."""
    bs, device, vl = block_size, adapter.device, adapter.vision is not None
    spans = step_spans(batch)
    lengths = np.array([e - s for s, e in spans], dtype=np.int64)
    cu = np.zeros(len(spans) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    width = max(len(seq.block_table) for seq in batch.seqs)
    tables = np.full((len(spans), width), -1, dtype=np.int64)
    slots, ids, pos = [], [], []
    for b, (seq, (s, e)) in enumerate(zip(batch.seqs, spans, strict=True)):
        table = np.asarray(seq.block_table, dtype=np.int64)
        tables[b, : len(table)] = table
        p = np.arange(s, e)
        slots.append(table[p // bs] * bs + p % bs)
        ids.extend(seq.token_ids[s:e])
        pos.append(mrope_positions(seq, s, e) if vl else p)
    ctx = StepContext(
        kv_cache=kv_cache,
        slot_mapping=torch.from_numpy(np.concatenate(slots)).to(device),
        block_tables=torch.from_numpy(tables).to(device=device, dtype=torch.int32),
        cu_seqlens_q=torch.from_numpy(cu).to(device=device, dtype=torch.int32),
        context_lens=torch.tensor([e for _, e in spans], dtype=torch.int32, device=device),
        max_seqlen_q=int(lengths.max()),
        backend=attn_backend,
    )
    if attn_backend == "torch":
        ctx.gather_slots = build_gather_slots(ctx.block_tables, ctx.context_lens, bs, max(e for _, e in spans))
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    positions = torch.from_numpy(np.concatenate(pos, axis=-1)).to(device)
    last_rows = torch.from_numpy(cu[1:] - 1).to(device)
    if not vl:
        return StepInputs(ctx, positions, ids_t, None, None, last_rows, spans)
    embeds, deepstack = image_embeddings(adapter, batch.seqs, spans, ids_t, cu, on_image)
    return StepInputs(ctx, positions, None, embeds, deepstack, last_rows, spans)


def mrope_positions(seq: Sequence, start: int, end: int) -> np.ndarray:
    """M-RoPE positions [3, end - start] of tokens start..end-1 (text: the same 1-D position on all rows)."""
    p = np.arange(start, end)
    if seq.mm is None:
        return np.broadcast_to(p, (3, len(p)))
    out = np.empty((3, len(p)), dtype=np.int64)
    n_prompt = min(end, seq.num_prompt_tokens) - start
    if n_prompt > 0:
        out[:, :n_prompt] = seq.mm.positions[:, start : start + n_prompt].numpy()
    out[:, max(n_prompt, 0) :] = p[max(n_prompt, 0) :] + seq.mm.rope_delta
    return out


def image_embeddings(adapter: ModelAdapter, seqs: list[Sequence], spans, ids: torch.Tensor, cu: np.ndarray, on_image):
    """Token embeddings [T, H] with each image's placeholder rows replaced by its vision-tower output, and for
    Qwen3-VL the DeepStack inputs: (image token mask [T], per DeepStack layer [image tokens of the step, H] in
    packed order), or None when the step computes no image token."""
    embeds = adapter.embed(ids)
    mask = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    stacked = []  # [num_deepstack, rows, H] pieces in packed order
    for seq, (s, e), offset in zip(seqs, spans, cu[:-1].tolist(), strict=True):
        if seq.mm is None:
            continue
        for image, span in enumerate(seq.mm.spans):
            lo, hi = max(span.start, s), min(span.end, e)
            if lo >= hi:
                continue
            if image not in seq.mm.image_embeds and on_image is not None:
                on_image()
            image_rows = adapter.image_embeds(seq.mm, image)
            embeds[offset + lo - s : offset + hi - s] = image_rows[lo - span.start : hi - span.start]
            if adapter.num_deepstack:
                mask[offset + lo - s : offset + hi - s] = True
                stacked.append(seq.mm.deepstack_embeds[image][:, lo - span.start : hi - span.start])
    if not stacked:
        return embeds, None
    return embeds, (mask, list(torch.cat(stacked, dim=1).unbind(0)))
