// Host launchers of the CUDA kernels: raw pointers, sizes and a stream, no torch types. The .cu files compile with
// plain nvcc (`make nvcc-check`, no torch headers); csrc/cuda/torch_ops.cpp is the only file that sees ATen: it
// checks tensors, allocates outputs and calls these. Every launcher returns the launch's cudaError_t.
//
// Index values (group ids, option ids, answers, prompt order, caption offsets) are validated by the Python layer
// (caprl_core/ops.py) before a launch, since checking them here would cost a host sync. The kernels still never
// read or write out of bounds: an out-of-range index turns the affected outputs into NaN (loud, never silently
// wrong) and is otherwise skipped.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace caprl::cuda {

// Accumulation and output type of every op: double for double inputs, float for float, bf16 and fp16.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// ---- group_advantages (csrc/cuda/group_advantages.cu) -------------------------------------------------------------

enum class AdvantageScale : int { kGroup = 0, kBatch = 1, kNone = 2 };

template <typename T>  // T = float or double: the rewards are already in their accumulation dtype
struct GroupAdvantagesArgs {
  const T* rewards;             // [N, R] contiguous
  const int64_t* group_index;   // [N], dense ids in [0, G)
  const T* weights;             // [R]
  T* adv;                       // [N] output
  int64_t n, num_rewards, num_groups;
  bool rloo;                    // method "rloo" (else "grpo")
  AdvantageScale scale;
  double eps;
  void* workspace;              // global scratch for the per-group statistics when they exceed shared memory
  size_t workspace_bytes;
};

// Bytes of global workspace the launch needs on `device`: 0 while the per-group statistics (40 bytes per group)
// fit in one block's shared memory (about 5,700 groups on H100/H200, 227 KiB), else 40 * G.
size_t group_advantages_workspace_bytes(int64_t num_groups, int device);

// One launch, one block: see the kernel's comment for the design and its limits.
template <typename T>
cudaError_t launch_group_advantages(const GroupAdvantagesArgs<T>& args, cudaStream_t stream);

// ---- mcq_rewards (csrc/cuda/mcq_rewards.cu) -----------------------------------------------------------------------

template <typename T>  // T = float, double, __nv_bfloat16 or __half
struct McqRewardsArgs {
  const T* hidden;                 // [P, H], row stride hidden_stride (elements), unit stride along H
  const T* weight;                 // [V, H], row stride weight_stride (elements), unit stride along H
  const T* bias;                   // [V] contiguous, or nullptr
  const int64_t* option_ids;       // [P, K] contiguous
  const int64_t* answers;          // [P]
  const int64_t* num_options;      // [P], in [1, K]
  const int64_t* prompt_order;     // [P]: caption c's prompts are prompt_order[caption_offsets[c]:caption_offsets[c+1]]
  const int64_t* caption_offsets;  // [C + 1]
  acc_t<T>* rewards;               // [C] output
  acc_t<T>* option_logprobs;       // [P, K] output
  int64_t P, H, V, K, C;
  int64_t hidden_stride, weight_stride;
  double temperature;
  bool soft;                       // mode "soft" (else "hard")
};

// One launch: one block per caption, one warp per prompt.
template <typename T>
cudaError_t launch_mcq_rewards(const McqRewardsArgs<T>& args, cudaStream_t stream);

// ---- mcq_rewards_vocab (csrc/cuda/mcq_rewards_vocab.cu) -----------------------------------------------------------
// The logits come in [rows, cols] tiles made by cuBLAS (torch_ops.cpp); these kernels fold each tile into running
// log-sum-exps (in double) over all columns and per slot, then turn them into log-masses, scores and caption means.

constexpr int64_t kMcqMaxVocabSlots = 16;  // caprl_core.ops.MCQ_MAX_VOCAB_SLOTS

template <typename A>  // A = float or double: the tile is already in the accumulation type
struct McqVocabFoldArgs {
  const A* logits;               // [rows, cols] contiguous: hidden[row0:row0 + rows] @ weight[v0:v0 + cols].T + bias
  const int64_t* token_options;  // [cols]: token_options[v0:v0 + cols], slot in [0, K) or -1
  double* all_state;             // [2, P]: running max of z = logits / T over the columns so far, sum of exp(z - max)
  double* slot_state;            // [2, P, K]: the same over the columns of each slot
  int64_t row0, rows, cols, P, K;
  double temperature;
};

// One launch per tile: one block per row (K <= kMcqMaxVocabSlots).
template <typename A>
cudaError_t launch_mcq_vocab_fold(const McqVocabFoldArgs<A>& args, cudaStream_t stream);

template <typename A>
struct McqVocabFinishArgs {
  const double* all_state;         // [2, P], as folded
  const double* slot_state;        // [2, P, K]
  const int64_t* answers;          // [P], in [0, K)
  const int64_t* prompt_order;     // [P]: caption c's prompts are prompt_order[caption_offsets[c]:caption_offsets[c+1]]
  const int64_t* caption_offsets;  // [C + 1]
  A* rewards;                      // [C] output
  A* option_logprobs;              // [P, K] output
  int64_t P, K, C;
  bool soft;                       // mode "soft" (else "hard")
};

// One thread per caption: log-masses of its prompts, their scores and the mean, in caption order.
template <typename A>
cudaError_t launch_mcq_vocab_finish(const McqVocabFinishArgs<A>& args, cudaStream_t stream);

}  // namespace caprl::cuda
