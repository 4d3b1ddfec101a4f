// CUDA kernel of mcq_rewards: score reader prompts on their option letters and reduce per caption, one launch.
// Definition: caprl_core/reference.py::mcq_rewards; launcher declared in csrc/cuda/launchers.h. No torch here.
//
// Design: one block (8 warps) per caption, one warp per prompt. A warp computes the prompt's option logits as
// warp-wide dot products over H (16-byte vector loads when rows are aligned), reading only the K option rows of
// the lm_head weight: K x H work per prompt instead of V x H. Lane 0 then takes the log-softmax over the valid
// options (K is small) and the score. The block sums its caption's scores in caption order (thread 0, through
// shared memory), so rewards are deterministic. Any P, H, K, C (64-bit indexing; a grid-stride loop over
// captions); parallelism is C blocks, so a batch with very few captions leaves SMs idle.
#include <cmath>
#include <cstdint>

#include "launchers.h"

namespace caprl::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

template <typename T>
__device__ acc_t<T> widen(T x) {
  return static_cast<acc_t<T>>(x);
}
template <>
__device__ float widen(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ float widen(__half x) {
  return __half2float(x);
}

// Dot product of two 16-byte packets (4 floats, 2 doubles, 8 bf16 or 8 fp16).
template <typename T>
__device__ acc_t<T> packet_dot(const int4& x, const int4& y) {
  constexpr int kElems = sizeof(int4) / sizeof(T);
  const T* xs = reinterpret_cast<const T*>(&x);
  const T* ys = reinterpret_cast<const T*>(&y);
  acc_t<T> s = 0;
#pragma unroll
  for (int e = 0; e < kElems; ++e) s += widen(xs[e]) * widen(ys[e]);
  return s;
}

template <typename U>
__device__ U warp_sum(U v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// a . b over n elements, identical on every lane. kVec: both rows start 16-byte aligned (checked at launch).
template <typename T, bool kVec>
__device__ acc_t<T> warp_dot(const T* a, const T* b, int64_t n, int lane) {
  acc_t<T> s = 0;
  int64_t tail = 0;
  if constexpr (kVec) {
    constexpr int64_t kElems = sizeof(int4) / sizeof(T);
    const int4* a4 = reinterpret_cast<const int4*>(a);
    const int4* b4 = reinterpret_cast<const int4*>(b);
    const int64_t packets = n / kElems;
    for (int64_t v = lane; v < packets; v += 32) s += packet_dot<T>(a4[v], b4[v]);
    tail = packets * kElems;
  }
  for (int64_t j = tail + lane; j < n; j += 32) s += widen(a[j]) * widen(b[j]);
  return warp_sum(s);
}

// Lane 0: turns the raw logits in row[0, n_opt) into log-probs of logits / T, -inf beyond; returns the score.
// The softmax runs in double: K is tiny, and double math is untouched by the build's --use_fast_math (which would
// swap fp32 exp/log/division for approximations).
template <typename T>
__device__ acc_t<T> finish_prompt(const McqRewardsArgs<T>& a, acc_t<T>* row, int64_t n_opt, int64_t answer) {
  using A = acc_t<T>;
  bool strict_best = true;  // hard: compare raw logits (before T); ties lose; NaN fails, as in the reference
  for (int64_t k = 0; k < n_opt; ++k)
    if (k != answer && !(row[answer] > row[k])) strict_best = false;
  double zmax = -INFINITY;
  for (int64_t k = 0; k < n_opt; ++k) zmax = fmax(zmax, static_cast<double>(row[k]) / a.temperature);
  double sum = 0;
  for (int64_t k = 0; k < n_opt; ++k) sum += exp(static_cast<double>(row[k]) / a.temperature - zmax);
  const double lse = zmax + log(sum);
  const double answer_logprob = static_cast<double>(row[answer]) / a.temperature - lse;
  for (int64_t k = 0; k < n_opt; ++k) row[k] = static_cast<A>(static_cast<double>(row[k]) / a.temperature - lse);
  for (int64_t k = n_opt; k < a.K; ++k) row[k] = -INFINITY;
  return a.soft ? static_cast<A>(exp(answer_logprob)) : A(strict_best ? 1 : 0);
}

// One warp scores prompt p; the score is valid on lane 0. Out-of-range values give NaN, never an OOB access.
template <typename T, bool kVec>
__device__ acc_t<T> score_prompt(const McqRewardsArgs<T>& a, int64_t p, int lane) {
  using A = acc_t<T>;
  if (p < 0 || p >= a.P) return NAN;
  A* row = a.option_logprobs + p * a.K;  // [K]
  const int64_t n_opt = a.num_options[p], answer = a.answers[p];
  if (n_opt < 1 || n_opt > a.K || answer < 0 || answer >= n_opt) {
    for (int64_t k = lane; k < a.K; k += 32) row[k] = NAN;
    return NAN;
  }
  const T* h = a.hidden + p * a.hidden_stride;
  for (int64_t k = 0; k < n_opt; ++k) {
    const int64_t id = a.option_ids[p * a.K + k];
    A logit = NAN;
    if (id >= 0 && id < a.V) {
      logit = warp_dot<T, kVec>(h, a.weight + id * a.weight_stride, a.H, lane);
      if (a.bias != nullptr) logit += widen(a.bias[id]);
    }
    if (lane == 0) row[k] = logit;  // raw logit; lane 0 rewrites it as a log-prob below
  }
  return lane == 0 ? finish_prompt(a, row, n_opt, answer) : A(0);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) mcq_rewards_kernel(McqRewardsArgs<T> a) {
  using A = acc_t<T>;
  __shared__ A scores[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t c = blockIdx.x; c < a.C; c += gridDim.x) {
    const int64_t begin = a.caption_offsets[c], end = a.caption_offsets[c + 1];
    const bool valid = begin >= 0 && begin < end && end <= a.P;  // the same on every thread: barriers are safe
    double total = 0;  // thread 0: the caption's sum of scores, in caption order
    for (int64_t base = begin; valid && base < end; base += kWarps) {
      const int64_t j = base + warp;
      const A score = j < end ? score_prompt<T, kVec>(a, a.prompt_order[j], lane) : A(0);
      if (lane == 0) scores[warp] = score;
      __syncthreads();
      if (threadIdx.x == 0)
        for (int w = 0; w < kWarps && base + w < end; ++w) total += static_cast<double>(scores[w]);
      __syncthreads();
    }
    if (threadIdx.x == 0) a.rewards[c] = valid ? static_cast<A>(total / static_cast<double>(end - begin)) : A(NAN);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

template <typename T>
cudaError_t launch_mcq_rewards(const McqRewardsArgs<T>& a, cudaStream_t stream) {
  if (a.P < 1 || a.H < 0 || a.V < 1 || a.K < 1 || a.C < 1 || !(a.temperature > 0)) return cudaErrorInvalidValue;
  // Vector loads need every hidden and weight row to start on a 16-byte boundary.
  const bool vec = aligned16(a.hidden) && aligned16(a.weight) && (a.hidden_stride * sizeof(T)) % 16 == 0 &&
                   (a.weight_stride * sizeof(T)) % 16 == 0;
  const unsigned grid = static_cast<unsigned>(a.C < (1LL << 30) ? a.C : (1LL << 30));
  if (vec) mcq_rewards_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
  else mcq_rewards_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template cudaError_t launch_mcq_rewards<float>(const McqRewardsArgs<float>&, cudaStream_t);
template cudaError_t launch_mcq_rewards<double>(const McqRewardsArgs<double>&, cudaStream_t);
template cudaError_t launch_mcq_rewards<__nv_bfloat16>(const McqRewardsArgs<__nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_mcq_rewards<__half>(const McqRewardsArgs<__half>&, cudaStream_t);

}  // namespace caprl::cuda
