"""fp32 master weights for a model that computes in bf16 (or fp16): the optimizer never steps low-precision weights.

    optimizer = MasterWeightOptimizer(policy, lambda params: torch.optim.AdamW(params, lr=1e-6))
    loss.backward()                          # gradients land on the model's (bf16) parameters
    grad_norm = optimizer.step(max_grad_norm=1.0)  # fp32 grads -> clip -> AdamW on fp32 masters -> copy into the model
    optimizer.zero_grad()

Why: bf16 keeps 8 significant bits, so a weight w only changes when the update exceeds about |w| * 2**-9. At the
CapRL recipe's lr 1e-6 an AdamW update is ~1e-6 per weight, below that for any weight above ~5e-4 in magnitude:
stepping bf16 weights directly changed about 2% of them after 20 steps (issue 9), fp32 99.98%. Here the optimizer
holds an fp32 copy of every low-precision parameter (and fp32 state), accumulates the small updates there, and the
model gets the rounded result after every step. Parameters that are already fp32 are their own masters (no copy).

The model keeps its dtype for every forward pass, so the sampler and the training forward compute in the same
dtype. `state_dict()` holds the inner optimizer's state and the fp32 masters (tensors only, so the pickle-free
checkpoint writer stores them as safetensors): a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightOptimizer:
    """An optimizer over fp32 masters of `model`'s trainable parameters (see the module docstring).

    make_optimizer: builds the inner optimizer from a list of fp32 tensors (e.g. `lambda p: torch.optim.AdamW(p)`).
    The inner optimizer is `self.optimizer`: give it to LR schedulers."""

    def __init__(self, model: torch.nn.Module, make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: has no trainable parameters")
        self.masters = [self._master(p) for p in self.params]
        self.optimizer = make_optimizer(self.masters)

    @staticmethod
    def _master(p: torch.Tensor) -> torch.Tensor:
        if p.dtype not in LOW_PRECISION:
            return p  # fp32 (or fp64) parameters are stepped in place
        return torch.nn.Parameter(p.detach().float().clone())

    @property
    def has_copies(self) -> bool:
        """Whether any parameter is stepped through an fp32 copy (the model computes in low precision)."""
        return any(m is not p for p, m in zip(self.params, self.masters, strict=True))

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            p.grad = None
            m.grad = None

    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None) -> torch.Tensor:
        """Move the gradients to the fp32 masters, clip their total norm to `max_grad_norm` (None: no clipping),
        step, and copy the masters into the model. Returns the total gradient norm before clipping (fp32)."""
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        with_grad = [m for m in self.masters if m.grad is not None]
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([m.grad for m in with_grad]) if with_grad else torch.zeros(())
        self.optimizer.step()
        self._copy_to_model()
        return norm.float()

    @torch.no_grad()
    def _copy_to_model(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p:
                p.copy_(m)  # round to nearest into the model's dtype

    def master_state(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """(model parameter, its fp32 master) pairs, for inspection and tests."""
        return zip(self.params, self.masters, strict=True)

    def state_dict(self) -> dict:
        # Only the copies are stored: an fp32 parameter's master is the parameter, saved with the model's weights.
        masters = [m.detach() if m is not p else None for p, m in zip(self.params, self.masters, strict=True)]
        return {"optimizer": self.optimizer.state_dict(), "masters": masters}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"optimizer", "masters"} or len(state["masters"]) != len(self.masters):
            raise ValueError(f"expected a MasterWeightOptimizer state with {len(self.masters)} masters")
        for i, (p, m, saved) in enumerate(zip(self.params, self.masters, state["masters"], strict=True)):
            if (saved is None) != (m is p):
                raise ValueError(f"master {i}: saved for a {'fp32' if saved is None else 'low-precision'} parameter, "
                                 f"this one is {p.dtype}")  # fmt: skip
            if saved is not None:
                if saved.shape != m.shape:
                    raise ValueError(f"master {i}: shape {tuple(saved.shape)}, expected {tuple(m.shape)}")
                m.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self._copy_to_model()
