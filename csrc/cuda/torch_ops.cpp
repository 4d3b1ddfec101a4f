// Torch entry points of the CUDA backend (caprl::cuda in csrc/ops.h): tensor checks, output allocation, the current
// stream, then the raw-pointer launchers of csrc/cuda/*.cu (declared in launchers.h). Compiled only where torch
// has CUDA (CAPRL_WITH_CUDA). Index values are validated by caprl_core/ops.py: checking them here would cost a
// host sync, and the kernels turn an out-of-range index into NaN rather than an out-of-bounds access.
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the same getCurrentCUDAStream() (at::cuda's is this
// one), without pulling cuBLAS/cuSPARSE/cuSOLVER headers, so this file also syntax-checks where only nvcc and the
// CUDA runtime headers are installed (the CPU dev machines: `make nvcc-check`).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "launchers.h"
#include "ops.h"

namespace caprl::cuda {
namespace {

// The CUDA type of a torch scalar type (same bits: at::BFloat16 and __nv_bfloat16 are both a uint16 of bf16).
template <typename S>
struct CudaScalar {
  using type = S;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};

template <typename S>
const typename CudaScalar<S>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaScalar<S>::type*>(t.data_ptr<S>());
}

void check_cuda_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                       at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

AdvantageScale parse_scale(const std::string& scale) {
  if (scale == "group") return AdvantageScale::kGroup;
  if (scale == "batch") return AdvantageScale::kBatch;
  TORCH_CHECK(scale == "none", "group_advantages: scale must be 'group', 'batch' or 'none', got '", scale, "'");
  return AdvantageScale::kNone;
}

// The reader head both mcq ops read: hidden [P, H], a CUDA floating tensor, and weight [V, H] of its dtype and
// device. Returns the dtype.
at::ScalarType check_reader_head(const char* op, const at::Tensor& hidden, const at::Tensor& weight) {
  TORCH_CHECK(hidden.is_cuda(), op, ": hidden must be a CUDA tensor, got ", hidden.device());
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, op, ": hidden must be [P, H] and weight [V, H], got ",
              hidden.sizes(), " and ", weight.sizes());
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": hidden must be float32, float64, bfloat16 or float16, got ", dtype);
  check_cuda_tensor(op, "weight", weight, hidden, dtype, {weight.size(0), hidden.size(1)});
  return dtype;
}

void check_mcq_args(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
                    const at::Tensor& option_ids, const at::Tensor& answers, const at::Tensor& num_options,
                    const at::Tensor& prompt_order, const at::Tensor& caption_offsets) {
  const char* op = "mcq_rewards";
  const auto dtype = check_reader_head(op, hidden, weight);
  const int64_t P = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(hidden.stride(1) == 1 || H <= 1, op, ": hidden must have a unit stride along H");
  TORCH_CHECK(weight.stride(1) == 1 || H <= 1, op, ": weight must have a unit stride along H");
  if (bias) {
    check_cuda_tensor(op, "bias", *bias, hidden, dtype, {V});
    TORCH_CHECK(bias->is_contiguous(), op, ": bias must be contiguous");
  }
  TORCH_CHECK(option_ids.dim() == 2 && option_ids.size(1) >= 1, op, ": option_ids must be [P, K], got ",
              option_ids.sizes());
  check_cuda_tensor(op, "option_ids", option_ids, hidden, at::kLong, {P, option_ids.size(1)});
  check_cuda_tensor(op, "answers", answers, hidden, at::kLong, {P});
  check_cuda_tensor(op, "num_options", num_options, hidden, at::kLong, {P});
  check_cuda_tensor(op, "prompt_order", prompt_order, hidden, at::kLong, {P});
  TORCH_CHECK(caption_offsets.dim() == 1 && caption_offsets.size(0) >= 2, op,
              ": caption_offsets must be [C + 1] with C >= 1, got ", caption_offsets.sizes());
  check_cuda_tensor(op, "caption_offsets", caption_offsets, hidden, at::kLong, {caption_offsets.size(0)});
  for (const auto* t : {&option_ids, &answers, &num_options, &prompt_order, &caption_offsets})
    TORCH_CHECK(t->is_contiguous(), op, ": index tensors must be contiguous");
}

}  // namespace

at::Tensor group_advantages(const at::Tensor& rewards, const at::Tensor& group_index, int64_t num_groups,
                            const std::string& method, const std::string& scale, const at::Tensor& weights,
                            double eps) {
  const char* op = "group_advantages";
  TORCH_CHECK(rewards.is_cuda(), op, ": rewards must be a CUDA tensor, got ", rewards.device());
  TORCH_CHECK(rewards.dim() == 2 && rewards.size(0) >= 1 && rewards.size(1) >= 1, op,
              ": rewards must be [N, R] with N, R >= 1, got ", rewards.sizes());
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble, op,
              ": rewards must be float32 or float64, got ", rewards.scalar_type());
  TORCH_CHECK(rewards.is_contiguous(), op, ": rewards must be contiguous");
  const int64_t n = rewards.size(0), num_rewards = rewards.size(1);
  check_cuda_tensor(op, "group_index", group_index, rewards, at::kLong, {n});
  check_cuda_tensor(op, "weights", weights, rewards, rewards.scalar_type(), {num_rewards});
  TORCH_CHECK(group_index.is_contiguous() && weights.is_contiguous(), op,
              ": group_index and weights must be contiguous");
  TORCH_CHECK(num_groups >= 1, op, ": num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(method == "grpo" || method == "rloo", op, ": method must be 'grpo' or 'rloo', got '", method, "'");
  const AdvantageScale how = parse_scale(scale);

  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor adv = at::empty({n}, rewards.options());  // [N]
  const size_t ws_bytes = group_advantages_workspace_bytes(num_groups, rewards.get_device());
  at::Tensor workspace;  // only when the per-group statistics do not fit in shared memory
  if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, rewards.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "group_advantages_cuda", [&] {
    const GroupAdvantagesArgs<scalar_t> args{
        rewards.data_ptr<scalar_t>(), group_index.data_ptr<int64_t>(), weights.data_ptr<scalar_t>(),
        adv.data_ptr<scalar_t>(), n, num_rewards, num_groups, method == "rloo", how, eps,
        ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes};
    check_launch(op, launch_group_advantages(args, stream));
  });
  return adv;
}

std::tuple<at::Tensor, at::Tensor> mcq_rewards(const at::Tensor& hidden, const at::Tensor& weight,
                                               const OptTensor& bias, const at::Tensor& option_ids,
                                               const at::Tensor& answers, const at::Tensor& num_options,
                                               const at::Tensor& prompt_order, const at::Tensor& caption_offsets,
                                               double temperature, const std::string& mode) {
  check_mcq_args(hidden, weight, bias, option_ids, answers, num_options, prompt_order, caption_offsets);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "mcq_rewards: temperature must be finite and > 0");
  TORCH_CHECK(mode == "hard" || mode == "soft", "mcq_rewards: mode must be 'hard' or 'soft', got '", mode, "'");
  const int64_t P = hidden.size(0), K = option_ids.size(1), C = caption_offsets.size(0) - 1;
  const auto out_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor rewards = at::empty({C}, hidden.options().dtype(out_dtype));              // [C]
  at::Tensor option_logprobs = at::empty({P, K}, hidden.options().dtype(out_dtype));  // [P, K]
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "mcq_rewards_cuda", [&] {
    using T = typename CudaScalar<scalar_t>::type;
    using A = acc_t<T>;
    const McqRewardsArgs<T> args{cuda_ptr<scalar_t>(hidden), cuda_ptr<scalar_t>(weight),
                                 bias ? cuda_ptr<scalar_t>(*bias) : nullptr, option_ids.data_ptr<int64_t>(),
                                 answers.data_ptr<int64_t>(), num_options.data_ptr<int64_t>(),
                                 prompt_order.data_ptr<int64_t>(), caption_offsets.data_ptr<int64_t>(),
                                 rewards.data_ptr<A>(), option_logprobs.data_ptr<A>(), P, hidden.size(1),
                                 weight.size(0), K, C, hidden.stride(0), weight.stride(0), temperature,
                                 mode == "soft"};
    check_launch("mcq_rewards", launch_mcq_rewards(args, stream));
  });
  return {rewards, option_logprobs};
}

namespace {

void check_vocab_args(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
                      const at::Tensor& token_options, const at::Tensor& answers, const at::Tensor& prompt_order,
                      const at::Tensor& caption_offsets, int64_t num_slots) {
  const char* op = "mcq_rewards_vocab";
  const auto dtype = check_reader_head(op, hidden, weight);
  const int64_t P = hidden.size(0), V = weight.size(0);
  TORCH_CHECK(P >= 1 && V >= 1, op, ": expected P >= 1 and V >= 1, got ", P, " and ", V);
  if (bias) check_cuda_tensor(op, "bias", *bias, hidden, dtype, {V});
  TORCH_CHECK(num_slots >= 1 && num_slots <= kMcqMaxVocabSlots, op, ": num_slots must lie in [1, ",
              kMcqMaxVocabSlots, "], got ", num_slots);
  check_cuda_tensor(op, "token_options", token_options, hidden, at::kLong, {V});
  check_cuda_tensor(op, "answers", answers, hidden, at::kLong, {P});
  check_cuda_tensor(op, "prompt_order", prompt_order, hidden, at::kLong, {P});
  TORCH_CHECK(caption_offsets.dim() == 1 && caption_offsets.size(0) >= 2, op,
              ": caption_offsets must be [C + 1] with C >= 1, got ", caption_offsets.sizes());
  check_cuda_tensor(op, "caption_offsets", caption_offsets, hidden, at::kLong, {caption_offsets.size(0)});
  for (const auto* t : {&token_options, &answers, &prompt_order, &caption_offsets})
    TORCH_CHECK(t->is_contiguous(), op, ": index tensors must be contiguous");
}

// Bytes of one logits tile, and of one weight tile upcast to the accumulation dtype: 256 MiB ([1024, 32768] fp32
// logits and [32768, 2048] fp32 weight rows: 5 tiles for V = 151,936, H = 2048). Not tuned on a GPU yet. The tile
// GEMM is at::mm in fp32 (fp64): IEEE unless the caller switched on TF32 for torch matmuls.
constexpr int64_t kVocabTileBytes = int64_t(256) << 20;

// Folds every column tile of hidden_acc @ weight.T (+ bias) into all_state [2, P] and slot_state [2, P, K].
template <typename A>
void fold_vocab_tiles(const at::Tensor& hidden_acc, const at::Tensor& weight, const OptTensor& bias,
                      const at::Tensor& token_options, double temperature, int64_t num_slots, at::Tensor& all_state,
                      at::Tensor& slot_state, cudaStream_t stream) {
  const at::ScalarType acc = hidden_acc.scalar_type();
  const int64_t P = hidden_acc.size(0), V = weight.size(0);
  // Both the logits tile [P, cols] and the upcast weight tile [cols, H] stay within kVocabTileBytes.
  const int64_t widest = std::max(P, weight.size(1)) * static_cast<int64_t>(sizeof(A));
  int64_t cols = std::max<int64_t>(64, kVocabTileBytes / widest);
  cols = cols >= V ? V : cols / 64 * 64;
  at::Tensor buffer = at::empty({P * cols}, hidden_acc.options());
  for (int64_t v0 = 0; v0 < V; v0 += cols) {
    const int64_t n = std::min(cols, V - v0);
    at::Tensor z = buffer.narrow(0, 0, P * n).view({P, n});  // [P, n], on the current stream as our kernels
    const at::Tensor w_tile = weight.narrow(0, v0, n).to(acc);  // [n, H]; exact upcast of bf16/fp16
    if (bias) {
      at::addmm_out(z, bias->narrow(0, v0, n).to(acc), hidden_acc, w_tile.t());
    } else {
      at::mm_out(z, hidden_acc, w_tile.t());
    }
    const McqVocabFoldArgs<A> args{z.data_ptr<A>(), token_options.data_ptr<int64_t>() + v0,
                                   all_state.data_ptr<double>(), slot_state.data_ptr<double>(), 0, P, n, P,
                                   num_slots, temperature};
    check_launch("mcq_rewards_vocab", launch_mcq_vocab_fold(args, stream));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mcq_rewards_vocab(const at::Tensor& hidden, const at::Tensor& weight,
                                                     const OptTensor& bias, const at::Tensor& token_options,
                                                     const at::Tensor& answers, const at::Tensor& prompt_order,
                                                     const at::Tensor& caption_offsets, int64_t num_slots,
                                                     double temperature, const std::string& mode) {
  check_vocab_args(hidden, weight, bias, token_options, answers, prompt_order, caption_offsets, num_slots);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "mcq_rewards_vocab: temperature must be finite and > 0");
  TORCH_CHECK(mode == "hard" || mode == "soft", "mcq_rewards_vocab: mode must be 'hard' or 'soft', got '", mode, "'");
  const int64_t P = hidden.size(0), C = caption_offsets.size(0) - 1;
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto state_options = hidden.options().dtype(at::kDouble);
  at::Tensor all_state = at::empty({2, P}, state_options);  // [2, P]: max (-inf), sum (0)
  at::Tensor slot_state = at::empty({2, P, num_slots}, state_options);  // [2, P, K]
  for (at::Tensor* state : {&all_state, &slot_state}) {
    (*state)[0].fill_(-std::numeric_limits<double>::infinity());
    (*state)[1].zero_();
  }
  at::Tensor rewards = at::empty({C}, hidden.options().dtype(acc));                    // [C]
  at::Tensor option_logprobs = at::empty({P, num_slots}, hidden.options().dtype(acc));  // [P, K]
  const at::Tensor hidden_acc = hidden.to(acc);                                         // [P, H]
  if (acc == at::kDouble) {
    fold_vocab_tiles<double>(hidden_acc, weight, bias, token_options, temperature, num_slots, all_state, slot_state,
                             stream);
    const McqVocabFinishArgs<double> args{all_state.data_ptr<double>(), slot_state.data_ptr<double>(),
                                          answers.data_ptr<int64_t>(), prompt_order.data_ptr<int64_t>(),
                                          caption_offsets.data_ptr<int64_t>(), rewards.data_ptr<double>(),
                                          option_logprobs.data_ptr<double>(), P, num_slots, C, mode == "soft"};
    check_launch("mcq_rewards_vocab", launch_mcq_vocab_finish(args, stream));
  } else {
    fold_vocab_tiles<float>(hidden_acc, weight, bias, token_options, temperature, num_slots, all_state, slot_state,
                            stream);
    const McqVocabFinishArgs<float> args{all_state.data_ptr<double>(), slot_state.data_ptr<double>(),
                                         answers.data_ptr<int64_t>(), prompt_order.data_ptr<int64_t>(),
                                         caption_offsets.data_ptr<int64_t>(), rewards.data_ptr<float>(),
                                         option_logprobs.data_ptr<float>(), P, num_slots, C, mode == "soft"};
    check_launch("mcq_rewards_vocab", launch_mcq_vocab_finish(args, stream));
  }
  return {rewards, option_logprobs};
}

}  // namespace caprl::cuda
