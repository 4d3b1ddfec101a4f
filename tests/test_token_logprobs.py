"""ops.token_logprobs on every backend against caprl_core.reference in fp64: forward (log-probs and entropy) and
backward with random upstream gradients, gradcheck in fp64, and the odd shapes of docs/install.md (V = 151,936 and
primes, N = 1, strided rows, leading batch dims, all-negative logits, ignored tokens, T != 1).

Run: pytest tests/test_token_logprobs.py -k "torch or triton" --durations=10
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import require_backend

from caprl_core import backends, ops, reference

IGNORE = -100
# (leading shape, V): N = 1; a prime vocab; leading batch dims; the Qwen2.5 vocab (N tiny: the interpreter is slow)
SHAPES = [((1,), 7), ((5,), 1009), ((2, 3), 257), ((2,), 151936)]
# A training micro-batch's shape, on CUDA only (deselected without it): the kernels' real grid and chunking.
GPU_SHAPE = pytest.param((2048,), 151936, id="gpu-2048x151936", marks=pytest.mark.gpu)
# (dtype, atol, rtol) against the fp64 reference on the same (rounded) inputs, for logp, entropy and grad_logits.
TOLERANCES = [
    # fp32: the op's acceptance bound is 1e-5 absolute on log-probs. A 151,936-term logsumexp carries ~1e-6
    # (measured <= 2e-6); each gradient entry is p * (...) of O(1) fp32 terms, with no sum over V but the lse.
    # The entropy (~5 nats) is a 151,936-term sum of p * log p: PyTorch's own fp32 reference is 1e-4 (2e-5
    # relative) off there, so entropy gets 10 x rtol (see ENTROPY_RTOL_FACTOR).
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    # fp64: only the summation order differs from the reference (measured <= 1e-14).
    pytest.param(torch.float64, 1e-10, 1e-10, id="fp64"),
]
ENTROPY_RTOL_FACTOR = 10


def token_logprobs(backend: str, logits: torch.Tensor, targets: torch.Tensor, **kwargs):
    """ops.token_logprobs run by exactly `backend`: a fallback to another backend fails the test."""
    require_backend(backend, "token_logprobs", logits.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"caprl_core\.token_logprobs: backend", category=UserWarning)
        assert backends.select("token_logprobs", logits.device, backend) == backend
        return ops.token_logprobs(logits, targets, backend=backend, **kwargs)


def make_logits(shape, dtype, device, *, scale=3.0, offset=0.0, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(device, dtype)


def make_targets(shape, vocab: int, device, *, seed=1) -> torch.Tensor:
    """Random ids with every third token (from the second on) set to IGNORE; N = 1 keeps its one real target."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets.view(-1)[1::3] = IGNORE
    return targets.to(device)


def forward_backward(fn, logits, targets, grad_logp, grad_entropy, **kwargs):
    """(logp, entropy, d(sum(grad_logp * logp + grad_entropy * entropy)) / d logits) of fn."""
    x = logits.detach().requires_grad_()
    logp, entropy = fn(x, targets, return_entropy=True, **kwargs)
    (logp * grad_logp + entropy * grad_entropy).sum().backward()
    return logp.detach(), entropy.detach(), x.grad


def fp64_reference(logits, targets, grad_logp, grad_entropy, **kwargs):
    """The trusted answer: the reference in fp64 on the inputs as the kernel sees them (already rounded)."""
    return forward_backward(
        reference.token_logprobs, logits.double(), targets, grad_logp.double(), grad_entropy.double(), **kwargs
    )


def upstream_grads(shape, device, seed=2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device)


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected).abs().max().item()


def assert_ignored_exact(targets, logp, entropy, grad) -> None:
    """Ignored tokens: logp and entropy exactly 0, and exactly no gradient."""
    ignored = targets == IGNORE
    assert torch.equal(logp[ignored], torch.zeros_like(logp[ignored]))
    assert torch.equal(entropy[ignored], torch.zeros_like(entropy[ignored]))
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))


def check_against_reference(backend, logits, targets, atol, rtol, grad_atol=None, **kwargs) -> None:
    grad_logp, grad_entropy = upstream_grads(targets.shape, logits.device)
    acc = reference.acc_dtype(logits.dtype)
    fn = lambda *a, **k: token_logprobs(backend, *a, **k)
    logp, entropy, grad = forward_backward(fn, logits, targets, grad_logp.to(acc), grad_entropy.to(acc), **kwargs)
    ref_logp, ref_entropy, ref_grad = fp64_reference(logits, targets, grad_logp, grad_entropy, **kwargs)
    assert logp.dtype == entropy.dtype == acc and logp.shape == targets.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=rtol)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=atol, rtol=rtol * ENTROPY_RTOL_FACTOR)
    torch.testing.assert_close(grad.double(), ref_grad, atol=grad_atol or atol, rtol=rtol)
    assert_ignored_exact(targets, logp, entropy, grad)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(
    "lead, vocab", [*(pytest.param(s, v, id=f"{'x'.join(map(str, s))}x{v}") for s, v in SHAPES), GPU_SHAPE]
)
def test_matches_reference(backend, device, lead, vocab, temperature, dtype, atol, rtol):
    logits = make_logits((*lead, vocab), dtype, device)
    targets = make_targets(lead, vocab, device)
    check_against_reference(backend, logits, targets, atol, rtol, temperature=temperature, ignore_index=IGNORE)


def test_fp32_logprob_error_within_1e_5(backend, device):
    """The acceptance bound, stated on its own: max |logp - fp64 reference| <= 1e-5 at the Qwen2.5 vocab."""
    logits = make_logits((2, 151936), torch.float32, device, scale=8.0)
    targets = make_targets((2,), 151936, device)
    logp = token_logprobs(backend, logits, targets, ignore_index=IGNORE)
    assert max_err(logp, reference.token_logprobs(logits.double(), targets, ignore_index=IGNORE)) <= 1e-5


def native(logits, targets, grad_logp, grad_entropy, temperature):
    """The same computation done by PyTorch in the input's own precision (bf16 / fp16): the error budget."""
    x = logits.detach().requires_grad_()
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    keep = targets != IGNORE
    logp = logp_all.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    entropy = -(logp_all.exp() * logp_all).sum(-1) * keep
    (logp.float() * grad_logp + entropy.float() * grad_entropy).sum().backward()
    return logp.detach(), entropy.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lead, vocab", [pytest.param((5,), 1009, id="5x1009"), pytest.param((2,), 151936, id="2x151936"), GPU_SHAPE]
)
def test_low_precision_within_twice_native_error(backend, device, lead, vocab, dtype):
    """bf16/fp16 logits: the kernel may be at most 2x as far from the fp64 reference as PyTorch's own computation
    in that dtype (flash-attention's criterion), for logp, entropy and grad_logits."""
    logits = make_logits((*lead, vocab), dtype, device)
    targets = make_targets(lead, vocab, device)
    grad_logp, grad_entropy = upstream_grads(lead, device)
    fn = lambda *a, **k: token_logprobs(backend, *a, **k)
    kernel = forward_backward(fn, logits, targets, grad_logp, grad_entropy, temperature=0.7, ignore_index=IGNORE)
    expected = fp64_reference(logits, targets, grad_logp, grad_entropy, temperature=0.7, ignore_index=IGNORE)
    budget = native(logits, targets, grad_logp, grad_entropy, 0.7)
    assert kernel[0].dtype == torch.float32 and kernel[2].dtype == dtype
    for name, out, ref, nat in zip(("logp", "entropy", "grad"), kernel, expected, budget, strict=True):
        assert max_err(out, ref) <= 2 * max_err(nat, ref), f"{name}: {max_err(out, ref)} vs native {max_err(nat, ref)}"
    assert_ignored_exact(targets, *kernel)


@pytest.mark.parametrize("offset, scale", [(-300.0, 5.0), (0.0, 60.0)], ids=["all-negative", "wide-range"])
def test_extreme_logits(backend, device, offset, scale):
    """All-negative logits (around -300) and a wide range (a few logits dominate): the online max rescaling.

    T = 1 here: at |z| ~ 400, z = x / T itself rounds by 1.5e-5 in fp32, in every backend (PyTorch's included).
    Gradients get 5e-5: the backward has only the saved fp32 lse, which rounds by up to half an ulp of |lse|
    (1.5e-5 at 300), a relative error in p; times |grad_logp| <= 3 on the dominant tokens."""
    logits = make_logits((4, 1009), torch.float32, device, scale=scale, offset=offset)
    targets = make_targets((4,), 1009, device)
    check_against_reference(backend, logits, targets, 1e-5, 1e-5, grad_atol=5e-5, ignore_index=IGNORE)


def test_strided_rows(backend, device):
    """A row-strided slice of a bigger tensor (row stride 2 * 1022, unit column stride) goes to the kernel as is;
    a transposed (column-strided) view is copied by the op. Both must give the reference. Targets are strided too."""
    big = make_logits((6, 1022), torch.float32, device)
    targets = make_targets((6,), 1009, device, seed=3)[::2]
    check_against_reference(backend, big[::2, 5:1014], targets, 1e-5, 1e-5, ignore_index=IGNORE)
    transposed = make_logits((1009, 3), torch.float32, device).T
    check_against_reference(backend, transposed, targets, 1e-5, 1e-5, ignore_index=IGNORE)


def test_other_ignore_index_and_single_gradients(backend, device):
    """ignore_index = -1; a loss on logp alone (with and without return_entropy) and on the entropy alone."""
    logits = make_logits((4, 31), torch.float64, device)
    targets = torch.tensor([3, -1, 30, 0], device=device)
    for return_entropy, weights in ((False, (1.0, 0.0)), (True, (1.0, 0.0)), (True, (0.0, 1.0))):
        x, x_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        kwargs = dict(temperature=0.7, ignore_index=-1, return_entropy=return_entropy)
        for fn, inp in ((lambda *a, **k: token_logprobs(backend, *a, **k), x), (reference.token_logprobs, x_ref)):
            out = fn(inp, targets, **kwargs)
            logp, entropy = out if return_entropy else (out, out.new_zeros(()))
            (weights[0] * logp.sum() + weights[1] * entropy.sum()).backward()
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-12)
        assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))


def test_gradcheck_fp64(backend, device):
    """torch.autograd.gradcheck of (logp, entropy) w.r.t. logits, in fp64 with T = 0.7 and an ignored row."""
    logits = make_logits((3, 11), torch.float64, device).requires_grad_()
    targets = torch.tensor([4, IGNORE, 10], device=device)
    fn = lambda x: token_logprobs(backend, x, targets, temperature=0.7, ignore_index=IGNORE, return_entropy=True)
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


# -inf logits (masked vocabulary entries) in leading chunks. V = 12,289 streams in 4,096-wide chunks both on a GPU
# (_launch_config's cap) and under the interpreter (about 4 chunks per row): exactly one leading chunk, two and a
# bit, one -inf entry per chunk further on, and none. Before the fix the Triton kernel's online softmax computed
# exp(-inf - (-inf)) = NaN after a leading all -inf chunk, and 0 * -inf in the entropy; the reference's entropy was NaN.
INF_VOCAB, INF_CHUNK = 12289, 4096


def masked_logits(dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [5, INF_VOCAB] with leading -inf ranges, bool mask of the -inf entries)."""
    masked = torch.zeros(5, INF_VOCAB, dtype=torch.bool)
    masked[0, :INF_CHUNK] = True  # exactly one chunk
    masked[1, : 2 * INF_CHUNK + 100] = True  # two chunks and part of the third
    masked[2, : INF_CHUNK + 1] = True  # an ignored row
    masked[3, 5 : INF_VOCAB - 1 : INF_CHUNK // 2] = True  # scattered, never a whole chunk
    logits = make_logits((5, INF_VOCAB), torch.float64, "cpu").masked_fill(masked, float("-inf"))
    return logits.to(device, dtype), masked.to(device)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_leading_minus_inf_chunks(backend, device, dtype, atol, rtol, temperature):
    """Rows whose first chunk(s) are entirely -inf: logp of finite targets, entropy (0 log 0 = 0) and grad_logits
    are finite, equal to the fp64 reference within the usual tolerances, and the gradient is exactly 0 at -inf."""
    if backend == "triton":
        from caprl_core.kernels.token_logprobs import _launch_config

        assert _launch_config(INF_VOCAB)[0] == INF_CHUNK, "the -inf ranges must be laid out on the kernel's chunks"
    logits, masked = masked_logits(dtype, device)
    targets = torch.tensor([INF_CHUNK, INF_VOCAB - 1, IGNORE, 7, 0], device=device)
    grad_logp, grad_entropy = upstream_grads(targets.shape, device)
    acc = reference.acc_dtype(dtype)
    fn = lambda *a, **k: token_logprobs(backend, *a, **k)
    kwargs = dict(temperature=temperature, ignore_index=IGNORE)
    logp, entropy, grad = forward_backward(fn, logits, targets, grad_logp.to(acc), grad_entropy.to(acc), **kwargs)
    ref_logp, ref_entropy, ref_grad = fp64_reference(logits, targets, grad_logp, grad_entropy, **kwargs)
    for name, out in (("logp", logp), ("entropy", entropy), ("grad", grad), ("reference entropy", ref_entropy)):
        assert torch.isfinite(out).all(), f"{name}: not finite"
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=rtol)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=atol, rtol=rtol * ENTROPY_RTOL_FACTOR)
    torch.testing.assert_close(grad.double(), ref_grad, atol=atol, rtol=rtol)
    assert torch.equal(grad[masked], torch.zeros_like(grad[masked])) and torch.equal(ref_grad[masked], grad[masked])
    assert_ignored_exact(targets, logp, entropy, grad)
