// linear_token_logprobs on CPU tensors: log_softmax((hidden @ weight.T + bias) / T)[target] (and the entropy), forward
// and backward, without ever holding the [N, V] logits. Contract: caprl_core/backends.py; definition:
// caprl_core.reference.linear_token_logprobs.
//
// The logits are made one tile at a time, [rows, cols] fp32 (<= kTileBytes), by MKL through at::mm (we do not write
// a GEMM), and consumed at once by the row kernels of common.h:
//   forward  for each vocab tile, for each row block: z = h W_tile^T + b_tile, fold z into each row's running
//            log-sum-exp (LseState), pick the target logit;
//   backward for each vocab tile, for each row block: recompute z, turn it in place into dZ = dL/dlogits, then
//            grad_h[rows] += dZ W_tile, grad_W[tile] (+)= dZ^T h, grad_b[tile] (+)= sum_rows dZ.
// Vocab tiles outermost, not token chunks (as Liger's fused linear cross-entropy does): with all N = 4096 tokens in
// one row block every GEMM has an inner dimension of >= 1024 (H, N or the tile width), grad_W is written once per
// tile instead of being re-read and re-written per token chunk (622 MB each time for V = 151,936, H = 1024), and a
// bf16/fp16 weight is upcast to fp32 one tile at a time (no fp32 copy of the whole weight).
// Rows whose target is ignore_index are dropped before any GEMM (no work, zero outputs and gradients).
//
// Cost: 4 GEMMs of 2 N H V flops (the backward recomputes the logits) where materialising does 3. On the 2-core EPYC
// (N = 4096, H = 1024, V = 151,936, fp32) one such GEMM is 8.3-10 s and the fused row work ~0.2 s per pass; the
// reference spends ~10 s more than its 3 GEMMs in page faults and passes over its 2.49 GB [N, V] buffers (18-20 s
// of kernel time over the 2 cores), so the two are level to ~10% (34-39 s against 39-42 s measured, noisy machine).
// Timings and peak memory: bench/bench_linear_token_logprobs.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common.h"
#include "ops.h"

namespace caprl::cpu {
namespace {

// Bytes of one logits tile: 64 MiB = 2.7% of the 2.49 GB of [4096, 151936] fp32 logits. Sustained MKL rate of the
// forward's tile GEMMs over the whole vocabulary (N = 4096, H = 1024, 2 threads): 2048 columns 148 GF/s, 4096
// columns 135-154, 8192 137, 16384 106; 1024-row blocks of 4096 columns 105.
constexpr int64_t kTileBytes = int64_t(64) << 20;
// Rows of a tile at most (tokens beyond it form further row blocks, each re-reading the weight tile).
constexpr int64_t kMaxTileRows = 4096;

struct Tiling {
  int64_t rows;  // tokens per row block
  int64_t cols;  // vocab entries per tile
};

Tiling choose_tiling(int64_t num_rows, int64_t vocab, int64_t acc_size) {
  const int64_t rows = std::max<int64_t>(1, std::min(num_rows, kMaxTileRows));
  int64_t cols = std::max<int64_t>(64, kTileBytes / (rows * acc_size));
  cols = cols >= vocab ? vocab : cols / 64 * 64;  // whole cache lines per tile row
  return {rows, cols};
}

// The tokens that take part (target != ignore_index), their hidden states in the accumulation dtype and targets.
struct KeptRows {
  at::Tensor index;              // [K] int64 positions in [0, N)
  at::Tensor hidden;             // [K, H] acc dtype; a view of `hidden` when every row is kept and no cast is needed
  std::vector<int64_t> targets;  // [K]
  bool all = false;              // K == N: index is 0..N-1
};

KeptRows keep_rows(const at::Tensor& hidden, const at::Tensor& targets, int64_t ignore_index, at::ScalarType acc) {
  KeptRows kept;
  const int64_t n = targets.size(0);
  const int64_t* t = targets.data_ptr<int64_t>();
  std::vector<int64_t> index;
  for (int64_t i = 0; i < n; ++i) {
    if (t[i] != ignore_index) {
      index.push_back(i);
      kept.targets.push_back(t[i]);
    }
  }
  const auto k = static_cast<int64_t>(index.size());
  kept.all = k == n;
  kept.index = at::empty({k}, targets.options());
  std::copy(index.begin(), index.end(), kept.index.data_ptr<int64_t>());
  kept.hidden = kept.all ? hidden.to(acc) : hidden.index_select(0, kept.index).to(acc);  // [K, H]
  return kept;
}

// [K] values of an [N] vector at the kept rows, in the accumulation type; zeros for an undefined tensor.
template <typename acc_t>
std::vector<acc_t> gather_kept(const at::Tensor& v, const KeptRows& kept) {
  std::vector<acc_t> out(kept.targets.size(), acc_t(0));
  if (!v.defined()) return out;
  const acc_t* p = v.data_ptr<acc_t>();
  const int64_t* idx = kept.index.data_ptr<int64_t>();
  for (size_t i = 0; i < out.size(); ++i) out[i] = p[idx[i]];
  return out;
}

// z [rows, cols] = h_blk @ w_tile^T (+ b_tile), written into the front of `buffer` (flat, acc dtype).
at::Tensor logits_tile(const at::Tensor& h_blk, const at::Tensor& w_tile, const at::Tensor& b_tile,
                       at::Tensor& buffer) {
  const int64_t rows = h_blk.size(0), cols = w_tile.size(0);
  at::Tensor z = buffer.narrow(0, 0, rows * cols).view({rows, cols});
  if (b_tile.defined()) {
    at::addmm_out(z, b_tile, h_blk, w_tile.t());
  } else {
    at::mm_out(z, h_blk, w_tile.t());
  }
  return z;
}

// Forward per-row state over the kept rows: running log-sum-exp and the target's scaled logit.
struct ForwardState {
  std::vector<LseState> lse;
  std::vector<double> z_target;
};

// Folds the tile z [rows, cols] (kept rows k0.., vocab v0..) into the running states.
template <typename acc_t, bool kEntropy>
void fold_tile(const at::Tensor& z, int64_t k0, int64_t v0, acc_t scale, const KeptRows& kept, ForwardState& st) {
  const int64_t rows = z.size(0), cols = z.size(1);
  const acc_t* zp = z.data_ptr<acc_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kL1Block];
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* row = zp + i * cols;
      fold_row<acc_t, acc_t, kEntropy>(st.lse[k0 + i], row, cols, scale, buf);
      const int64_t t = kept.targets[k0 + i] - v0;
      if (t >= 0 && t < cols) st.z_target[k0 + i] = row[t] * scale;  // the same rounding as in fold_row
    }
  });
}

template <typename acc_t, bool kEntropy>
void forward_tiles(const at::Tensor& weight, const at::Tensor& bias, const KeptRows& kept, double temperature,
                   ForwardState& st) {
  const at::ScalarType acc = kept.hidden.scalar_type();
  const int64_t k = kept.hidden.size(0), vocab = weight.size(0);
  const Tiling tiling = choose_tiling(k, vocab, sizeof(acc_t));
  at::Tensor buffer = at::empty({tiling.rows * tiling.cols}, kept.hidden.options());
  const acc_t scale = static_cast<acc_t>(1.0 / temperature);
  for (int64_t v0 = 0; v0 < vocab; v0 += tiling.cols) {
    const int64_t cols = std::min(tiling.cols, vocab - v0);
    const at::Tensor w_tile = weight.narrow(0, v0, cols).to(acc);  // [cols, H], a view for fp32/fp64
    const at::Tensor b_tile = bias.defined() ? bias.narrow(0, v0, cols).to(acc) : at::Tensor();
    for (int64_t k0 = 0; k0 < k; k0 += tiling.rows) {
      const at::Tensor h_blk = kept.hidden.narrow(0, k0, std::min(tiling.rows, k - k0));  // [rows, H]
      fold_tile<acc_t, kEntropy>(logits_tile(h_blk, w_tile, b_tile, buffer), k0, v0, scale, kept, st);
    }
  }
}

// Kept-row inputs of the backward, [K] each, already divided by T where the formula wants it (see RowGrad).
template <typename acc_t>
struct BackwardRows {
  std::vector<acc_t> lse, a, b, entropy;
};

// Turns the tile z [rows, cols] into dZ = dL/dlogits in place.
template <typename acc_t>
void grad_tile(at::Tensor& z, int64_t k0, int64_t v0, acc_t scale, const KeptRows& kept,
               const BackwardRows<acc_t>& in) {
  const int64_t rows = z.size(0), cols = z.size(1);
  acc_t* zp = z.data_ptr<acc_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kL1Block];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = k0 + i, t = kept.targets[r] - v0;
      const RowGrad<acc_t> c{in.lse[r], in.a[r], in.b[r], in.entropy[r], (t >= 0 && t < cols) ? t : -1};
      grad_row<acc_t, acc_t>(zp + i * cols, zp + i * cols, cols, scale, c, buf);
    }
  });
}

// Gradients: hidden [K, H] over the kept rows in the accumulation dtype; weight [V, H] in the weight's dtype (a
// bf16/fp16 tile is accumulated in fp32 and cast once); bias [V] in the accumulation dtype or undefined.
struct Grads {
  at::Tensor hidden, weight, bias;
};

template <typename acc_t>
void backward_tiles(const at::Tensor& weight, const at::Tensor& bias, const KeptRows& kept, double temperature,
                    const BackwardRows<acc_t>& in, Grads& g) {
  const at::ScalarType acc = kept.hidden.scalar_type();
  const int64_t k = kept.hidden.size(0), vocab = weight.size(0);
  const Tiling tiling = choose_tiling(k, vocab, sizeof(acc_t));
  at::Tensor buffer = at::empty({tiling.rows * tiling.cols}, kept.hidden.options());
  const bool cast_weight = g.weight.scalar_type() != acc;
  const at::Tensor gw_buffer = cast_weight ? at::empty({tiling.cols, weight.size(1)}, kept.hidden.options())
                                           : at::Tensor();
  const acc_t scale = static_cast<acc_t>(1.0 / temperature);
  for (int64_t v0 = 0; v0 < vocab; v0 += tiling.cols) {
    const int64_t cols = std::min(tiling.cols, vocab - v0);
    const at::Tensor w_tile = weight.narrow(0, v0, cols).to(acc);  // [cols, H]
    const at::Tensor b_tile = bias.defined() ? bias.narrow(0, v0, cols).to(acc) : at::Tensor();
    at::Tensor gw_tile = cast_weight ? gw_buffer.narrow(0, 0, cols) : g.weight.narrow(0, v0, cols);  // [cols, H]
    for (int64_t k0 = 0; k0 < k; k0 += tiling.rows) {
      const int64_t rows = std::min(tiling.rows, k - k0);
      const at::Tensor h_blk = kept.hidden.narrow(0, k0, rows);  // [rows, H]
      at::Tensor dz = logits_tile(h_blk, w_tile, b_tile, buffer);  // [rows, cols], logits then dZ
      grad_tile<acc_t>(dz, k0, v0, scale, kept, in);
      g.hidden.narrow(0, k0, rows).addmm_(dz, w_tile);  // += dZ W_tile: [rows, cols] @ [cols, H]
      if (k0 == 0) {
        at::mm_out(gw_tile, dz.t(), h_blk);  // = dZ^T h: [cols, rows] @ [rows, H]
      } else {
        gw_tile.addmm_(dz.t(), h_blk);
      }
      if (g.bias.defined()) {
        at::Tensor gb_tile = g.bias.narrow(0, v0, cols);
        gb_tile.add_(dz.sum(0));  // [cols]
      }
    }
    if (cast_weight) g.weight.narrow(0, v0, cols).copy_(gw_tile);
  }
}

void check_linear_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias) {
  check_rows(hidden, "hidden");
  check_rows(weight, "weight");
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "hidden: expected a float dtype, got ", hidden.scalar_type());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight: expected the dtype of hidden (",
              hidden.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) == hidden.size(1), "weight: expected shape [V, ", hidden.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1, "weight: expected V >= 1 rows, got shape ", weight.sizes());
  if (bias.defined()) {
    TORCH_CHECK(bias.device().is_cpu(), "bias: expected a CPU tensor, got ", bias.device());
    TORCH_CHECK(bias.scalar_type() == hidden.scalar_type(), "bias: expected the dtype of hidden (",
                hidden.scalar_type(), "), got ", bias.scalar_type());
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "bias: expected shape [", weight.size(0),
                "], got ", bias.sizes());
  }
}

at::Tensor defined_or_empty(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, OptTensor> linear_token_logprobs_fwd(const at::Tensor& hidden,
                                                                        const at::Tensor& weight, const OptTensor& bias,
                                                                        const at::Tensor& targets, double temperature,
                                                                        int64_t ignore_index, bool return_entropy) {
  const at::Tensor b = defined_or_empty(bias);
  check_linear_inputs(hidden, weight, b);
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  const int64_t n = hidden.size(0);
  const at::Tensor t = checked_targets(targets, n, weight.size(0), ignore_index);
  const at::ScalarType acc = acc_dtype(hidden.scalar_type());
  const auto opts = hidden.options().dtype(acc);
  at::Tensor logp = at::zeros({n}, opts), lse = at::zeros({n}, opts);  // zeros stay on ignored rows
  at::Tensor entropy = return_entropy ? at::zeros({n}, opts) : at::Tensor();
  const KeptRows kept = keep_rows(hidden, t, ignore_index, acc);
  const auto k = static_cast<int64_t>(kept.targets.size());
  if (k == 0) return {logp, lse, return_entropy ? OptTensor(entropy) : std::nullopt};
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_token_logprobs_fwd", [&] {
    ForwardState st{std::vector<LseState>(k), std::vector<double>(k, 0.0)};
    if (return_entropy) {
      forward_tiles<scalar_t, true>(weight, b, kept, temperature, st);
    } else {
      forward_tiles<scalar_t, false>(weight, b, kept, temperature, st);
    }
    const int64_t* idx = kept.index.data_ptr<int64_t>();
    for (int64_t i = 0; i < k; ++i) {
      const double row_lse = st.lse[i].lse();
      logp.data_ptr<scalar_t>()[idx[i]] = static_cast<scalar_t>(st.z_target[i] - row_lse);
      lse.data_ptr<scalar_t>()[idx[i]] = static_cast<scalar_t>(row_lse);
      if (return_entropy) entropy.data_ptr<scalar_t>()[idx[i]] = static_cast<scalar_t>(st.lse[i].entropy());
    }
  });
  return {logp, lse, return_entropy ? OptTensor(entropy) : std::nullopt};
}

std::tuple<at::Tensor, at::Tensor, OptTensor> linear_token_logprobs_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& targets,
    const at::Tensor& lse, const OptTensor& entropy, const OptTensor& grad_logp, const OptTensor& grad_entropy,
    double temperature, int64_t ignore_index) {
  const at::Tensor b = defined_or_empty(bias);
  check_linear_inputs(hidden, weight, b);
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  const int64_t n = hidden.size(0), vocab = weight.size(0), h = hidden.size(1);
  const at::Tensor t = checked_targets(targets, n, vocab, ignore_index);
  const at::ScalarType acc = acc_dtype(hidden.scalar_type());
  const at::Tensor lse_c = checked_vector(lse, "lse", n, acc);
  const at::Tensor ent_c = checked_vector(entropy, "entropy", n, acc);
  const at::Tensor g_logp = checked_vector(grad_logp, "grad_logp", n, acc);
  const at::Tensor g_ent = checked_vector(grad_entropy, "grad_entropy", n, acc);
  TORCH_CHECK(!g_ent.defined() || ent_c.defined(), "entropy: needed when grad_entropy is given");
  const KeptRows kept = keep_rows(hidden, t, ignore_index, acc);
  const auto k = static_cast<int64_t>(kept.targets.size());
  const bool direct = kept.all && hidden.scalar_type() == acc;  // grad_hidden accumulates in the output itself
  const auto acc_opts = hidden.options().dtype(acc);
  Grads g{at::zeros({k, h}, acc_opts), k > 0 ? at::empty({vocab, h}, weight.options()) : at::zeros({vocab, h},
          weight.options()), b.defined() ? at::zeros({vocab}, acc_opts) : at::Tensor()};
  if (k > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_token_logprobs_bwd", [&] {
      const scalar_t scale = static_cast<scalar_t>(1.0 / temperature);
      BackwardRows<scalar_t> in{gather_kept<scalar_t>(lse_c, kept), gather_kept<scalar_t>(g_logp, kept),
                                gather_kept<scalar_t>(g_ent, kept), gather_kept<scalar_t>(ent_c, kept)};
      for (int64_t i = 0; i < k; ++i) {
        in.a[i] *= scale;
        in.b[i] *= scale;
        if (!g_ent.defined()) in.entropy[i] = 0;
      }
      backward_tiles<scalar_t>(weight, b, kept, temperature, in, g);
    });
  }
  at::Tensor grad_hidden = g.hidden;
  if (!direct) {
    grad_hidden = at::zeros({n, h}, hidden.options().memory_format(at::MemoryFormat::Contiguous));
    grad_hidden.index_copy_(0, kept.index, g.hidden.to(hidden.scalar_type()));
  }
  const at::Tensor& grad_weight = g.weight;
  OptTensor grad_bias = b.defined() ? OptTensor(g.bias.to(b.scalar_type())) : std::nullopt;
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace caprl::cpu
