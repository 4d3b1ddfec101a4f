"""Triton kernels of `mcq_rewards`: score reader prompts on their options and reduce to one reward per caption.
normalize="options" is `mcq_rewards` (option letters only); normalize="vocab" is `mcq_rewards_vocab` (below).

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

from caprl_core import backends
from caprl_core.kernels.linear_token_logprobs import _config, _dtypes, _logits_tile, _num_splits


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


# ---- normalize="vocab" --------------------------------------------------------------------------------------------
# Contract: `mcq_rewards_vocab(hidden[P, H], weight[V, H], bias[V] | None, token_options[V] i64, answers[P] i64,
# prompt_order[P] i64, caption_offsets[C + 1] i64, num_slots, temperature, mode)
# -> (rewards[C], option_logprobs[P, K])`; caprl_core.reference.mcq_vocab_logprobs is the definition.
#
# Design: linear_token_logprobs' forward with K more running log-sum-exps. A grid of (prompt blocks, vocab splits);
# each program walks its vocab range tile by tile, z = (h @ W_tile^T + b) / T as a [BLOCK_N, BLOCK_V] tile (tl.dot
# over H, never [P, V] in memory), and folds it into a running (max, sum of exp) over all columns and one per slot,
# over the columns whose token_options is that slot (a static loop over the K <= 16 slots). The splits' partials are
# merged in the launcher ([num_splits, P, K + 1] numbers); a second small kernel scores each caption's prompts in
# order (deterministic means, no atomics). Cost: 2 P V H flops (the projection) + K exp per logit.


@triton.jit
def _fold_lse(m, s, z):
    """Folds tile z [BN, BV] (-inf where nothing counts) into the running max m [BN] and sum s [BN] of exp(z - m)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: shift by 0, not -inf - -inf = NaN
    s = s * tl.exp(m - m_shift) + tl.sum(tl.exp(z - m_shift[:, None]), axis=1)
    return m_new, s


@triton.jit
def _mcq_vocab_partials_kernel(
    Hidden_ptr, Hidden_row_stride, Weight_ptr, Weight_row_stride, Bias_ptr, TokenOptions_ptr,
    AllMax_ptr, AllSum_ptr, SlotMax_ptr, SlotSum_ptr, P, V, H, tiles_per_split, temperature: tl.float64,
    NUM_SLOTS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Partial statistics of prompt block program_id(0) over vocab split program_id(1): all-column max and sum
    [num_splits, P], per-slot max and sum [num_splits, P, NUM_SLOTS]."""
    temperature = (tl.zeros((), tl.float64) + temperature).to(ACC_DTYPE)  # fp64 exactly for fp64 inputs
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    row_mask = rows < P
    slots = tl.arange(0, BLOCK_K)
    m = tl.full((BLOCK_N,), float("-inf"), ACC_DTYPE)
    s = tl.zeros((BLOCK_N,), ACC_DTYPE)
    slot_m = tl.full((BLOCK_N, BLOCK_K), float("-inf"), ACC_DTYPE)
    slot_s = tl.zeros((BLOCK_N, BLOCK_K), ACC_DTYPE)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(
            Hidden_ptr, Hidden_row_stride, Weight_ptr, Weight_row_stride, Bias_ptr, rows, cols, P, V, H, temperature,
            ACC_DTYPE, DOT_DTYPE, DOT_PRECISION, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # [BLOCK_N, BLOCK_V]  # fmt: skip
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m, s = _fold_lse(m, s, z)
        option = tl.load(TokenOptions_ptr + cols, mask=col_mask, other=-1)  # [BV] slot of each column, or -1
        for k in tl.static_range(NUM_SLOTS):
            is_k = slots[None, :] == k  # [1, BK]: column k of the slot state
            mk, sk = _fold_lse(
                tl.max(tl.where(is_k, slot_m, float("-inf")), axis=1), tl.sum(tl.where(is_k, slot_s, 0.0), axis=1),
                tl.where((option == k)[None, :], z, float("-inf")),
            )  # fmt: skip
            slot_m = tl.where(is_k, mk[:, None], slot_m)
            slot_s = tl.where(is_k, sk[:, None], slot_s)
    out = split * P + rows
    tl.store(AllMax_ptr + out, m, mask=row_mask)
    tl.store(AllSum_ptr + out, s, mask=row_mask)
    slot_out = out[:, None] * NUM_SLOTS + slots[None, :]
    slot_mask = row_mask[:, None] & (slots < NUM_SLOTS)[None, :]
    tl.store(SlotMax_ptr + slot_out, slot_m, mask=slot_mask)
    tl.store(SlotSum_ptr + slot_out, slot_s, mask=slot_mask)


@triton.jit
def _mcq_caption_scores_kernel(
    OptionLogprobs_ptr, Answers_ptr, PromptOrder_ptr, CaptionOffsets_ptr, Rewards_ptr, K,
    MODE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """rewards[c] = mean score of caption c's prompts, summed in caption order. Hard: the answer slot's log-prob
    strictly above every other slot's; soft: exp of the answer slot's log-prob."""
    caption = tl.program_id(0).to(tl.int64)
    start = tl.load(CaptionOffsets_ptr + caption)  # C programs, C + 1 offsets, all in [0, P]
    end = tl.load(CaptionOffsets_ptr + caption + 1)
    slots = tl.arange(0, BLOCK_K)
    total = tl.zeros([], ACC_DTYPE)
    for j in range(start, end):
        prompt = tl.load(PromptOrder_ptr + j)  # a permutation of [0, P)
        answer = tl.load(Answers_ptr + prompt)  # in [0, K), checked by ops
        logp = tl.load(OptionLogprobs_ptr + prompt * K + slots, mask=slots < K, other=float("-inf"))
        answer_logp = tl.max(tl.where(slots == answer, logp, float("-inf")), axis=0)
        if MODE == "hard":
            best_other = tl.max(tl.where(slots == answer, float("-inf"), logp), axis=0)
            total += (answer_logp > best_other).to(ACC_DTYPE)  # strict: a tie (or two empty slots) is wrong
        else:
            total += tl.exp(answer_logp)
    tl.store(Rewards_ptr + caption, total / (end - start))


def _merge_splits(split_max: torch.Tensor, split_sum: torch.Tensor) -> torch.Tensor:
    """logsumexp from per-split (max, sum of exp(z - max)) [num_splits, ...] -> [...]; -inf where nothing counted."""
    top = split_max.amax(0)
    shift = torch.where(torch.isneginf(top), 0.0, top)  # an empty slot: exp(-inf - 0) = 0, not NaN
    return shift + torch.log((split_sum * torch.exp(split_max - shift)).sum(0))


def _vocab_config(dtype: torch.dtype, vocab: int, hidden_size: int, block_k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages): linear_token_logprobs' forward config, except for fp16/bf16
    on a GPU, where the K running (max, sum) pairs per row ([BLOCK_N, BLOCK_K] each) and the per-slot masked copies
    of the tile compete for registers. ptxas for sm_90 (Triton 3.9, 8 warps, 3 stages): its 128 x 128 tile spills
    0.5 KB per thread at K = 5 and 10 KB at K = 16; 64 x 128 spills nothing up to K = 8, 64 x 64 nothing at K = 16.
    Not timed on a GPU yet. (fp32 64 x 64 spills 20 bytes at K = 16; fp64 32 x 32 spills at K >= 8: kept, rare.)"""
    config = _config("fwd", dtype, vocab, hidden_size)
    if backends.triton_interpreter() or dtype not in (torch.float16, torch.bfloat16):
        return config
    return 64, 128 if block_k <= 8 else 64, config[2], 8, 3


def mcq_rewards_vocab(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_options: torch.Tensor,
    answers: torch.Tensor,
    prompt_order: torch.Tensor,
    caption_offsets: torch.Tensor,
    num_slots: int,
    temperature: float,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [P, H], weight [V, H] (unit stride along H), bias [V] or None, token_options [V] (int64, values in
    [-1, K)), answers [P], prompt_order [P], caption_offsets [C + 1] (int64, contiguous), K = num_slots <= 16
    -> (rewards [C], option_logprobs [P, K]), fp32 (fp64 for fp64 hidden). Two launches."""
    num_prompts, hidden_size = hidden.shape
    vocab = weight.shape[0]
    num_captions = caption_offsets.shape[0] - 1
    torch_acc, tl_acc, dot_dtype, dot_precision = _dtypes(hidden.dtype)
    block_k = triton.next_power_of_2(num_slots)
    block_n, block_v, block_h, num_warps, num_stages = _vocab_config(hidden.dtype, vocab, hidden_size, block_k)
    num_splits, tiles_per_split = _num_splits(
        triton.cdiv(num_prompts, block_n), triton.cdiv(vocab, block_v), hidden.device
    )
    all_stats = torch.empty((2, num_splits, num_prompts), dtype=torch_acc, device=hidden.device)  # max, sum
    slot_stats = torch.empty((2, num_splits, num_prompts, num_slots), dtype=torch_acc, device=hidden.device)
    _mcq_vocab_partials_kernel[(triton.cdiv(num_prompts, block_n), num_splits)](
        hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight, token_options,
        all_stats[0], all_stats[1], slot_stats[0], slot_stats[1], num_prompts, vocab, hidden_size, tiles_per_split,
        temperature, NUM_SLOTS=num_slots, ACC_DTYPE=tl_acc, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    lse_all = _merge_splits(all_stats[0], all_stats[1])  # [P]
    option_logprobs = (_merge_splits(slot_stats[0], slot_stats[1]) - lse_all[:, None]).contiguous()  # [P, K]
    rewards = torch.empty(num_captions, dtype=torch_acc, device=hidden.device)
    _mcq_caption_scores_kernel[(num_captions,)](
        option_logprobs, answers, prompt_order, caption_offsets, rewards, num_slots,
        MODE=mode, ACC_DTYPE=tl_acc, BLOCK_K=block_k, num_warps=1,
    )  # fmt: skip
    return rewards, option_logprobs
