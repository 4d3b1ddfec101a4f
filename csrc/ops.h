// Torch-facing entry points of the C++ backends; the contract is in caprl_core/backends.py (2-D, validated,
// last-dim-contiguous inputs; fp32 outputs, fp64 for fp64 inputs). The Python layer checks arguments first;
// these functions re-check only what would make a kernel read out of bounds (shapes, dtypes, devices).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

using OptTensor = std::optional<at::Tensor>;

namespace caprl::cpu {  // csrc/cpu/<op>.cpp

std::tuple<at::Tensor, at::Tensor, OptTensor> token_logprobs_fwd(const at::Tensor& logits,
                                                                       const at::Tensor& targets,
                                                                       double temperature, int64_t ignore_index,
                                                                       bool return_entropy);
at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                 const OptTensor& entropy, const OptTensor& grad_logp, const OptTensor& grad_entropy,
                                 double temperature, int64_t ignore_index);

std::tuple<at::Tensor, at::Tensor, OptTensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& targets,
    double temperature, int64_t ignore_index, bool return_entropy);
std::tuple<at::Tensor, at::Tensor, OptTensor> linear_token_logprobs_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& targets,
    const at::Tensor& lse, const OptTensor& entropy, const OptTensor& grad_logp, const OptTensor& grad_entropy,
    double temperature, int64_t ignore_index);

at::Tensor group_advantages(const at::Tensor& rewards, const at::Tensor& group_index, int64_t num_groups,
                               const std::string& method, const std::string& scale, const at::Tensor& weights,
                               double eps);

std::tuple<at::Tensor, at::Tensor> mcq_rewards(const at::Tensor& hidden, const at::Tensor& weight,
                                                     const OptTensor& bias, const at::Tensor& option_ids,
                                                     const at::Tensor& answers, const at::Tensor& num_options,
                                                     const at::Tensor& prompt_order,
                                                     const at::Tensor& caption_offsets, double temperature,
                                                     const std::string& mode);
std::tuple<at::Tensor, at::Tensor> mcq_rewards_vocab(const at::Tensor& hidden, const at::Tensor& weight,
                                                     const OptTensor& bias, const at::Tensor& token_options,
                                                     const at::Tensor& answers, const at::Tensor& prompt_order,
                                                     const at::Tensor& caption_offsets, int64_t num_slots,
                                                     double temperature, const std::string& mode);

}  // namespace caprl::cpu

#ifdef CAPRL_WITH_CUDA
namespace caprl::cuda {  // csrc/cuda/torch_ops.cpp, kernels in csrc/cuda/<op>.cu

at::Tensor group_advantages(const at::Tensor& rewards, const at::Tensor& group_index, int64_t num_groups,
                               const std::string& method, const std::string& scale, const at::Tensor& weights,
                               double eps);

std::tuple<at::Tensor, at::Tensor> mcq_rewards(const at::Tensor& hidden, const at::Tensor& weight,
                                                     const OptTensor& bias, const at::Tensor& option_ids,
                                                     const at::Tensor& answers, const at::Tensor& num_options,
                                                     const at::Tensor& prompt_order,
                                                     const at::Tensor& caption_offsets, double temperature,
                                                     const std::string& mode);
std::tuple<at::Tensor, at::Tensor> mcq_rewards_vocab(const at::Tensor& hidden, const at::Tensor& weight,
                                                     const OptTensor& bias, const at::Tensor& token_options,
                                                     const at::Tensor& answers, const at::Tensor& prompt_order,
                                                     const at::Tensor& caption_offsets, int64_t num_slots,
                                                     double temperature, const std::string& mode);

}  // namespace caprl::cuda
#endif
