// Shared building blocks of the C++ CPU kernels (csrc/cpu/*.cpp), header-only:
//   exp_f32 / exp_acc  a branch-free exp that gcc vectorises (8 floats per AVX2 instruction);
//   LseState           a running log-sum-exp (and entropy) of one row, folded block by block in one pass;
//   fold_row           folds a row segment of logits (any float dtype, scaled by 1/T) into an LseState;
//   grad_row           writes d(a * logp + b * entropy) / d logits for one row segment.
// token_logprobs.cpp and linear_token_logprobs.cpp use all of it; other kernels may include it for exp_f32. Keep the
// signatures stable: change them only together with every includer.
//
// Everything is plain loops over contiguous arrays, written for gcc -O3 -mavx2 -mfma (caprl_core/_build.py):
// `#pragma omp simd reduction` (honoured under -fopenmp) lets gcc reorder the sums and maxima into vector lanes,
// which it otherwise refuses for floating point.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

namespace caprl::cpu {

// Elements per L1 block. A row is processed block by block: converted and scaled into a scratch buffer, then read
// once more for the exp and the sums while still in L1. 512 floats (2 KiB): one core folds an fp32 row streamed from
// DRAM at 0.57 ns/element, against 0.64-0.72 for 1024, 0.75 for 2048 and 0.8 for 4096-8192.
constexpr int64_t kL1Block = 512;

// Where exp_f32 stops being meaningful: below -87.6 it returns 0 (below about -87.7) or at most 9e-39, next to FLT_MIN.
// The entropy and gradient terms clamp log-probabilities there, so that exp(d) * d is 0 * -87.6, never 0 * -inf = NaN
// for a -inf logit (masked vocabulary entries).
constexpr float kExpMinArg = -87.6f;

inline float fma_f32(float a, float b, float c) {
#ifdef __FMA__
  return std::fma(a, b, c);  // one vfmadd (vectorised); without -mfma std::fma would be a slow library call
#else
  return a * b + c;
#endif
}

inline int32_t float_bits(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof b);  // the portable bit cast; gcc turns it into a register move (and vectorises it)
  return b;
}

inline float bits_float(int32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// exp(x) for float x <= 88 (larger x overflow the exponent bits: garbage, not inf; every caller passes z - max <= 0
// or log-probabilities): relative error <= 8.5e-8 measured on every float in [-87, 10]; exactly 0 below about
// -87.7; NaN stays NaN. std::exp does not vectorise under gcc without -ffast-math. Method: x = n ln2 + r with integer
// n = round(x log2 e) and |r| <= ln2/2, exp(x) = 2^n * e^r, e^r = 1 + r + r^2 q(r) with q a degree-4 polynomial
// (total degree 6) fitted to minimise the relative error on [-ln2/2, ln2/2] (fit error 3e-9, the rest is fp32
// rounding). 2^n is built directly in the exponent bits; clamping x at -88 keeps n >= -127, and n = -127 gives the
// bit pattern of +0.0, so very negative inputs need no select on the result. No branches: a conditional around the
// result stops gcc from vectorising (it may not speculate the polynomial under -ftrapping-math): 4.8 ns per element
// instead of 0.5 (one core of the 2-core EPYC). An upper clamp as well cost +40% and no caller needs it.
inline float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 12 significant bits, so n *
  constexpr float kLn2Lo = 1.42860682030941723e-6f;  // kLn2Hi is exact and r keeps its precision (Cody-Waite)
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: y + kRound rounds y to an integer, held in the low bits
  constexpr float kC2 = 4.999999345e-01f, kC3 = 1.666652069e-01f, kC4 = 4.166838737e-02f;
  constexpr float kC5 = 8.368709928e-03f, kC6 = 1.381461318e-03f;
  const float xc = x < -88.0f ? -88.0f : x;  // one vmaxps; NaN compares false and stays NaN
  const float shifted = fma_f32(xc, kLog2e, kRound);
  const float n = shifted - kRound;                               // round(xc * log2 e), in [-127, 127]
  const int32_t n_int = float_bits(shifted) - float_bits(kRound);  // the same integer, from the low mantissa bits
  const float r = fma_f32(-n, kLn2Lo, fma_f32(-n, kLn2Hi, xc));
  float q = fma_f32(kC6, r, kC5);
  q = fma_f32(q, r, kC4);
  q = fma_f32(q, r, kC3);
  q = fma_f32(q, r, kC2);
  const float e_r = fma_f32(r * r, q, r) + 1.0f;
  return e_r * bits_float((n_int + 127) << 23);
}

// exp in the accumulation type: the polynomial for float, std::exp for double (fp64 inputs ask for fp64 accuracy,
// not speed).
inline float exp_acc(float x) { return exp_f32(x); }
inline double exp_acc(double x) { return std::exp(x); }

// ---- fp16 conversions that vectorise: c10::Half's own (without -mf16c) are branchy and left the fp16 kernels
// scalar (1.1 s for the N=2048, V=151936 forward against 0.18 s for bf16). A select whose float arm is computed
// only for that arm becomes a branch under -ftrapping-math, so the float-valued choices are integer masks. ----

// IEEE half (bits) -> float, the same as c10 for all 65,536 inputs except NaN payloads (NaN stays NaN).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;                                       // exponent and mantissa
  const uint32_t rebias = em >= 0x7c00u ? 0x70000000u : 0x38000000u;    // inf/NaN: exponent to 255, else +112
  const float normal = bits_float(static_cast<int32_t>((em << 13) + rebias));
  const float subnormal = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f;  // em * 2^-24
  const uint32_t is_sub = 0u - static_cast<uint32_t>(em < 0x0400u);  // all ones or zero: a mask, not a branch
  const uint32_t magnitude = (static_cast<uint32_t>(float_bits(subnormal)) & is_sub) |
                             (static_cast<uint32_t>(float_bits(normal)) & ~is_sub);
  return bits_float(static_cast<int32_t>(magnitude | sign));
}

// float -> IEEE half bits, rounding to nearest even (overflow to inf, NaN to a quiet NaN); equal to c10::Half(float)
// on every 7th float bit pattern and around every half value (checked exhaustively this way).
inline uint16_t float_to_half_bits(float x) {
  const uint32_t f = static_cast<uint32_t>(float_bits(x));
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t a = f & 0x7fffffffu;
  // |x| < 2^-14: a half subnormal. Adding 0.5 (ulp 2^-24, the subnormal step) rounds |x| to a multiple of 2^-24.
  const uint32_t sub = static_cast<uint32_t>(float_bits(bits_float(static_cast<int32_t>(a)) + 0.5f) - float_bits(0.5f));
  const uint32_t is_sub = 0u - static_cast<uint32_t>(a < 0x38800000u);  // a mask, not a branch (see above)
  // normal: rebias the exponent (-112) and round the 13 dropped mantissa bits to nearest even; a carry into the
  // exponent is the right result (up to inf for |x| >= 65520)
  const uint32_t normal = (a - 0x38000000u + 0x0fffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN, or inf for |x| >= 65536 (2^16)
  const uint32_t bits = (sub & is_sub) | ((a >= 0x47800000u ? big : normal) & ~is_sub);
  return static_cast<uint16_t>(bits | sign);
}

// Element loads and stores between a tensor dtype and the accumulation dtype (static_cast except for fp16).
template <typename scalar_t>
inline at::opmath_type<scalar_t> to_acc(scalar_t x) {
  return static_cast<at::opmath_type<scalar_t>>(x);
}
template <>
inline float to_acc<c10::Half>(c10::Half x) {
  return half_bits_to_float(x.x);
}
template <typename scalar_t>
inline scalar_t from_acc(at::opmath_type<scalar_t> x) {
  return static_cast<scalar_t>(x);
}
template <>
inline c10::Half from_acc<c10::Half>(float x) {
  return c10::Half(float_to_half_bits(x), c10::Half::from_bits());
}

// Running log-sum-exp of one row of z = logits / T, folded block by block with a running max m:
//   s = sum_i exp(z_i - m),  w = sum_i exp(z_i - m) * (z_i - m),  lse = m + log s,  entropy = log s - w / s.
// w is kept relative to m (not sum p z) so that large logits do not cancel in the entropy. Block sums (<= kL1Block
// terms, spread over vector lanes) are formed in the accumulation type and the running totals in double, so the
// rounding error does not grow with V: fp32 log-probs measured within 1e-6 of the fp64 reference at V = 151,936.
struct LseState {
  double m = -std::numeric_limits<double>::infinity();
  double s = 0.0;
  double w = 0.0;

  double lse() const { return m + std::log(s); }
  double entropy() const { return std::log(s) - w / s; }
};

// buf[i] = float(x[i]) * scale for i < len; returns max_i buf[i] (-inf when len == 0).
template <typename scalar_t, typename acc_t>
inline acc_t load_scaled_max(const scalar_t* x, int64_t len, acc_t scale, acc_t* buf) {
  acc_t block_max = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : block_max)
  for (int64_t i = 0; i < len; ++i) {
    const acc_t z = to_acc(x[i]) * scale;
    buf[i] = z;
    block_max = std::max(block_max, z);
  }
  return block_max;
}

// Folds z[0:len) (in L1, block_max = its max) into st.
template <typename acc_t, bool kEntropy>
inline void fold_block(LseState& st, const acc_t* z, int64_t len, acc_t block_max) {
  if (!(block_max > -std::numeric_limits<acc_t>::infinity())) {  // all -inf or NaN: no mass, but keep NaN
    for (int64_t i = 0; i < len; ++i) {
      if (std::isnan(z[i])) st.s = std::numeric_limits<double>::quiet_NaN();
    }
    return;
  }
  if (block_max > st.m) {  // rescale the totals to the new max: s' = e^-delta s, w' = e^-delta (w - delta s)
    if (st.s > 0.0) {
      const double delta = static_cast<double>(block_max) - st.m;
      const double factor = std::exp(-delta);
      st.w = factor * (st.w - delta * st.s);
      st.s *= factor;
    }
    st.m = block_max;
  }
  const acc_t m = static_cast<acc_t>(st.m);  // exact: m is one of the z
  acc_t s = 0, w = 0;
  if constexpr (kEntropy) {
#pragma omp simd reduction(+ : s, w)
    for (int64_t i = 0; i < len; ++i) {
      const acc_t d = z[i] - m;
      const acc_t e = exp_acc(d);
      s += e;
      w += e * std::max(d, acc_t(kExpMinArg));  // e ~ 0 below the clamp; it avoids 0 * -inf = NaN
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i) s += exp_acc(z[i] - m);
  }
  st.s += s;
  if constexpr (kEntropy) st.w += w;
}

// Folds the row segment x[0:len) (logits of any float dtype; z = x * scale with scale = 1/T) into st, in one pass
// over memory. buf: scratch of kL1Block acc_t. Not inlined, for the same reason as grad_row.
template <typename scalar_t, typename acc_t, bool kEntropy>
__attribute__((noinline)) void fold_row(LseState& st, const scalar_t* x, int64_t len, acc_t scale, acc_t* buf) {
  for (int64_t b0 = 0; b0 < len; b0 += kL1Block) {
    const int64_t n = std::min(kL1Block, len - b0);
    const acc_t block_max = load_scaled_max(x + b0, n, scale, buf);
    fold_block<acc_t, kEntropy>(st, buf, n, block_max);
  }
}

// Coefficients of one row's gradient: with d_i = z_i - lse = log p_i, p_i = exp(d_i) and H the row's entropy,
//   dL/dlogits_i = (dL/dlogp ([i == target] - p_i) - dL/dentropy p_i (d_i + H)) / T
//                = -p_i (a + b (d_i + H)) + a [i == target],   with a = dL/dlogp / T, b = dL/dentropy / T.
template <typename acc_t>
struct RowGrad {
  acc_t lse;      // logsumexp of z over the whole row
  acc_t a;        // dL/dlogp / T
  acc_t b;        // dL/dentropy / T
  acc_t entropy;  // H of the row (0 when b == 0)
  int64_t target;  // column of the target within this segment, or -1 when it lies outside
};

// g[0:len) = gradient w.r.t. the row segment x[0:len) (same dtype as x; g may alias x: each element is read before
// it is written). buf: scratch of kL1Block acc_t (unused when scalar_t is acc_t). Not inlined: inlined into the
// callers' parallel loops gcc (12.2) turned the select in the loop into a branch and left it scalar (5 ns/element).
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void grad_row(const scalar_t* x, scalar_t* g, int64_t len, acc_t scale,
                                        const RowGrad<acc_t>& c, acc_t* buf) {
  for (int64_t b0 = 0; b0 < len; b0 += kL1Block) {
    const int64_t n = std::min(kL1Block, len - b0);
    acc_t* out = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(g + b0) : buf;
    const acc_t lse = c.lse, a = c.a, b = c.b, h = c.entropy;  // locals: out[] may not alias them
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = to_acc(x[b0 + i]) * scale - lse;
      const acc_t d_finite = std::max(d, acc_t(kExpMinArg));  // p ~ 0 below the clamp; it avoids 0 * -inf = NaN
      out[i] = -exp_acc(d) * (a + b * (d_finite + h));
    }
    if (c.target >= b0 && c.target < b0 + n) out[c.target - b0] += c.a;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (int64_t i = 0; i < n; ++i) g[b0 + i] = from_acc<scalar_t>(buf[i]);
    }
  }
}

// ---- argument checks shared by the log-prob kernels (the Python layer validated everything; these keep a kernel
// from reading out of bounds if it is called some other way) ----

// x: a 2-D CPU tensor with a unit stride along its last dim (any row stride).
inline void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, name, ": expected a 2-D tensor, got shape ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name, ": expected a unit stride along the last dim, got strides ",
              x.strides());
}

// targets: [n] int64 with every value in [0, vocab) or equal to ignore_index. Returns it contiguous.
inline at::Tensor checked_targets(const at::Tensor& targets, int64_t n, int64_t vocab, int64_t ignore_index) {
  TORCH_CHECK(targets.device().is_cpu(), "targets: expected a CPU tensor, got ", targets.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets: expected int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n, "targets: expected shape [", n, "], got ", targets.sizes());
  at::Tensor t = targets.contiguous();
  const int64_t* ids = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ids[i] == ignore_index || (ids[i] >= 0 && ids[i] < vocab), "targets: expected ids in [0, ", vocab,
                ") or ignore_index=", ignore_index, ", got ", ids[i], " at index ", i);
  }
  return t;
}

// v: None, or [n] of dtype `dtype` on the CPU. Returns it contiguous (or an undefined tensor for None).
inline at::Tensor checked_vector(const std::optional<at::Tensor>& v, const char* name, int64_t n,
                                 at::ScalarType dtype) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  TORCH_CHECK(v->device().is_cpu(), name, ": expected a CPU tensor, got ", v->device());
  TORCH_CHECK(v->scalar_type() == dtype, name, ": expected ", dtype, ", got ", v->scalar_type());
  TORCH_CHECK(v->dim() == 1 && v->size(0) == n, name, ": expected shape [", n, "], got ", v->sizes());
  return v->contiguous();
}

// Accumulation (and output) dtype: fp64 for fp64 inputs, fp32 for everything else.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace caprl::cpu
