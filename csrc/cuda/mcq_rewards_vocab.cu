// CUDA kernels of mcq_rewards with normalize="vocab" (backend op mcq_rewards_vocab): the fold and finish steps.
// Definition: caprl_core/reference.py::mcq_vocab_logprobs; launchers declared in csrc/cuda/launchers.h. No torch here.
//
// Design: csrc/cuda/torch_ops.cpp walks the vocabulary in column tiles, each [P, cols] tile of logits made by cuBLAS
// (at::mm in the accumulation dtype: exact products for bf16/fp16 inputs, as the reference), and calls
//   fold:   one block per row; each thread keeps an online (max, sum of exp) in double over its columns for all
//           columns and for each slot (K <= 16, in local memory), then the block merges them (warp shuffles, then
//           shared memory) into the row's running state. One block owns a row: no atomics.
//   finish: one thread per caption: log-mass of each slot (lse_k - lse_all) for its prompts, hard/soft scores and
//           the caption's mean, in caption order (deterministic).
// All the softmax arithmetic is double: untouched by --use_fast_math, and cheap beside the projection (P x V exps
// against 2 P V H flops). Out-of-range slot values make the row NaN instead of reading out of bounds.
#include <cmath>
#include <cstdint>

#include "launchers.h"

namespace caprl::cuda {
namespace {

constexpr int kFoldWarps = 8;
constexpr int kFoldThreads = kFoldWarps * 32;
constexpr int kStates = kMcqMaxVocabSlots + 1;  // [0]: all columns; [1 + k]: slot k

struct Lse {
  double m;  // running max (-inf while empty)
  double s;  // sum of exp(z - m)
};

__device__ inline void add(Lse& a, double z) {
  if (z > a.m) {
    a.s = a.s * exp(a.m - z) + 1.0;  // exp(-inf) = 0 while empty
    a.m = z;
  } else if (z > -INFINITY) {
    a.s += exp(z - a.m);
  } else if (z != z) {
    a.s = NAN;  // a NaN logit gives NaN, as in the reference
  }
}

__device__ inline Lse merge(Lse a, Lse b) {
  const double m = fmax(a.m, b.m);
  if (m == -INFINITY) return {m, a.s + b.s};  // both empty (0), or NaN
  return {m, a.s * exp(a.m - m) + b.s * exp(b.m - m)};
}

template <typename A>
__global__ void __launch_bounds__(kFoldThreads) mcq_vocab_fold_kernel(McqVocabFoldArgs<A> a) {
  __shared__ double warp_m[kFoldWarps][kStates], warp_s[kFoldWarps][kStates];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const A* z = a.logits + r * a.cols;
    Lse st[kStates];
    for (int i = 0; i < kStates; ++i) st[i] = {-INFINITY, 0.0};
    for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
      const double zj = static_cast<double>(z[j]) / a.temperature;
      add(st[0], zj);
      const int64_t k = a.token_options[j];
      if (k >= 0 && k < a.K) {
        add(st[1 + k], zj);
      } else if (k != -1) {
        st[0].s = NAN;  // not a slot: validated by ops, never an out-of-bounds write
      }
    }
    for (int i = 0; i <= a.K; ++i) {
      Lse v = st[i];
      for (int offset = 16; offset > 0; offset >>= 1)
        v = merge(v, {__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)});
      if (lane == 0) {
        warp_m[warp][i] = v.m;
        warp_s[warp][i] = v.s;
      }
    }
    __syncthreads();
    if (threadIdx.x <= a.K) {  // thread i merges state i over the warps and into the row's running state
      const int i = threadIdx.x;
      const int64_t p = a.row0 + r;
      double* m_ptr = i == 0 ? a.all_state + p : a.slot_state + p * a.K + (i - 1);
      double* s_ptr = i == 0 ? a.all_state + a.P + p : a.slot_state + a.P * a.K + p * a.K + (i - 1);
      Lse v{*m_ptr, *s_ptr};
      for (int w = 0; w < kFoldWarps; ++w) v = merge(v, {warp_m[w][i], warp_s[w][i]});
      *m_ptr = v.m;
      *s_ptr = v.s;
    }
    __syncthreads();  // warp_m / warp_s are reused by the next row
  }
}

template <typename A>
__global__ void mcq_vocab_finish_kernel(McqVocabFinishArgs<A> a) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < a.C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t begin = a.caption_offsets[c], end = a.caption_offsets[c + 1];
    if (!(begin >= 0 && begin < end && end <= a.P)) {
      a.rewards[c] = NAN;
      continue;
    }
    double total = 0;  // in caption order
    for (int64_t j = begin; j < end; ++j) {
      const int64_t p = a.prompt_order[j], answer = p >= 0 && p < a.P ? a.answers[p] : -1;
      if (answer < 0 || answer >= a.K) {
        total = NAN;
        continue;
      }
      const double lse_all = a.all_state[p] + log(a.all_state[a.P + p]);
      const double* slot_m = a.slot_state + p * a.K;
      const double* slot_s = a.slot_state + a.P * a.K + p * a.K;
      const double answer_lse = slot_m[answer] + log(slot_s[answer]);  // -inf for a slot with no tokens
      bool strict_best = true;  // ties lose; an empty answer slot never wins
      for (int64_t k = 0; k < a.K; ++k) {
        const double lse_k = slot_m[k] + log(slot_s[k]);
        a.option_logprobs[p * a.K + k] = static_cast<A>(lse_k - lse_all);
        if (k != answer && !(answer_lse > lse_k)) strict_best = false;
      }
      total += a.soft ? exp(answer_lse - lse_all) : (strict_best ? 1.0 : 0.0);
    }
    a.rewards[c] = static_cast<A>(total / static_cast<double>(end - begin));
  }
}

}  // namespace

template <typename A>
cudaError_t launch_mcq_vocab_fold(const McqVocabFoldArgs<A>& a, cudaStream_t stream) {
  if (a.rows < 1 || a.cols < 1 || a.K < 1 || a.K > kMcqMaxVocabSlots || a.row0 < 0 || a.row0 + a.rows > a.P ||
      !(a.temperature > 0))
    return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(a.rows < (1LL << 30) ? a.rows : (1LL << 30));
  mcq_vocab_fold_kernel<A><<<grid, kFoldThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename A>
cudaError_t launch_mcq_vocab_finish(const McqVocabFinishArgs<A>& a, cudaStream_t stream) {
  if (a.P < 1 || a.K < 1 || a.C < 1) return cudaErrorInvalidValue;
  constexpr int kThreads = 128;
  const int64_t blocks = (a.C + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < (1LL << 30) ? blocks : (1LL << 30));
  mcq_vocab_finish_kernel<A><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template cudaError_t launch_mcq_vocab_fold<float>(const McqVocabFoldArgs<float>&, cudaStream_t);
template cudaError_t launch_mcq_vocab_fold<double>(const McqVocabFoldArgs<double>&, cudaStream_t);
template cudaError_t launch_mcq_vocab_finish<float>(const McqVocabFinishArgs<float>&, cudaStream_t);
template cudaError_t launch_mcq_vocab_finish<double>(const McqVocabFinishArgs<double>&, cudaStream_t);

}  // namespace caprl::cuda
