// CUDA kernel of group_advantages: group-relative advantages of N samples with R reward components, one launch.
// Definition: caprl_core/reference.py::group_advantages; launcher declared in csrc/cuda/launchers.h. No torch here.
//
// Design: ONE block of 1024 threads does everything, looping over the R columns and, inside a column, over the N
// samples in a block-stride loop (so any N works). Per column, three passes:
//   1. per group: count, sum, min, max (atomics into per-group state); per column: the batch sum (block reduction)
//   2. per group: sum of squared deviations from the group mean (two-pass variance, as the reference)
//   3. per sample: adv[i] += weights[c] * normalised advantage (each thread owns the same samples in every column,
//      so the sum over columns needs no atomics and is computed in a fixed order)
// Why one block: at RL batch sizes (N ~ 10^3-10^4) the op is latency-bound, and one block keeps every step of it
// (group stats, batch std, the weighted sum over columns) behind __syncthreads instead of a grid-wide sync or a
// second launch. Cost grows linearly: ~N/1024 iterations per pass, roughly 1 ms for N = 10^6 on one SM.
//
// Size limits: the per-group state takes 40 bytes per group. While 40 * G fits in the block's opt-in shared memory
// (227 KiB on H100/H200: about 5,700 groups) it lives there; beyond that it lives in a caller-provided global
// workspace (group_advantages_workspace_bytes says how much), with L1-bypassing loads. N, R and G are otherwise
// unlimited (64-bit indexing). A group id outside [0, G) is never dereferenced: its sample's advantage is NaN.
//
// Determinism: group sums use double atomics, whose order varies; fp64 results can differ in the last bit between
// runs, fp32 results practically never (a double sum rounded to float). min/max (the zero-variance test) and the
// batch statistics (fixed-shape block reductions) are exact/deterministic.
#include <algorithm>
#include <cmath>

#include "launchers.h"

namespace caprl::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr size_t kBytesPerGroup = 5 * sizeof(double);
constexpr size_t kDefaultShared = 48 * 1024;  // shared memory per block allowed without opting in
constexpr size_t kStaticShared = kWarps * sizeof(double) + 1024;  // scratch, plus a margin for the compiler's own

// Per-group statistics of the current column, [G] each, 8-byte aligned.
struct GroupState {
  unsigned long long* count;  // samples per group (filled on column 0, reused by the others)
  double* sum;
  double* sq;                 // sum of (r - group mean)^2
  long long* lo;              // min and max, as order-preserving integers: CUDA has no double atomicMin/Max
  long long* hi;
};

__device__ GroupState carve(void* base, int64_t num_groups) {
  auto* p = static_cast<double*>(base);
  return {reinterpret_cast<unsigned long long*>(p), p + num_groups, p + 2 * num_groups,
          reinterpret_cast<long long*>(p + 3 * num_groups), reinterpret_cast<long long*>(p + 4 * num_groups)};
}

// Order-preserving map between doubles and int64 (negative doubles have their magnitude bits flipped), so that
// integer min/max is double min/max. -0.0 and +0.0 stay distinct keys but compare equal once decoded.
__device__ long long ordered_key(double x) {
  const long long bits = __double_as_longlong(x);
  return bits >= 0 ? bits : bits ^ 0x7fffffffffffffffLL;
}
__device__ double from_key(long long key) { return __longlong_as_double(key >= 0 ? key : key ^ 0x7fffffffffffffffLL); }

// Loads of state written by atomics: plain in shared memory, L1-bypassing (ld.global.cg) in the global workspace,
// where an L1 line cached in an earlier column could otherwise be stale.
template <bool kShared, typename U>
__device__ U load_state(const U* p) {
  if constexpr (kShared) return *p;
  else return __ldcg(p);
}

// Sum over the block, identical on every thread; the tree has a fixed shape, so the result is deterministic.
__device__ double block_sum(double v, double* scratch /* [kWarps] */) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

__device__ bool valid_group(int64_t g, int64_t num_groups) { return g >= 0 && g < num_groups; }

__device__ void reset_state(GroupState s, int64_t num_groups, bool with_count) {
  for (int64_t g = threadIdx.x; g < num_groups; g += blockDim.x) {
    if (with_count) s.count[g] = 0;
    s.sum[g] = 0;
    s.sq[g] = 0;
    s.lo[g] = ordered_key(INFINITY);
    s.hi[g] = ordered_key(-INFINITY);
  }
}

// Pass 1 over column c; returns this thread's share of the batch sum.
template <typename T>
__device__ double accumulate_sums(const GroupAdvantagesArgs<T>& a, GroupState s, int64_t c) {
  double local = 0;
  for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) {
    const double x = static_cast<double>(a.rewards[i * a.num_rewards + c]);
    const int64_t g = a.group_index[i];
    local += x;
    if (!valid_group(g, a.num_groups)) continue;
    if (c == 0) atomicAdd(&s.count[g], 1ULL);
    atomicAdd(&s.sum[g], x);
    atomicMin(&s.lo[g], ordered_key(x));
    atomicMax(&s.hi[g], ordered_key(x));
  }
  return local;
}

// Pass 2 over column c; returns this thread's share of the batch sum of squared deviations.
template <bool kShared, typename T>
__device__ double accumulate_squares(const GroupAdvantagesArgs<T>& a, GroupState s, int64_t c, double batch_mean) {
  double local = 0;
  for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) {
    const double x = static_cast<double>(a.rewards[i * a.num_rewards + c]);
    const int64_t g = a.group_index[i];
    local += (x - batch_mean) * (x - batch_mean);
    if (!valid_group(g, a.num_groups)) continue;
    const double d = x - load_state<kShared>(&s.sum[g]) / static_cast<double>(load_state<kShared>(&s.count[g]));
    atomicAdd(&s.sq[g], d * d);
  }
  return local;
}

// The normalised advantage of reward x in group g (valid, non-empty); exactly 0 for a flat group.
template <bool kShared, typename T>
__device__ double advantage(const GroupAdvantagesArgs<T>& a, GroupState s, int64_t g, double x, double batch_std) {
  if (from_key(load_state<kShared>(&s.lo[g])) == from_key(load_state<kShared>(&s.hi[g]))) return 0.0;
  const double count = static_cast<double>(load_state<kShared>(&s.count[g]));
  const double dof = fmax(count - 1.0, 1.0);  // unbiased, with the reference's clamp for groups of one
  double v = x - load_state<kShared>(&s.sum[g]) / count;
  if (a.rloo) v *= count / dof;  // r - mean of the others = n/(n-1) (r - mean)
  if (a.scale == AdvantageScale::kGroup) v /= sqrt(load_state<kShared>(&s.sq[g]) / dof) + a.eps;
  if (a.scale == AdvantageScale::kBatch) v /= batch_std + a.eps;
  return v;
}

// Pass 3 over column c: adv[i] += weights[c] * advantage, NaN for a sample with an invalid group id.
template <bool kShared, typename T>
__device__ void write_advantages(const GroupAdvantagesArgs<T>& a, GroupState s, int64_t c, double batch_std) {
  const double w = static_cast<double>(a.weights[c]);
  for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) {
    const int64_t g = a.group_index[i];
    if (!valid_group(g, a.num_groups)) {
      a.adv[i] = static_cast<T>(NAN);
      continue;
    }
    const double x = static_cast<double>(a.rewards[i * a.num_rewards + c]);
    const double prev = c == 0 ? 0.0 : static_cast<double>(a.adv[i]);
    a.adv[i] = static_cast<T>(prev + w * advantage<kShared>(a, s, g, x, batch_std));
  }
}

template <typename T, bool kShared>
__global__ void __launch_bounds__(kThreads) group_advantages_kernel(GroupAdvantagesArgs<T> a) {
  extern __shared__ double shared_state[];  // [5 G] when kShared
  __shared__ double scratch[kWarps];
  const GroupState s = carve(kShared ? static_cast<void*>(shared_state) : a.workspace, a.num_groups);
  for (int64_t c = 0; c < a.num_rewards; ++c) {
    reset_state(s, a.num_groups, c == 0);
    __syncthreads();
    const double batch_mean = block_sum(accumulate_sums(a, s, c), scratch) / static_cast<double>(a.n);
    const double batch_sq = block_sum(accumulate_squares<kShared>(a, s, c, batch_mean), scratch);
    const double batch_std = a.n > 1 ? sqrt(batch_sq / static_cast<double>(a.n - 1)) : 0.0;  // 0 for N == 1
    write_advantages<kShared>(a, s, c, batch_std);
    __syncthreads();  // the next column resets the state
  }
}

size_t state_bytes(int64_t num_groups) { return static_cast<size_t>(num_groups) * kBytesPerGroup; }

}  // namespace

size_t group_advantages_workspace_bytes(int64_t num_groups, int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) optin = 0;
  const size_t limit = std::max(static_cast<size_t>(optin), kDefaultShared) - kStaticShared;
  const size_t need = state_bytes(num_groups);
  return need <= limit ? 0 : need;
}

template <typename T>
cudaError_t launch_group_advantages(const GroupAdvantagesArgs<T>& a, cudaStream_t stream) {
  if (a.n < 1 || a.num_rewards < 1 || a.num_groups < 1) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const size_t need = state_bytes(a.num_groups);
  if (group_advantages_workspace_bytes(a.num_groups, device) == 0) {
    auto* kernel = group_advantages_kernel<T, true>;
    if (need + kStaticShared > kDefaultShared) {  // opt in to more than 48 KiB of shared memory
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(need));
      if (err != cudaSuccess) return err;
    }
    kernel<<<1, kThreads, need, stream>>>(a);
  } else {
    if (a.workspace == nullptr || a.workspace_bytes < need) return cudaErrorInvalidValue;
    group_advantages_kernel<T, false><<<1, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template cudaError_t launch_group_advantages<float>(const GroupAdvantagesArgs<float>&, cudaStream_t);
template cudaError_t launch_group_advantages<double>(const GroupAdvantagesArgs<double>&, cudaStream_t);

}  // namespace caprl::cuda
