// SCAFFOLD (to be replaced by the real kernel): lets the extension link while kernels are written.
#include "ops.h"
namespace caprl::cpu {
std::tuple<at::Tensor, at::Tensor> mcq_rewards(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, double,
                                                     const std::string&) {
  TORCH_CHECK(false, "mcq_rewards: not implemented");
}
}  // namespace caprl::cpu
