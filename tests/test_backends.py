"""Backend dispatch: defaults by device, the `backend=` argument and CAPRL_BACKEND, and the single-warning fallback."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from caprl_core import backends, ops, reference
from scripts import ci_strict_skips

CPU = torch.device("cpu")


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def _only(available: set[str]):
    """A stand-in for backends._why_unavailable where exactly `available` can run."""
    return lambda name, op, device: None if name in available else f"{name} is switched off in this test"


def test_default_is_cpu_kernels_for_cpu_tensors(monkeypatch, fresh_warnings):
    monkeypatch.setattr(backends, "_why_unavailable", _only({"cpu", "torch", "triton"}))
    assert backends.select("token_logprobs", CPU) == "cpu"


def test_default_is_triton_for_cuda_tensors(monkeypatch, fresh_warnings):
    monkeypatch.setattr(backends, "_why_unavailable", _only({"triton", "cuda", "torch"}))
    assert backends.select("mcq_rewards", torch.device("cuda")) == "triton"


def test_argument_beats_environment(monkeypatch, fresh_warnings):
    monkeypatch.setattr(backends, "_why_unavailable", _only(set(backends.BACKENDS)))
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select("group_advantages", CPU) == "torch"
    assert backends.select("group_advantages", CPU, "cpu") == "cpu"


def test_unknown_environment_value_names_the_variable(monkeypatch, fresh_warnings):
    monkeypatch.setenv(backends.ENV_VAR, "metal")
    with pytest.raises(ValueError, match=f"^{backends.ENV_VAR}:"):
        backends.select("token_logprobs", CPU)


def test_fallback_warns_once_and_goes_to_the_next(monkeypatch, fresh_warnings):
    monkeypatch.setattr(backends, "_why_unavailable", _only({"torch"}))
    with pytest.warns(UserWarning, match="backend 'cuda' unavailable .*using 'torch'"):
        assert backends.select("token_logprobs", CPU, "cuda") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback of the same kind is silent
        assert backends.select("token_logprobs", CPU, "cuda") == "torch"


def test_triton_needs_the_interpreter_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in backends._why_unavailable("triton", "token_logprobs", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends._why_unavailable("triton", "token_logprobs", CPU) in (None, backends._triton_importable())


def test_kernel_backends_refuse_the_wrong_device():
    assert "CUDA tensors" in backends._why_unavailable("cuda", "mcq_rewards", CPU)
    assert "CPU tensors" in backends._why_unavailable("cpu", "mcq_rewards", torch.device("cuda"))


def test_fallback_gives_the_same_answer(monkeypatch, fresh_warnings):
    """An unavailable backend falls back to one that computes the same op: the reference answer, not another."""
    logits, targets = torch.randn(3, 17), torch.randint(0, 17, (3,))
    with pytest.warns(UserWarning):
        got = ops.token_logprobs(logits, targets, backend="cuda")  # no CUDA tensors here: falls back
    torch.testing.assert_close(got, reference.token_logprobs(logits, targets), atol=1e-5, rtol=0)


def test_broken_kernel_backend_fails_on_cuda_tensors_and_skips_elsewhere(monkeypatch):
    """tests/conftest.py: on a GPU machine a Triton or CUDA backend that does not load is a failure, not a skip."""
    from conftest import require_backend

    why = "the cuda kernels did not load: the CUDA build failed: error: identifier undefined"
    monkeypatch.setattr(backends, "_why_unavailable", lambda name, op, device: why)
    monkeypatch.setattr(backends, "_load_error", lambda name: why)
    with pytest.raises(BaseException) as outcome:  # BaseException: a skip must be caught too, and fail this test
        require_backend("cuda", "mcq_rewards", torch.device("cuda"))
    assert outcome.type is pytest.fail.Exception, f"expected a failure, got {outcome.type.__name__}: {outcome.value}"
    assert "cuda backend broken for mcq_rewards on a CUDA machine" in str(outcome.value)
    with pytest.raises(pytest.skip.Exception, match="cuda backend unavailable for mcq_rewards"):
        require_backend("cuda", "mcq_rewards", CPU)


def test_backend_without_the_op_by_design_is_a_plain_skip(monkeypatch):
    """The CUDA backend has no token_logprobs kernel: a skip whose reason scripts/ci_strict_skips.py lets pass."""
    from conftest import require_backend

    monkeypatch.setattr(backends, "_why_unavailable", lambda *a: "the cuda backend has no kernel for token_logprobs")
    monkeypatch.setattr(backends, "_load_error", lambda name: None)
    monkeypatch.setattr(backends, "load", lambda name: types.SimpleNamespace())  # a module with no kernels
    with pytest.raises(pytest.skip.Exception, match=r"has no kernel for token_logprobs \(by design\)") as skipped:
        require_backend("cuda", "token_logprobs", torch.device("cuda"))
    assert ci_strict_skips.allowed(str(skipped.value))
