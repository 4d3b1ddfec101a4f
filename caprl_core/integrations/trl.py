"""TRL's `GRPOTrainer` with its per-token log-probs (and entropies) from `caprl_core.ops.linear_token_logprobs`.

One line on a trainer you already built, or the subclass in its place:

    from caprl_core.integrations.trl import FusedLogprobGRPOTrainer, use_fused_logprobs

    trainer = use_fused_logprobs(trl.GRPOTrainer(model=..., reward_funcs=..., args=...))
    trainer = FusedLogprobGRPOTrainer(model=..., reward_funcs=..., args=...)   # the same, as a class

What changes: `_get_per_token_logps_and_entropies` (trl/trainer/grpo_trainer.py, TRL 1.16) runs the model's
backbone (`base_model`: for Qwen2.5-VL that includes the vision tower and its M-RoPE positions), keeps the hidden
states of the positions that predict the last `logits_to_keep` tokens (the completion), and hands them with the
lm_head weight to `linear_token_logprobs`. TRL's own path (`add_fused_lm_head`, trl/trainer/utils.py) does the same
through its chunked kernel; both return 0 on padded / masked completion positions (no gradient there), and both
scale the logits by 1 / `args.temperature`. Measured equal to TRL's log-probs, entropies, loss and gradients within
1e-5 on tiny fp32 Qwen2 and Qwen2.5-VL models (tests/test_trl_fused_logprobs.py).

Falls back to TRL's own method (its result, unchanged) when ours would not give the same numbers or does not handle
the inputs: the MoE load-balancing loss (`compute_aux_loss=True`: TRL's head returns it from router logits), models
with `final_logit_softcapping` or a logit scale (Gemma 2, Granite, ...), and vision inputs other than Qwen-VL's
`pixel_values` + `image_grid_thw` (tiles, `image_sizes`, `pixel_attention_mask`, ...). Not covered: calling the
backbone of the unwrapped model bypasses a DDP / DeepSpeed wrapper's forward and DeepSpeed ZeRO-3's lm_head gathering,
so multi-process runs are untested (FSDP2's per-module hooks should still fire, but no test says so).
"""

from __future__ import annotations

import functools
import warnings

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer

from caprl_core import ops

# Vision inputs of other VL families; with any of them set, TRL slices its own way: use TRL's method.
_OTHER_VISION_INPUTS = ("pixel_attention_mask", "spatial_shapes", "num_tiles", "image_sizes", "image_position_ids")
# Text-config attributes that rescale or cap the logits before the temperature; TRL's head applies them, ours does not.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")  # fmt: skip


class FusedLogprobsMixin:
    """Put before `GRPOTrainer` (or a subclass of it) in the bases: its `_get_per_token_logps_and_entropies` then uses
    `linear_token_logprobs` on the completion positions' hidden states. See the module docstring for the fallbacks."""

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, pixel_values=None, image_grid_thw=None, num_images=None, **other_inputs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """TRL's contract: (logps [B, K], entropies [B, K] or None, aux_loss None) for the last K = logits_to_keep
        tokens of input_ids [B, T], in chunks of batch_size sequences; 0 where attention_mask is 0."""
        reason = _fallback_reason(self.accelerator.unwrap_model(model), compute_aux_loss, pixel_values,
                                  image_grid_thw, other_inputs)  # fmt: skip
        if reason is not None:
            warnings.warn(f"caprl_core.integrations.trl: TRL's own log-prob path is used: {reason}", stacklevel=2)
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                pixel_values, image_grid_thw, num_images, **other_inputs,
            )  # fmt: skip
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            inputs = _chunk_inputs(start, end, input_ids, attention_mask, pixel_values, image_grid_thw, num_images,
                                   other_inputs)  # fmt: skip
            out = self._completion_logprobs(model, inputs, logits_to_keep, compute_entropy)
            logps.append(out[0] if compute_entropy else out)
            if compute_entropy:
                entropies.append(out[1])
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _completion_logprobs(
        self, model, inputs: dict, logits_to_keep: int, compute_entropy: bool
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """logp [b, K] (and entropy [b, K]) of one chunk's last K tokens, from the backbone's hidden states."""
        model = self.accelerator.unwrap_model(model)
        if is_peft_model(model):
            model = model.get_base_model()  # the LoRA layers stay in the backbone's modules
        with self.accelerator.autocast():
            hidden = _backbone(model)(**inputs, use_cache=False).last_hidden_state  # [b, T, H]
        hidden = hidden[:, -logits_to_keep - 1 : -1]  # [b, K, H]: position t predicts token t + 1
        mask = inputs["attention_mask"][:, -logits_to_keep:]  # [b, K]
        targets = inputs["input_ids"][:, -logits_to_keep:].masked_fill(mask == 0, -100)  # [b, K]
        head = model.get_output_embeddings()
        # Our op wants one dtype for hidden and weight (it accumulates in fp32 either way); under autocast the backbone
        # can return bf16 beside an fp32 weight, where TRL's head upcasts: promote. cast_lm_head_to_fp32: as TRL.
        dtype = torch.promote_types(hidden.dtype, head.weight.dtype)
        dtype = torch.float32 if self.args.cast_lm_head_to_fp32 else dtype
        bias = None if head.bias is None else head.bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            return ops.linear_token_logprobs(
                hidden.to(head.weight.device, dtype), head.weight.to(dtype), targets.to(head.weight.device),
                bias=bias, temperature=self.temperature, return_entropy=compute_entropy,
            )  # fmt: skip


class FusedLogprobGRPOTrainer(FusedLogprobsMixin, GRPOTrainer):
    """`trl.GRPOTrainer` whose per-token log-probs and entropies come from `caprl_core.ops.linear_token_logprobs`."""


def use_fused_logprobs(trainer: GRPOTrainer) -> GRPOTrainer:
    """Switch an existing `GRPOTrainer` (or subclass) instance to our log-probs, in place; returns it.

    The instance's class becomes a subclass of its own class with `FusedLogprobsMixin` in front: nothing in TRL or
    in other instances changes."""
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"trainer: expected a trl.GRPOTrainer, got {type(trainer).__name__}")
    if not isinstance(trainer, FusedLogprobsMixin):
        trainer.__class__ = _fused_class(type(trainer))
    return trainer


@functools.cache
def _fused_class(cls: type) -> type:
    return type(f"FusedLogprob{cls.__name__}", (FusedLogprobsMixin, cls), {"__module__": __name__})


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its lm_head: `model.model` for Qwen2 and Qwen2.5-VL (vision tower included) in
    transformers 4.57 and 5, else `base_model`, as TRL's `add_fused_lm_head` picks it."""
    backbone = getattr(model, "model", None)
    return backbone if isinstance(backbone, torch.nn.Module) else model.base_model


def _fallback_reason(model, compute_aux_loss: bool, pixel_values, image_grid_thw, other_inputs: dict) -> str | None:
    """Why TRL's own path must compute these log-probs, or None when ours gives the same numbers."""
    if compute_aux_loss:
        return "compute_aux_loss=True (the MoE load-balancing loss comes from TRL's head)"
    config = model.config.get_text_config()
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1.0)]
    if transforms:
        return f"the model's config rescales its logits ({', '.join(transforms)})"
    others = [name for name in _OTHER_VISION_INPUTS if other_inputs.get(name) is not None]
    if others or (pixel_values is not None and image_grid_thw is None):
        return f"vision inputs other than pixel_values + image_grid_thw ({', '.join(others) or 'no image_grid_thw'})"
    return None


def _chunk_inputs(start: int, end: int, input_ids, attention_mask, pixel_values, image_grid_thw, num_images,
                  other_inputs: dict) -> dict:  # fmt: skip
    """The backbone's inputs for sequences [start, end): as TRL's `_get_per_token_logps_and_entropies` slices them
    (trl/trainer/grpo_trainer.py), for text and Qwen-VL models only. pixel_values: [patches, C*t*p*p], image_grid_thw:
    [images, 3], num_images: images per sequence; an image's patches are the product of its grid."""
    inputs = {"input_ids": input_ids[start:end], "attention_mask": attention_mask[start:end]}
    if pixel_values is not None:
        first_image, end_image = sum(num_images[:start]), sum(num_images[:end])
        patches = image_grid_thw.prod(dim=-1)  # [images]
        first_patch, end_patch = int(patches[:first_image].sum()), int(patches[:end_image].sum())
        inputs["pixel_values"] = pixel_values[first_patch:end_patch]
        inputs["image_grid_thw"] = image_grid_thw[first_image:end_image]
    for name in ("token_type_ids", "mm_token_type_ids"):
        if other_inputs.get(name) is not None:
            inputs[name] = other_inputs[name][start:end]
    return inputs
