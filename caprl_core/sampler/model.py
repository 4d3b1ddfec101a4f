"""Drive the trainer's own Hugging Face model over packed, paged batches.

The model object is used as is (no copy of its weights): during an engine step its language model's attention
implementation is switched to "caprl_paged", an attention function registered with transformers'
`AttentionInterface`, and switched back afterwards, so training forwards keep their own implementation. The batch
is packed into one row ([1, T] tokens, per-token positions); the registered function writes each layer's new K/V
into the paged cache and attends per sequence through the block tables, using the `StepContext` the engine
installs for the step. A mask function that returns None is registered under the same name: masks are meaningless
for a packed batch, and building a [T, T] one would cost memory.

Supported: decoder-only text models whose attention modules call the attention interface and carry `layer_idx`
(Qwen2/Qwen2.5, Qwen3, Llama, and the like), Qwen2.5-VL and Qwen3-VL (`model.model.language_model` +
`model.model.visual`). Qwen3-VL's DeepStack adds features of early vision blocks to the hidden states of the image
tokens after its first decoder layers: the engine hands the step's image rows of each such feature to the decoder
(`visual_pos_masks`, `deepstack_visual_embeds`), in the packed order of the image tokens the step computes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from caprl_core.sampler.attention import paged_attention, store_kvcache
from caprl_core.sampler.sequence import ImageSpan, MultimodalPrompt

ATTN_IMPLEMENTATION = "caprl_paged"


@dataclass
class StepContext:
    """Everything the attention function needs for one forward pass (shapes: T new tokens, B sequences)."""

    kv_cache: torch.Tensor  # [2, L, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, -1 padded
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: new tokens of sequence b are rows cu[b]:cu[b+1]
    context_lens: torch.Tensor  # [B] int32: tokens of sequence b in the cache after this step
    max_seqlen_q: int
    backend: str  # resolved once by the engine (caprl_core.sampler.attention.select_backend)
    gather_slots: torch.Tensor | None = None  # [B, S] for the "torch" backend, built once per step for all layers


_STEP: StepContext | None = None


def _paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    ctx = _STEP
    if ctx is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} called outside a caprl_core Engine step; "
            "the engine switches it on only for its own forward passes"
        )
    layer = module.layer_idx
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, Hkv, D]
    k_cache, v_cache = ctx.kv_cache[0, layer], ctx.kv_cache[1, layer]
    # The engine builds the step's metadata itself, so the per-layer value checks (a host sync each) are skipped.
    store_kvcache(k, v, k_cache, v_cache, ctx.slot_mapping, backend=ctx.backend, check_metadata=False)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = paged_attention(
        q, k_cache, v_cache, ctx.block_tables, ctx.cu_seqlens_q, ctx.context_lens, scale,
        max_seqlen_q=ctx.max_seqlen_q, backend=ctx.backend, gather_slots=ctx.gather_slots, check_metadata=False,
    )  # fmt: skip
    return out[None], None


def _no_mask(*args, **kwargs) -> None:
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, _paged_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


class ModelAdapter:
    """The parts of a Hugging Face causal LM (or Qwen2.5-VL) the engine needs, found once."""

    def __init__(self, model: torch.nn.Module) -> None:
        inner = getattr(model, "model", None)
        if inner is None or model.get_output_embeddings() is None:
            raise ValueError(
                f"model: expected a Hugging Face *ForCausalLM / *ForConditionalGeneration with .model and an lm_head, "
                f"got {type(model).__name__}"
            )
        self.model = model
        self.decoder = getattr(inner, "language_model", inner)  # the text decoder (Qwen2.5-VL nests it)
        self.lm_head = model.get_output_embeddings()
        self.config = self.decoder.config
        self.vision = inner if hasattr(inner, "visual") and hasattr(inner, "get_rope_index") else None
        if getattr(self.config, "use_sliding_window", False):
            raise ValueError("model: sliding-window attention is not supported by the paged engine")
        attn_layers = [m for m in self.decoder.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
        if not attn_layers:
            raise ValueError(f"model: no attention modules with layer_idx found in {type(self.decoder).__name__}")
        self.num_layers = self.config.num_hidden_layers
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = getattr(self.config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads
        self.hidden_size = self.config.hidden_size
        self.vocab_size = self.lm_head.weight.shape[0]
        self.max_length = getattr(self.config, "max_position_embeddings", None) or 1 << 30
        self.dtype = self.lm_head.weight.dtype
        self.device = self.lm_head.weight.device
        self.image_token_id = getattr(model.config, "image_token_id", None) if self.vision is not None else None
        # Qwen3-VL: vision blocks whose features are added after decoder layers 0, 1, ... (DeepStack); 0 otherwise.
        visual = self.vision.visual if self.vision is not None else None
        self.num_deepstack = len(getattr(visual, "deepstack_visual_indexes", None) or ())

    @contextmanager
    def step(self, ctx: StepContext) -> Iterator[None]:
        """Within: the language model attends through the paged cache described by `ctx`."""
        global _STEP
        previous = self.config._attn_implementation
        self.config._attn_implementation = ATTN_IMPLEMENTATION
        _STEP = ctx
        try:
            yield
        finally:
            _STEP = None
            self.config._attn_implementation = previous

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(token_ids)

    def forward(self, ctx: StepContext, positions: torch.Tensor, *, input_ids=None, inputs_embeds=None,
                deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None):  # fmt: skip
        """Hidden states after the final norm, [T, H], of a packed batch. positions: [T], or [3, T] for M-RoPE.
        deepstack (Qwen3-VL, when the step computes image tokens): (image token mask [T], one [image tokens, H]
        tensor per DeepStack layer)."""
        position_ids = positions[:, None, :] if positions.dim() == 2 else positions[None, :]
        kwargs = {"input_ids": input_ids[None]} if input_ids is not None else {"inputs_embeds": inputs_embeds[None]}
        if deepstack is not None:
            kwargs.update(visual_pos_masks=deepstack[0][None], deepstack_visual_embeds=deepstack[1])
        with self.step(ctx):
            out = self.decoder(position_ids=position_ids, use_cache=False, **kwargs)
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [S, V] of hidden [S, H], accumulated in fp32 from the weights as they are. A bf16 lm_head
        would round every logit to bf16 (~3 significant digits) while the trainer's fused log-prob kernel
        accumulates in fp32: the two sides would then score different distributions."""
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if weight.dtype == torch.float32 or weight.dtype == torch.float64:
            return self.lm_head(hidden).float()
        if hidden.is_cuda:  # bf16/fp16 inputs, fp32 accumulation and output: no fp32 copy of the weight
            out = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        else:  # CPU has no mixed-dtype mm: upcast (bf16 -> fp32 is exact)
            out = hidden.float() @ weight.float().t()
        return out if bias is None else out + bias.float()

    # --- Qwen2.5-VL -------------------------------------------------------------------------------------------

    def multimodal_prompt(self, index: int, input_ids: torch.Tensor, prompt: dict) -> MultimodalPrompt:
        """M-RoPE positions, image spans and pixel digests of one prompt dict (input_ids [L])."""
        name = f"prompts[{index}]"
        if self.vision is None:
            raise ValueError(f"{name} has pixel_values but the model ({type(self.model).__name__}) has no vision tower")
        grid = prompt.get("image_grid_thw")
        if grid is None:
            raise ValueError(f"{name}: pixel_values given without image_grid_thw")
        grid = torch.as_tensor(grid, dtype=torch.long).reshape(-1, 3)
        pixels = torch.as_tensor(prompt["pixel_values"])
        rows = grid.prod(-1)
        if pixels.dim() != 2 or pixels.shape[0] != int(rows.sum()):
            raise ValueError(
                f"{name}: pixel_values must be [sum of t*h*w over images = {int(rows.sum())}, C], "
                f"got {tuple(pixels.shape)}"
            )
        merge = self.vision.visual.spatial_merge_size
        counts = (rows // merge**2).tolist()
        is_image = input_ids == self.image_token_id
        starts = _runs(is_image)
        if [e - s for s, e in starts] != counts:
            raise ValueError(
                f"{name}: the <|image_pad|> runs in input_ids have lengths {[e - s for s, e in starts]}, but "
                f"image_grid_thw implies {counts} (t*h*w / spatial_merge_size**2 per image)"
            )
        type_ids = prompt.get("mm_token_type_ids")
        if type_ids is None:  # without it Qwen2.5-VL silently falls back to 1-D positions (docs/sampler.md)
            type_ids = is_image.int()
        type_ids = torch.as_tensor(type_ids).reshape(1, -1).to(self.device)
        positions, delta = self.vision.get_rope_index(
            input_ids[None].to(self.device), type_ids, grid.to(self.device), None
        )
        offsets = [0, *rows.cumsum(0).tolist()]
        spans = []
        for i, (s, e) in enumerate(starts):
            digest = hashlib.blake2b(digest_size=16)
            digest.update(pixels[offsets[i] : offsets[i + 1]].detach().float().cpu().contiguous().numpy().tobytes())
            digest.update(grid[i].numpy().tobytes())
            spans.append(ImageSpan(s, e, digest.digest()))
        return MultimodalPrompt(pixels, grid, positions[:, 0].cpu(), int(delta.reshape(-1)[0]), spans)

    def image_embeds(self, mm: MultimodalPrompt, image: int) -> torch.Tensor:
        """The vision tower's output for one image of `mm`, [tokens, H] (computed once, then kept on `mm`, with
        Qwen3-VL's DeepStack features of the image, [num_deepstack, tokens, H], in mm.deepstack_embeds)."""
        if image not in mm.image_embeds:
            rows = mm.image_grid_thw.prod(-1)
            start = int(rows[:image].sum())
            pixels = mm.pixel_values[start : start + int(rows[image])].to(self.device)
            grid = mm.image_grid_thw[image : image + 1].to(self.device)
            out = self.vision.get_image_features(pixels, grid)
            mm.image_embeds[image] = out.pooler_output[0].to(self.dtype)
            if self.num_deepstack:
                mm.deepstack_embeds[image] = torch.stack([f[0] for f in out.deepstack_features]).to(self.dtype)
        return mm.image_embeds[image]


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool tensor."""
    m = mask.to(torch.int8)
    padded = torch.cat([m.new_zeros(1), m, m.new_zeros(1)])
    edges = (padded[1:] - padded[:-1]).nonzero().squeeze(1).tolist()
    return list(zip(edges[0::2], edges[1::2], strict=True))
