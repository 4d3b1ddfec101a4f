// token_logprobs on CPU tensors: log_softmax(logits / T)[target] (and the entropy), forward and backward, reading
// each row of logits once. Contract: caprl_core/backends.py; definition: caprl_core.reference.token_logprobs.
//
// Why a kernel: log_softmax + gather writes a full [N, V] fp32 tensor and reads the logits twice; here each row is
// streamed through L1 once with an online log-sum-exp and a vectorised exp (csrc/cpu/common.h), and the forward
// allocates nothing [N, V]. Measured on the 2-core EPYC, N = 2048, V = 151,936, fp32 (bench/bench_token_logprobs.py):
// forward 82-150 ms depending on the load of the shared machine (8-15 GB/s of logits; quiet, it is compute-bound at
// ~0.37 ns per element, while x.sum() reads at 22-27 GB/s), against 0.64-0.87 s for log_softmax + gather. The
// backward (0.5-0.8 s) is mostly the first touch of the fresh 1.24 GB grad_logits: allocating and writing 1.24 GB
// once costs ~0.8 s of page faults in this VM.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "ops.h"

namespace caprl::cpu {
namespace {

// Rows per parallel task: enough that a task holds >= 32k elements, so tiny vocabularies do not pay one task per row.
int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

// Outputs of the forward, [N] each in the accumulation dtype; entropy is null when not asked for.
template <typename acc_t>
struct RowOutputs {
  acc_t* logp;
  acc_t* lse;
  acc_t* entropy;
};

// logits: [N, V] rows `row_stride` apart; targets: [N]. One online log-sum-exp pass per row; ignored rows get zeros.
template <typename scalar_t, bool kEntropy>
void forward_rows(const scalar_t* logits, int64_t row_stride, const int64_t* targets, int64_t n, int64_t vocab,
                  double temperature, int64_t ignore_index, RowOutputs<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(1.0 / temperature);
  at::parallel_for(0, n, row_grain(vocab), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kL1Block];
    for (int64_t r = begin; r < end; ++r) {
      if (targets[r] == ignore_index) {
        out.logp[r] = out.lse[r] = 0;
        if constexpr (kEntropy) out.entropy[r] = 0;
        continue;
      }
      const scalar_t* row = logits + r * row_stride;
      LseState st;
      fold_row<scalar_t, acc_t, kEntropy>(st, row, vocab, scale, buf);
      const double lse = st.lse();
      const double z_target = to_acc(row[targets[r]]) * scale;  // the same rounding as in fold_row
      out.logp[r] = static_cast<acc_t>(z_target - lse);
      out.lse[r] = static_cast<acc_t>(lse);
      if constexpr (kEntropy) out.entropy[r] = static_cast<acc_t>(st.entropy());
    }
  });
}

// Upstream gradients and saved statistics of the backward, [N] each; null pointers read as zeros.
template <typename acc_t>
struct RowGradInputs {
  const acc_t* lse;
  const acc_t* entropy;
  const acc_t* grad_logp;
  const acc_t* grad_entropy;
};

// grad: [N, V] contiguous, same dtype as logits. Ignored rows are zero.
template <typename scalar_t>
void backward_rows(const scalar_t* logits, int64_t row_stride, const int64_t* targets, int64_t n, int64_t vocab,
                   double temperature, int64_t ignore_index, RowGradInputs<at::opmath_type<scalar_t>> in,
                   scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(1.0 / temperature);
  at::parallel_for(0, n, row_grain(vocab), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kL1Block];
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* grad_row_ptr = grad + r * vocab;
      if (targets[r] == ignore_index) {
        std::fill(grad_row_ptr, grad_row_ptr + vocab, static_cast<scalar_t>(0));
        continue;
      }
      const RowGrad<acc_t> c{in.lse[r], in.grad_logp ? in.grad_logp[r] * scale : acc_t(0),
                             in.grad_entropy ? in.grad_entropy[r] * scale : acc_t(0),
                             in.grad_entropy ? in.entropy[r] : acc_t(0), targets[r]};
      grad_row<scalar_t, acc_t>(logits + r * row_stride, grad_row_ptr, vocab, scale, c, buf);
    }
  });
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, OptTensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                                 double temperature, int64_t ignore_index,
                                                                 bool return_entropy) {
  check_rows(logits, "logits");
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1, "logits: expected V >= 1 columns, got shape ", logits.sizes());
  const at::Tensor t = checked_targets(targets, n, vocab, ignore_index);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor entropy = return_entropy ? at::empty({n}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowOutputs<acc_t> out{logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), data_or_null<acc_t>(entropy)};
    const auto* x = logits.data_ptr<scalar_t>();
    if (return_entropy) {
      forward_rows<scalar_t, true>(x, logits.stride(0), t.data_ptr<int64_t>(), n, vocab, temperature, ignore_index,
                                   out);
    } else {
      forward_rows<scalar_t, false>(x, logits.stride(0), t.data_ptr<int64_t>(), n, vocab, temperature, ignore_index,
                                    out);
    }
  });
  return {logp, lse, return_entropy ? OptTensor(entropy) : std::nullopt};
}

at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                              const OptTensor& entropy, const OptTensor& grad_logp, const OptTensor& grad_entropy,
                              double temperature, int64_t ignore_index) {
  check_rows(logits, "logits");
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const at::Tensor t = checked_targets(targets, n, vocab, ignore_index);
  const at::ScalarType acc = acc_dtype(logits.scalar_type());
  const at::Tensor lse_c = checked_vector(lse, "lse", n, acc);
  const at::Tensor ent_c = checked_vector(entropy, "entropy", n, acc);
  const at::Tensor g_logp = checked_vector(grad_logp, "grad_logp", n, acc);
  const at::Tensor g_ent = checked_vector(grad_entropy, "grad_entropy", n, acc);
  TORCH_CHECK(!g_ent.defined() || ent_c.defined(), "entropy: needed when grad_entropy is given");
  at::Tensor grad = at::empty({n, vocab}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowGradInputs<acc_t> in{lse_c.data_ptr<acc_t>(), data_or_null<acc_t>(ent_c), data_or_null<acc_t>(g_logp),
                                  data_or_null<acc_t>(g_ent)};
    backward_rows<scalar_t>(logits.data_ptr<scalar_t>(), logits.stride(0), t.data_ptr<int64_t>(), n, vocab,
                            temperature, ignore_index, in, grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace caprl::cpu
