"""caprl-core: a lean GRPO trainer for CapRL image captioning, with fused kernels.

Public API: `caprl_core.ops` (the fused ops) and `caprl_core.reference` (their plain PyTorch definitions).
"""

__version__ = "0.1.0"
