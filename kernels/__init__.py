"""Triton kernels, one op per file, packaged as `caprl_core.kernels` (the "triton" backend).

Each file holds the private `@triton.jit` kernels of one op, a launcher that picks block sizes, and nothing else;
the functions exported here follow the backend contract in caprl_core/backends.py. Import this package only after
deciding on TRITON_INTERPRET: Triton reads it when the kernels are defined.
"""

from caprl_core.kernels.group_advantages import group_advantages
from caprl_core.kernels.linear_token_logprobs import linear_token_logprobs_bwd, linear_token_logprobs_fwd
from caprl_core.kernels.mcq_rewards import mcq_rewards
from caprl_core.kernels.token_logprobs import token_logprobs_bwd, token_logprobs_fwd

__all__ = [
    "group_advantages",
    "linear_token_logprobs_bwd",
    "linear_token_logprobs_fwd",
    "mcq_rewards",
    "token_logprobs_bwd",
    "token_logprobs_fwd",
]
