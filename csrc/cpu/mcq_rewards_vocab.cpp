// C++/OpenMP kernel of mcq_rewards with normalize="vocab" (backend op mcq_rewards_vocab): the mass of each option
// slot's tokens under softmax(logits / T) over the whole vocabulary, then hard/soft scores and per-caption means.
// Definition: caprl_core/reference.py::mcq_vocab_logprobs; backend contract: caprl_core/backends.py.
//
// One pass over V in column tiles, never holding [P, V] logits (the machinery of linear_token_logprobs.cpp): for
// each tile z = h W_tile^T (+ b_tile), [P, cols] fp32 (fp64 for fp64 inputs) made by MKL through at::mm, then per
// row, while the tile is in cache:
//   - fold_row (common.h) folds all cols into the row's running log-sum-exp over the vocabulary;
//   - the tokens that decide a slot (token_options >= 0; usually a few dozen of the 151,936) are visited from a
//     column-sorted list: a max per slot, then a sum of exp per slot, merged into one running (max, sum) per slot.
// option_logprobs[p, k] = lse_k - lse_all, in double. Cost: the 2 P V H flops of the projection (MKL), plus
// O(P (V + slot tokens)) for the folds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace caprl::cpu {
namespace {

// Bytes of one logits tile, as in linear_token_logprobs.cpp (64 MiB: MKL's rate is flat from 2,048 columns up).
constexpr int64_t kTileBytes = int64_t(64) << 20;
constexpr int64_t kMaxSlots = 16;  // caprl_core.ops.MCQ_MAX_VOCAB_SLOTS

// The tokens that decide a slot, sorted by column.
struct SlotTokens {
  std::vector<int64_t> col, slot;
};

SlotTokens slot_tokens(const at::Tensor& token_options, int64_t num_slots) {
  SlotTokens st;
  const int64_t* opt = token_options.data_ptr<int64_t>();
  for (int64_t v = 0; v < token_options.size(0); ++v) {
    TORCH_CHECK(opt[v] >= -1 && opt[v] < num_slots, "mcq_rewards_vocab: token_options must lie in [-1, K=",
                num_slots, "), got ", opt[v], " at index ", v);
    if (opt[v] >= 0) {
      st.col.push_back(v);
      st.slot.push_back(opt[v]);
    }
  }
  return st;
}

// Merges a partial (max m, sum s = sum exp(z - m)) into a running log-sum-exp.
inline void merge(LseState& st, double m, double s) {
  if (!(s > 0)) return;  // no mass in this part
  if (m > st.m) {
    st.s = st.s * std::exp(st.m - m) + s;  // exp(-inf) = 0 while st is empty
    st.m = m;
  } else {
    st.s += s * std::exp(m - st.m);
  }
}

// Folds the slot tokens with columns in [v0, v0 + cols) of one row of z (unscaled logits) into slots[0, K).
template <typename acc_t>
void fold_slots(const acc_t* z, int64_t v0, acc_t scale, const SlotTokens& tok, int64_t begin, int64_t end,
                LseState* slots) {
  acc_t m[kMaxSlots], s[kMaxSlots];
  std::fill(m, m + kMaxSlots, -std::numeric_limits<acc_t>::infinity());
  std::fill(s, s + kMaxSlots, acc_t(0));
  for (int64_t i = begin; i < end; ++i) m[tok.slot[i]] = std::max(m[tok.slot[i]], z[tok.col[i] - v0] * scale);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t k = tok.slot[i];
    if (m[k] > -std::numeric_limits<acc_t>::infinity()) s[k] += std::exp(z[tok.col[i] - v0] * scale - m[k]);
  }
  for (int64_t k = 0; k < kMaxSlots; ++k) merge(slots[k], m[k], s[k]);
}

// Running states of every row: the whole vocabulary [P] and each slot [P, kMaxSlots].
struct VocabState {
  std::vector<LseState> all, slots;
};

template <typename acc_t>
void vocab_pass(const at::Tensor& hidden_acc, const at::Tensor& weight, const at::Tensor& bias, double temperature,
                const SlotTokens& tok, VocabState& st) {
  const at::ScalarType acc = hidden_acc.scalar_type();
  const int64_t P = hidden_acc.size(0), V = weight.size(0);
  const int64_t rows = std::min<int64_t>(P, 4096);  // rows per block: more re-read each weight tile
  int64_t cols = std::max<int64_t>(64, kTileBytes / (rows * static_cast<int64_t>(sizeof(acc_t))));
  cols = cols >= V ? V : cols / 64 * 64;
  at::Tensor buffer = at::empty({rows * cols}, hidden_acc.options());
  const acc_t scale = static_cast<acc_t>(1.0 / temperature);
  for (int64_t v0 = 0; v0 < V; v0 += cols) {
    const int64_t n = std::min(cols, V - v0);
    const at::Tensor w_tile = weight.narrow(0, v0, n).to(acc);  // [n, H]; a view for fp32/fp64
    // slot tokens of this tile: [t_begin, t_end) of the sorted list
    const int64_t t_begin = std::lower_bound(tok.col.begin(), tok.col.end(), v0) - tok.col.begin();
    const int64_t t_end = std::lower_bound(tok.col.begin(), tok.col.end(), v0 + n) - tok.col.begin();
    for (int64_t r0 = 0; r0 < P; r0 += rows) {
      const int64_t r = std::min(rows, P - r0);
      at::Tensor z = buffer.narrow(0, 0, r * n).view({r, n});  // [r, n] logits of rows r0.., columns v0..
      if (bias.defined()) {
        at::addmm_out(z, bias.narrow(0, v0, n).to(acc), hidden_acc.narrow(0, r0, r), w_tile.t());
      } else {
        at::mm_out(z, hidden_acc.narrow(0, r0, r), w_tile.t());
      }
      const acc_t* zp = z.data_ptr<acc_t>();
      at::parallel_for(0, r, 1, [&](int64_t begin, int64_t end) {
        alignas(64) acc_t buf[kL1Block];
        for (int64_t i = begin; i < end; ++i) {
          fold_row<acc_t, acc_t, false>(st.all[r0 + i], zp + i * n, n, scale, buf);
          fold_slots<acc_t>(zp + i * n, v0, scale, tok, t_begin, t_end, &st.slots[(r0 + i) * kMaxSlots]);
        }
      });
    }
  }
}

// option_logprobs [P, K] and scores [P] from the running states; hard compares the slots' log-sum-exps in double.
template <typename A>
void finish(const VocabState& st, const int64_t* answers, int64_t P, int64_t K, bool soft, A* logprobs, double* score) {
  for (int64_t p = 0; p < P; ++p) {
    const double lse_all = st.all[p].lse();
    const LseState* slots = &st.slots[p * kMaxSlots];
    bool strict_best = true;  // ties lose; a slot without tokens (-inf) never wins
    for (int64_t k = 0; k < K; ++k) {
      logprobs[p * K + k] = static_cast<A>(slots[k].lse() - lse_all);
      if (k != answers[p] && !(slots[answers[p]].lse() > slots[k].lse())) strict_best = false;
    }
    score[p] = soft ? std::exp(static_cast<double>(logprobs[p * K + answers[p]])) : (strict_best ? 1.0 : 0.0);
  }
}

void check_vocab_args(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
                      const at::Tensor& token_options, const at::Tensor& answers, const at::Tensor& prompt_order,
                      const at::Tensor& caption_offsets, int64_t num_slots) {
  check_rows(hidden, "hidden");
  check_rows(weight, "weight");
  const int64_t P = hidden.size(0), V = weight.size(0);
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "hidden: expected a float dtype, got ", hidden.scalar_type());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type() && weight.size(1) == hidden.size(1) && V >= 1,
              "weight: expected [V >= 1, ", hidden.size(1), "] of dtype ", hidden.scalar_type(), ", got ",
              weight.sizes(), " ", weight.scalar_type());
  if (bias && bias->defined())
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type() && bias->dim() == 1 && bias->size(0) == V &&
                    bias->device().is_cpu(),
                "bias: expected a CPU [", V, "] tensor of dtype ", hidden.scalar_type());
  TORCH_CHECK(num_slots >= 1 && num_slots <= kMaxSlots, "num_slots: expected [1, ", kMaxSlots, "], got ", num_slots);
  TORCH_CHECK(token_options.scalar_type() == at::kLong && token_options.dim() == 1 && token_options.size(0) == V &&
                  token_options.is_contiguous() && token_options.device().is_cpu(),
              "token_options: expected contiguous int64 [", V, "] on the CPU, got ", token_options.sizes());
  for (const auto* t : {&answers, &prompt_order})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == P && t->is_contiguous() &&
                    t->device().is_cpu(),
                "answers, prompt_order: expected contiguous int64 [", P, "] on the CPU");
  TORCH_CHECK(caption_offsets.scalar_type() == at::kLong && caption_offsets.dim() == 1 &&
                  caption_offsets.size(0) >= 2 && caption_offsets.is_contiguous(),
              "caption_offsets: expected contiguous int64 [C + 1]");
  const int64_t *ans = answers.data_ptr<int64_t>(), *order = prompt_order.data_ptr<int64_t>();
  const int64_t *off = caption_offsets.data_ptr<int64_t>(), C = caption_offsets.size(0) - 1;
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(ans[p] >= 0 && ans[p] < num_slots, "answers: expected [0, K=", num_slots, "), got ", ans[p]);
    TORCH_CHECK(order[p] >= 0 && order[p] < P, "prompt_order: expected [0, P=", P, "), got ", order[p]);
  }
  TORCH_CHECK(off[0] == 0 && off[C] == P, "caption_offsets: expected 0 to P=", P);
  for (int64_t c = 0; c < C; ++c) TORCH_CHECK(off[c + 1] > off[c], "caption_offsets: caption ", c, " has no prompts");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mcq_rewards_vocab(const at::Tensor& hidden, const at::Tensor& weight,
                                                     const OptTensor& bias, const at::Tensor& token_options,
                                                     const at::Tensor& answers, const at::Tensor& prompt_order,
                                                     const at::Tensor& caption_offsets, int64_t num_slots,
                                                     double temperature, const std::string& mode) {
  check_vocab_args(hidden, weight, bias, token_options, answers, prompt_order, caption_offsets, num_slots);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "temperature: expected finite and > 0");
  TORCH_CHECK(mode == "hard" || mode == "soft", "mode: expected 'hard' or 'soft', got '", mode, "'");
  const int64_t P = hidden.size(0), C = caption_offsets.size(0) - 1;
  const at::ScalarType acc = acc_dtype(hidden.scalar_type());
  const SlotTokens tok = slot_tokens(token_options, num_slots);
  at::Tensor rewards = at::empty({C}, hidden.options().dtype(acc));                  // [C]
  at::Tensor option_logprobs = at::empty({P, num_slots}, hidden.options().dtype(acc));  // [P, K]
  const at::Tensor b = bias && bias->defined() ? *bias : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "mcq_rewards_vocab", [&] {
    VocabState st{std::vector<LseState>(P), std::vector<LseState>(P * kMaxSlots)};
    vocab_pass<scalar_t>(hidden.to(acc), weight, b, temperature, tok, st);  // hidden [P, H] in acc dtype
    std::vector<double> score(P);
    finish<scalar_t>(st, answers.data_ptr<int64_t>(), P, num_slots, mode == "soft", option_logprobs.data_ptr<scalar_t>(),
                     score.data());
    const int64_t *order = prompt_order.data_ptr<int64_t>(), *off = caption_offsets.data_ptr<int64_t>();
    for (int64_t c = 0; c < C; ++c) {  // in caption order: rewards do not depend on the number of threads
      double total = 0;
      for (int64_t j = off[c]; j < off[c + 1]; ++j) total += score[order[j]];
      rewards.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(total / static_cast<double>(off[c + 1] - off[c]));
    }
  });
  return {rewards, option_logprobs};
}

}  // namespace caprl::cpu
