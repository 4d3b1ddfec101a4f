"""Triton kernel of `mcq_rewards`: score reader prompts on their option letters and reduce to one reward per caption.

Contract (caprl_core/backends.py): `mcq_rewards(hidden[P, H], weight[V, H], bias[V] | None, option_ids[P, K] i64,
answers[P] i64, num_options[P] i64, prompt_order[P] i64, caption_offsets[C + 1] i64, temperature, mode)
-> (rewards[C], option_logprobs[P, K])`; caprl_core.reference.mcq_rewards is the definition.

Design: one program per caption walks its prompts (`prompt_order[caption_offsets[c]:caption_offsets[c + 1]]`) in
order and keeps the running score in a register, so the per-caption mean needs no atomics and is deterministic.
Per prompt it gathers only the valid option rows of the lm_head (K x H reads instead of V x H: with V = 151,936 and
K = 5 that is 30,000x less), projects the hidden state onto them BLOCK_H columns at a time with fp32 (fp64)
accumulation, and takes the log-softmax over the valid slots. Cost per caption: prompts x (K + 1) x H loads and
multiply-adds; the option rows are shared by every prompt, so after the first programs they come from L2.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _option_logits(
    Hidden_ptr, Weight_ptr, Weight_row_stride, Bias_ptr, ids, valid, H,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """hidden[p] . weight[ids[k]] + bias[ids[k]] for the valid slots [BK]; Hidden_ptr points at row p."""
    weight_rows = ids.to(tl.int64) * Weight_row_stride  # [BK]; V x H overflows int32 for large heads
    logits = tl.zeros([BLOCK_K], ACC_DTYPE)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)  # [BH]; H need not be a multiple of BLOCK_H
        col_mask = cols < H
        x = tl.load(Hidden_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)  # [BH]
        w_mask = valid[:, None] & col_mask[None, :]  # unused slots are never read
        w = tl.load(Weight_ptr + weight_rows[:, None] + cols[None, :], mask=w_mask, other=0.0).to(ACC_DTYPE)
        logits += tl.sum(w * x[None, :], axis=1)  # [BK, BH] -> [BK]
    if HAS_BIAS:
        logits += tl.load(Bias_ptr + ids, mask=valid, other=0.0).to(ACC_DTYPE)
    return logits


@triton.jit
def _mcq_rewards_kernel(
    Hidden_ptr, Hidden_row_stride, Weight_ptr, Weight_row_stride, Bias_ptr,
    OptionIds_ptr, OptionIds_row_stride, Answers_ptr, NumOptions_ptr, PromptOrder_ptr, CaptionOffsets_ptr,
    Rewards_ptr, OptionLogprobs_ptr, OptionLogprobs_row_stride,
    H, K, temperature: tl.float64,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # temperature arrives as fp64 so that fp64 inputs see it exactly; tl.full casts it to the accumulation dtype.
    temperature = tl.full([], temperature, ACC_DTYPE)
    caption = tl.program_id(0).to(tl.int64)
    # Scalar loads without masks: the grid has C programs and offsets has C + 1 entries, all in [0, P].
    start = tl.load(CaptionOffsets_ptr + caption)
    end = tl.load(CaptionOffsets_ptr + caption + 1)
    slots = tl.arange(0, BLOCK_K)  # [BK]; K need not be a power of two
    slot_mask = slots < K
    total = tl.zeros([], ACC_DTYPE)
    for j in range(start, end):
        prompt = tl.load(PromptOrder_ptr + j)  # j in [0, P), and prompt_order holds a permutation of [0, P)
        num_options = tl.load(NumOptions_ptr + prompt)  # in [1, K], checked by ops
        answer = tl.load(Answers_ptr + prompt)  # in [0, num_options), checked by ops
        valid = slots < num_options
        # [BK] option token ids, in [0, V) (checked by ops); unused slots are not read.
        ids = tl.load(OptionIds_ptr + prompt * OptionIds_row_stride + slots, mask=valid, other=0)
        logits = _option_logits(
            Hidden_ptr + prompt * Hidden_row_stride, Weight_ptr, Weight_row_stride, Bias_ptr, ids, valid, H,
            HAS_BIAS, ACC_DTYPE, BLOCK_K, BLOCK_H,
        )  # fmt: skip
        logits = tl.where(valid, logits, float("-inf"))
        z = logits / temperature
        shifted = z - tl.max(z, axis=0)  # the answer's slot is valid, so the max is finite
        logp = shifted - tl.log(tl.sum(tl.exp(shifted), axis=0))  # as torch.log_softmax; exp(-inf) = 0 off-slot
        tl.store(OptionLogprobs_ptr + prompt * OptionLogprobs_row_stride + slots, logp, mask=slot_mask)
        is_answer = slots == answer
        if MODE == "hard":  # raw logits: T > 0 keeps the order, and dividing could merge two close logits
            answer_logit = tl.max(tl.where(is_answer, logits, float("-inf")), axis=0)
            best_other = tl.max(tl.where(valid & ~is_answer, logits, float("-inf")), axis=0)
            total += (answer_logit > best_other).to(ACC_DTYPE)  # strict: a tie is wrong
        else:
            total += tl.exp(tl.max(tl.where(is_answer, logp, float("-inf")), axis=0))
    tl.store(Rewards_ptr + caption, total / (end - start))  # ops guarantees every caption has a prompt


def mcq_rewards(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    option_ids: torch.Tensor,
    answers: torch.Tensor,
    num_options: torch.Tensor,
    prompt_order: torch.Tensor,
    caption_offsets: torch.Tensor,
    temperature: float,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [P, H] (unit last-dim stride, any row stride), weight [V, H] (unit last-dim stride), bias [V] or None,
    option_ids [P, K] (unit last-dim stride), answers [P], num_options [P], prompt_order [P], caption_offsets [C + 1]
    (int64, contiguous)
    -> (rewards [C], option_logprobs [P, K]), fp32 (fp64 for fp64 hidden). One launch of C programs."""
    num_prompts, hidden_size = hidden.shape
    num_slots = option_ids.shape[1]
    num_captions = caption_offsets.shape[0] - 1
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rewards = torch.empty(num_captions, dtype=acc, device=hidden.device)
    option_logprobs = torch.empty(num_prompts, num_slots, dtype=acc, device=hidden.device)
    block_k = triton.next_power_of_2(num_slots)
    # A [BLOCK_K, BLOCK_H] weight tile of <= 4096 elements (32 per thread with 4 warps), at least 32 columns wide.
    block_h = min(triton.next_power_of_2(hidden_size), max(32, 4096 // block_k))
    _mcq_rewards_kernel[(num_captions,)](
        hidden, hidden.stride(0), weight, weight.stride(0), weight if bias is None else bias,  # bias unused if None
        option_ids, option_ids.stride(0), answers, num_options, prompt_order, caption_offsets,
        rewards, option_logprobs, option_logprobs.stride(0),
        hidden_size, num_slots, float(temperature),
        MODE=mode, HAS_BIAS=bias is not None, ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_K=block_k, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return rewards, option_logprobs
