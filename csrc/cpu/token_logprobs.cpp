// SCAFFOLD (to be replaced by the real kernel): lets the extension link while kernels are written.
#include "ops.h"
namespace caprl::cpu {
std::tuple<at::Tensor, at::Tensor, OptTensor> token_logprobs_fwd(const at::Tensor&, const at::Tensor&,
                                                                       double, int64_t, bool) {
  TORCH_CHECK(false, "token_logprobs_fwd: not implemented");
}
at::Tensor token_logprobs_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                 const OptTensor&, const OptTensor&, double, int64_t) {
  TORCH_CHECK(false, "token_logprobs_bwd: not implemented");
}
}  // namespace caprl::cpu
