// C++/OpenMP kernel of mcq_rewards: score reader prompts on their option letters and reduce per caption.
// Definition: caprl_core/reference.py::mcq_rewards; backend contract: caprl_core/backends.py.
//
// Only the K option rows of the lm_head weight are read: K x H multiply-adds per prompt instead of V x H
// (V = 151,936 for Qwen2.5: ~30,000x less work than projecting onto the vocabulary). Two phases:
//   1. parallel over prompts: option logits (dot products over H), hard/soft score, option log-probs [P, K];
//   2. parallel over captions: the mean score of the caption's prompts, summed in caption order, so the rewards
//      do not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>

#include "ops.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CAPRL_MCQ_AVX2 1
// Every AVX2 CPU also has F16C (fp16 <-> fp32 conversion), but -mavx2 does not switch it on: enable it for the
// functions below (the build only passes -mavx2 when /proc/cpuinfo lists avx2). Elsewhere fp16 is widened in C++.
#if defined(__F16C__)
#define CAPRL_MCQ_F16C 1
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("f16c")
#define CAPRL_MCQ_F16C 1
#endif
#endif

namespace caprl::cpu {
namespace {

// Accumulation (and output) type: double for double inputs, float for everything else (ATen's own choice).
template <typename T>
using acc_t = at::opmath_type<T>;

// Portable dot product: 8 independent partial sums, so the compiler can vectorise it and the rounding does not
// grow with H as one running sum would.
template <typename T>
acc_t<T> dot_portable(const T* a, const T* b, int64_t n) {
  using A = acc_t<T>;
  A part[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) part[l] += static_cast<A>(a[j + l]) * static_cast<A>(b[j + l]);
  A tail = 0;
  for (; j < n; ++j) tail += static_cast<A>(a[j]) * static_cast<A>(b[j]);
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7])) + tail;
}

#ifdef CAPRL_MCQ_AVX2
// 8 consecutive elements widened to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the high half of an fp32: widen with a 16-bit shift
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#ifdef CAPRL_MCQ_F16C
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 4 lanes
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                                   // 2 lanes
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// AVX2 dot product for fp32/bf16/fp16 inputs, fp32 accumulation: four 8-wide FMA chains hide the FMA latency.
template <typename T>
float dot_avx2(const T* a, const T* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    acc0 = _mm256_fmadd_ps(load8(a + j), load8(b + j), acc0);
    acc1 = _mm256_fmadd_ps(load8(a + j + 8), load8(b + j + 8), acc1);
    acc2 = _mm256_fmadd_ps(load8(a + j + 16), load8(b + j + 16), acc2);
    acc3 = _mm256_fmadd_ps(load8(a + j + 24), load8(b + j + 24), acc3);
  }
  for (; j + 8 <= n; j += 8) acc0 = _mm256_fmadd_ps(load8(a + j), load8(b + j), acc0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; j < n; ++j) s += static_cast<float>(a[j]) * static_cast<float>(b[j]);
  return s;
}
#endif

template <typename T>
acc_t<T> dot(const T* a, const T* b, int64_t n) {
#ifdef CAPRL_MCQ_AVX2
#ifdef CAPRL_MCQ_F16C
  constexpr bool has_half = true;
#else
  constexpr bool has_half = false;
#endif
  if constexpr (!std::is_same_v<T, double> && (has_half || !std::is_same_v<T, c10::Half>)) return dot_avx2(a, b, n);
#endif
  return dot_portable(a, b, n);
}

// Pointers and sizes of one call, shared by every prompt.
template <typename T>
struct Problem {
  const T* hidden;  // [P, H], row stride hidden_stride
  const T* weight;  // [V, H], row stride weight_stride
  const T* bias;    // [V] or nullptr
  const int64_t *ids, *answers, *num_options;  // [P, K], [P], [P]
  int64_t hidden_stride, weight_stride, H, K;
  acc_t<T> temperature;
  bool soft;
};

// One prompt p: fills row [K] with its option log-probs (-inf beyond num_options[p]) and returns its score.
template <typename T>
acc_t<T> score_prompt(const Problem<T>& pb, int64_t p, acc_t<T>* row) {
  using A = acc_t<T>;
  const T* h = pb.hidden + p * pb.hidden_stride;
  const int64_t* ids = pb.ids + p * pb.K;
  const int64_t n_opt = pb.num_options[p], answer = pb.answers[p];
  for (int64_t k = 0; k < n_opt; ++k) {  // raw logits first: the hard score compares them before the temperature
    const T* w = pb.weight + ids[k] * pb.weight_stride;
    row[k] = dot(h, w, pb.H) + (pb.bias ? static_cast<A>(pb.bias[ids[k]]) : A(0));
  }
  bool strict_best = true;  // ties lose; a NaN logit fails the comparison, as in the reference
  for (int64_t k = 0; k < n_opt; ++k)
    if (k != answer && !(row[answer] > row[k])) strict_best = false;
  A zmax = -std::numeric_limits<A>::infinity();
  for (int64_t k = 0; k < n_opt; ++k) {
    row[k] /= pb.temperature;
    zmax = std::max(zmax, row[k]);
  }
  A sum = 0;
  for (int64_t k = 0; k < n_opt; ++k) sum += std::exp(row[k] - zmax);
  const A lse = zmax + std::log(sum);
  for (int64_t k = 0; k < n_opt; ++k) row[k] -= lse;
  for (int64_t k = n_opt; k < pb.K; ++k) row[k] = -std::numeric_limits<A>::infinity();
  return pb.soft ? std::exp(row[answer]) : A(strict_best ? 1 : 0);
}

// Values the kernel indexes with: checked here (serially, O(P K)) so the parallel loops never read out of bounds.
void check_indices(const at::Tensor& option_ids, const at::Tensor& answers, const at::Tensor& num_options,
                   const at::Tensor& prompt_order, const at::Tensor& caption_offsets, int64_t V) {
  const int64_t P = option_ids.size(0), K = option_ids.size(1), C = caption_offsets.size(0) - 1;
  const int64_t *ids = option_ids.data_ptr<int64_t>(), *ans = answers.data_ptr<int64_t>();
  const int64_t *nopt = num_options.data_ptr<int64_t>(), *order = prompt_order.data_ptr<int64_t>();
  const int64_t* off = caption_offsets.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(nopt[p] >= 1 && nopt[p] <= K, "mcq_rewards: num_options must lie in [1, K=", K, "], got ", nopt[p],
                " at index ", p);
    TORCH_CHECK(ans[p] >= 0 && ans[p] < nopt[p], "mcq_rewards: answers must lie in [0, num_options), got ", ans[p],
                " at index ", p, " (num_options ", nopt[p], ")");
    for (int64_t k = 0; k < nopt[p]; ++k)
      TORCH_CHECK(ids[p * K + k] >= 0 && ids[p * K + k] < V, "mcq_rewards: option_ids must lie in [0, V=", V,
                  "), got ", ids[p * K + k], " at index (", p, ", ", k, ")");
  }
  TORCH_CHECK(off[0] == 0 && off[C] == P, "mcq_rewards: caption_offsets must run from 0 to P=", P, ", got ", off[0],
              " to ", off[C]);
  for (int64_t c = 0; c < C; ++c)
    TORCH_CHECK(off[c + 1] > off[c], "mcq_rewards: caption ", c, " has no prompts (caption_offsets must increase)");
  std::vector<char> seen(P, 0);  // prompt_order must be a permutation: each row written by one caption only
  for (int64_t j = 0; j < P; ++j) {
    TORCH_CHECK(order[j] >= 0 && order[j] < P && !seen[order[j]],
                "mcq_rewards: prompt_order must be a permutation of [0, P=", P, "), got ", order[j], " at index ", j);
    seen[order[j]] = 1;
  }
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "mcq_rewards: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "mcq_rewards: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "mcq_rewards: ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_args(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
                const at::Tensor& option_ids, const at::Tensor& answers, const at::Tensor& num_options,
                const at::Tensor& prompt_order, const at::Tensor& caption_offsets) {
  TORCH_CHECK(hidden.dim() == 2, "mcq_rewards: hidden must be [P, H], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "mcq_rewards: weight must be [V, H], got ", weight.sizes());
  const int64_t P = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "mcq_rewards: hidden must be float32, float64, bfloat16 or float16, got ", dtype);
  check_tensor(hidden, "hidden", dtype, {P, H});
  check_tensor(weight, "weight", dtype, {V, H});
  TORCH_CHECK(hidden.stride(1) == 1 || H <= 1, "mcq_rewards: hidden must have a unit stride along H");
  TORCH_CHECK(weight.stride(1) == 1 || H <= 1, "mcq_rewards: weight must have a unit stride along H");
  if (bias) {
    check_tensor(*bias, "bias", dtype, {V});
    TORCH_CHECK(bias->is_contiguous(), "mcq_rewards: bias must be contiguous");
  }
  TORCH_CHECK(option_ids.dim() == 2 && option_ids.size(1) >= 1, "mcq_rewards: option_ids must be [P, K], got ",
              option_ids.sizes());
  check_tensor(option_ids, "option_ids", at::kLong, {P, option_ids.size(1)});
  check_tensor(answers, "answers", at::kLong, {P});
  check_tensor(num_options, "num_options", at::kLong, {P});
  check_tensor(prompt_order, "prompt_order", at::kLong, {P});
  TORCH_CHECK(caption_offsets.dim() == 1 && caption_offsets.size(0) >= 2,
              "mcq_rewards: caption_offsets must be [C + 1] with C >= 1, got ", caption_offsets.sizes());
  check_tensor(caption_offsets, "caption_offsets", at::kLong, {caption_offsets.size(0)});
  for (const auto* t : {&option_ids, &answers, &num_options, &prompt_order, &caption_offsets})
    TORCH_CHECK(t->is_contiguous(), "mcq_rewards: index tensors must be contiguous");
}

// Phase 1: score [P] and option log-probs [P, K] of every prompt. Prompts cost the same, yet a dynamic schedule in
// small chunks: on a busy machine a thread that starts late (descheduled) then takes fewer prompts instead of a
// fixed half. Scores do not depend on which thread computes them.
template <typename T>
void score_prompts(const Problem<T>& pb, int64_t P, acc_t<T>* score, acc_t<T>* logprobs) {
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t p = 0; p < P; ++p) score[p] = score_prompt(pb, p, logprobs + p * pb.K);
}

// Phase 2: rewards[c] = mean of the scores of the caption's prompts, summed in caption order.
template <typename A>
void caption_means(const A* score, const int64_t* order, const int64_t* offsets, int64_t C, A* rewards) {
#pragma omp parallel for schedule(static) if (C > 4096)
  for (int64_t c = 0; c < C; ++c) {
    double total = 0;  // double: exact for hard scores, and no drift for captions with many prompts
    for (int64_t j = offsets[c]; j < offsets[c + 1]; ++j) total += static_cast<double>(score[order[j]]);
    rewards[c] = static_cast<A>(total / static_cast<double>(offsets[c + 1] - offsets[c]));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mcq_rewards(const at::Tensor& hidden, const at::Tensor& weight,
                                               const OptTensor& bias, const at::Tensor& option_ids,
                                               const at::Tensor& answers, const at::Tensor& num_options,
                                               const at::Tensor& prompt_order, const at::Tensor& caption_offsets,
                                               double temperature, const std::string& mode) {
  check_args(hidden, weight, bias, option_ids, answers, num_options, prompt_order, caption_offsets);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "mcq_rewards: temperature must be finite and > 0");
  TORCH_CHECK(mode == "hard" || mode == "soft", "mcq_rewards: mode must be 'hard' or 'soft', got '", mode, "'");
  check_indices(option_ids, answers, num_options, prompt_order, caption_offsets, weight.size(0));
  const int64_t P = hidden.size(0), K = option_ids.size(1), C = caption_offsets.size(0) - 1;
  const auto out_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rewards = at::empty({C}, hidden.options().dtype(out_dtype));              // [C]
  at::Tensor option_logprobs = at::empty({P, K}, hidden.options().dtype(out_dtype));  // [P, K]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "mcq_rewards", [&] {
    using A = acc_t<scalar_t>;
    const Problem<scalar_t> pb{hidden.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                               bias ? bias->data_ptr<scalar_t>() : nullptr, option_ids.data_ptr<int64_t>(),
                               answers.data_ptr<int64_t>(), num_options.data_ptr<int64_t>(), hidden.stride(0),
                               weight.stride(0), hidden.size(1), K, static_cast<A>(temperature), mode == "soft"};
    std::vector<A> score(P);  // [P]
    score_prompts(pb, P, score.data(), option_logprobs.data_ptr<A>());
    caption_means(score.data(), prompt_order.data_ptr<int64_t>(), caption_offsets.data_ptr<int64_t>(), C,
                  rewards.data_ptr<A>());
  });
  return {rewards, option_logprobs};
}

}  // namespace caprl::cpu
