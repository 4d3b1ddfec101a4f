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

}  // namespace caprl::cuda
