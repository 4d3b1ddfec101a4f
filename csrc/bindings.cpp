// The one pybind11 module of caprl-core: submodule `cpu` always, `cuda` when built with CAPRL_WITH_CUDA.
// Built just in time by caprl_core/_build.py; called through caprl_core/ops.py, never directly.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  auto cpu = m.def_submodule("cpu", "C++/OpenMP kernels for CPU tensors");
  cpu.def("token_logprobs_fwd", &caprl::cpu::token_logprobs_fwd);
  cpu.def("token_logprobs_bwd", &caprl::cpu::token_logprobs_bwd);
  cpu.def("linear_token_logprobs_fwd", &caprl::cpu::linear_token_logprobs_fwd);
  cpu.def("linear_token_logprobs_bwd", &caprl::cpu::linear_token_logprobs_bwd);
  cpu.def("group_advantages", &caprl::cpu::group_advantages);
  cpu.def("mcq_rewards", &caprl::cpu::mcq_rewards);
  cpu.def("mcq_rewards_vocab", &caprl::cpu::mcq_rewards_vocab);
#ifdef CAPRL_WITH_CUDA
  auto cuda = m.def_submodule("cuda", "CUDA kernels for CUDA tensors");
  cuda.def("group_advantages", &caprl::cuda::group_advantages);
  cuda.def("mcq_rewards", &caprl::cuda::mcq_rewards);
  cuda.def("mcq_rewards_vocab", &caprl::cuda::mcq_rewards_vocab);
#endif
}
