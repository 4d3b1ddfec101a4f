"""fp32 master weights for a model that computes in bf16: the optimizer never steps low-precision weights.

    optimizer = MasterWeightOptimizer(policy, lambda params: torch.optim.AdamW(params, lr=1e-6))
    for micro_batch in batch:
        loss(micro_batch).backward()         # each (bf16) gradient is added to the fp32 master's gradient, then freed
    grad_norm = optimizer.step(max_grad_norm=1.0)  # clip -> AdamW on fp32 masters -> copy into the model -> free grads

Why: bf16 keeps 8 significant bits, so a weight w only changes when the update exceeds about |w| * 2**-9. At the
CapRL recipe's lr 1e-6 an AdamW update is ~1e-6 per weight, below that for any weight above ~5e-4 in magnitude:
stepping bf16 weights directly changed about 2% of them after 20 steps (issue 9), fp32 99.98%. Here the optimizer
holds an fp32 copy of every low-precision parameter (and fp32 state), accumulates the small updates there, and the
model gets the rounded result after every step. Parameters that are already fp32 are their own masters (no copy).

Gradients accumulate in fp32 too: a hook after each backward's accumulation adds the low-precision `p.grad` to the
master's fp32 gradient and frees it. Summing micro-batch gradients in the bf16 `p.grad` instead was off the fp32 sum
by 0.0036 / 0.0065 / 0.0118 (relative) over 8 / 32 / 128 micro-batches on a bf16 Linear(256, 256) (issue 22), and
FSDP reduces in fp32, so one process and N ranks stepped different gradients. All gradients are freed once the
optimizer has stepped: the fp32 ones are 4 bytes per parameter (15 GB for a 3.75 B policy) that the rollout needs.

A step whose total gradient norm is not finite is skipped: no optimizer step, no copy into the model, gradients
dropped (`last_step_skipped`, `consecutive_skips`); one inf would otherwise make every weight NaN.

The model keeps its dtype for every forward pass, so the sampler and the training forward compute in the same
dtype. `state_dict()` holds the inner optimizer's state and the fp32 masters (tensors only, so the pickle-free
checkpoint writer stores them as safetensors): a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


class NonFiniteGradientError(RuntimeError):
    """Too many optimizer steps in a row were skipped for a non-finite gradient norm: the run cannot recover."""


class MasterWeightOptimizer:
    """An optimizer over fp32 masters of `model`'s trainable parameters (see the module docstring).

    make_optimizer: builds the inner optimizer from a list of fp32 tensors (e.g. `lambda p: torch.optim.AdamW(p)`).
    The inner optimizer is `self.optimizer`: give it to LR schedulers."""

    def __init__(self, model: torch.nn.Module, make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: has no trainable parameters")
        if any(p.dtype == torch.float16 for p in self.params):
            # fp16 needs loss scaling, which this optimizer does not do: 51.6% of the non-zero fp32 gradients of a tiny
            # Qwen2 at a per-token weight of 8e-7 underflowed to 0 in fp16 (issue 22). bf16 has fp32's range.
            raise ValueError("model: float16 parameters train without loss scaling here; compute in bfloat16")
        self.masters = [self._master(p) for p in self.params]
        self.optimizer = make_optimizer(self.masters)
        self.last_step_skipped = False
        self.consecutive_skips = 0
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p:
                p.register_post_accumulate_grad_hook(_adder_into(m))

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
        """Clip the masters' fp32 gradients to a total norm of `max_grad_norm` (None: no clipping), step, copy the
        masters into the model and free every gradient. A non-finite norm skips the step and the copy (the
        gradients are freed all the same). Returns the total gradient norm before clipping (fp32, a plain tensor)."""
        self._collect_unhooked()
        grads = [m.grad for m in self.masters if m.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        full = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()  # a DTensor under FSDP
        self.last_step_skipped = not bool(torch.isfinite(full))
        self.consecutive_skips = self.consecutive_skips + 1 if self.last_step_skipped else 0
        if not self.last_step_skipped:
            if max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(grads, max_grad_norm, norm)
            self.optimizer.step()
            self._copy_to_model()
        self.zero_grad()
        return full

    def _collect_unhooked(self) -> None:
        """Gradients that reached a low-precision `p.grad` without the hook (set by hand, not by a backward)."""
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p and p.grad is not None:
                _adder_into(m)(p)

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
    def load_state_dict(self, state: dict, fp32_weights: Callable[[], list[torch.Tensor]] | None = None) -> None:
        """Restore `state_dict()`. A state saved where a parameter was fp32 (a torchrun run's, or an fp32 run's) has
        no master copy for it: `fp32_weights()` then gives the saved fp32 weights of every trainable parameter (in
        `self.params` order), which become the masters."""
        if set(state) != {"optimizer", "masters"} or len(state["masters"]) != len(self.masters):
            raise ValueError(f"expected a MasterWeightOptimizer state with {len(self.masters)} masters")
        saved = list(state["masters"])
        missing = [i for i, (p, m, s) in enumerate(zip(self.params, self.masters, saved, strict=True))
                   if s is None and m is not p]  # fmt: skip
        if missing:
            weights = fp32_weights() if fp32_weights is not None else None
            for i in missing:
                if weights is None or weights[i].dtype != torch.float32:
                    raise ValueError(f"master {i}: the checkpoint holds neither an fp32 master nor fp32 weights "
                                     f"for this {self.params[i].dtype} parameter")  # fmt: skip
                saved[i] = weights[i]
        for i, (m, s) in enumerate(zip(self.masters, saved, strict=True)):
            if s is not None:  # into an fp32 parameter too: the saved master is more exact than the saved bf16 weight
                if s.shape != m.shape:
                    raise ValueError(f"master {i}: shape {tuple(s.shape)}, expected {tuple(m.shape)}")
                m.copy_(s)
        self.optimizer.load_state_dict(state["optimizer"])
        self._copy_to_model()


def _adder_into(master: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook: add the parameter's low-precision gradient (this backward's only: it was freed
    after the last one) to `master.grad` in fp32, and free it."""

    def add(p: torch.Tensor) -> None:
        grad = p.grad.float()
        if master.grad is None:
            master.grad = grad
        else:
            master.grad.add_(grad)
        p.grad = None

    return add
