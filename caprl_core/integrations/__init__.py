"""Our fused ops and our reward inside other trainers: `trl` (TRL's GRPOTrainer computing its per-token log-probs
with `caprl_core.ops.linear_token_logprobs`) and `verl` (the CapRL reward as a verl `custom_reward_function`).

Each submodule imports its trainer only when imported itself, so `import caprl_core.integrations` needs neither.
"""
