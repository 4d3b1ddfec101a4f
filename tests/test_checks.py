"""Bad input to every public op is a ValueError that names the offending argument (docs/ops.md, "Contracts").

The checks run on the host before dispatch, so one backend ("torch") is enough to exercise them; a test of the
dispatcher below confirms that every backend sees the same checks.
"""

from __future__ import annotations

import pytest
import torch

from caprl_core import ops

V, H, N = 11, 6, 4


def _logits():
    return torch.randn(N, V)


def _targets():
    return torch.randint(0, V, (N,))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"logits": torch.randn(N, V).long()}, "logits"),  # integer logits
        ({"logits": [[0.0] * V]}, "logits"),  # not a tensor
        ({"targets": torch.randn(N)}, "targets"),  # float targets
        ({"targets": torch.randint(0, V, (N + 1,))}, "targets"),  # shape mismatch
        ({"targets": torch.tensor([0, 1, V, 2])}, "targets"),  # id == V
        ({"targets": torch.tensor([0, -1, 2, 3])}, "targets"),  # negative id that is not ignore_index
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"backend": "tpu"}, "backend"),
    ],
)
def test_token_logprobs_rejects(kwargs, name):
    args = {"logits": _logits(), "targets": _targets(), **kwargs}
    logits, targets = args.pop("logits"), args.pop("targets")
    with pytest.raises(ValueError, match=f"^{name}:"):
        ops.token_logprobs(logits, targets, **args)


def test_token_logprobs_ignore_index_is_not_out_of_range():
    targets = torch.tensor([0, -100, 2, -100])
    logp = ops.token_logprobs(_logits(), targets, backend="torch")
    assert logp[1] == 0 and logp[3] == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"weight": torch.randn(V, H + 1)}, "weight"),  # H mismatch
        ({"weight": torch.randn(V, H, dtype=torch.float64)}, "weight"),  # dtype mismatch
        ({"weight": torch.randn(V)}, "weight"),  # 1-D
        ({"bias": torch.randn(V + 1)}, "bias"),
        ({"bias": torch.randn(V, dtype=torch.float64)}, "bias"),
        ({"targets": torch.tensor([0, 1, 2, V + 5])}, "targets"),
        ({"targets": torch.randint(0, V, (N, 1))}, "targets"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_linear_token_logprobs_rejects(kwargs, name):
    args = {"hidden": torch.randn(N, H), "weight": torch.randn(V, H), "targets": _targets(), **kwargs}
    with pytest.raises(ValueError, match=f"^{name}:"):
        ops.linear_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"rewards": torch.tensor([1.0, float("nan"), 0.0, 1.0])}, "rewards"),
        ({"rewards": torch.tensor([1.0, float("inf"), 0.0, 1.0])}, "rewards"),
        ({"rewards": torch.ones(4, 2, 2)}, "rewards"),
        ({"rewards": torch.ones(4, dtype=torch.long)}, "rewards"),
        ({"group_size": 3}, "group_size"),  # does not divide N=4
        ({"group_size": 0}, "group_size"),
        ({"group_size": None}, "group_size, group_ids"),  # neither
        ({"group_ids": torch.tensor([0, 0, 1, 1])}, "group_size, group_ids"),  # both
        ({"group_size": None, "group_ids": torch.tensor([0, 0, 1])}, "group_ids"),
        ({"group_size": None, "group_ids": torch.tensor([0.0, 0, 1, 1])}, "group_ids"),
        ({"method": "ppo"}, "method"),
        ({"scale": "max"}, "scale"),
        ({"weights": torch.ones(2)}, "weights"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_group_advantages_rejects(kwargs, name):
    args = {"rewards": torch.tensor([1.0, 0.0, 0.0, 1.0]), "group_size": 2, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}:"):
        ops.group_advantages(args.pop("rewards"), **args)


def _mcq_args(**overrides):
    p, k, c = 6, 4, 3
    args = {
        "hidden": torch.randn(p, H),
        "weight": torch.randn(V, H),
        "option_token_ids": torch.tensor([1, 2, 3, 4]),
        "answers": torch.tensor([0, 1, 2, 3, 0, 1]),
        "caption_index": torch.tensor([0, 0, 1, 1, 2, 2]),
        "num_captions": c,
    }
    assert k == args["option_token_ids"].numel()
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"hidden": torch.randn(6, H, 1)}, "hidden"),
        ({"weight": torch.randn(V, H + 2)}, "weight"),
        ({"weight": torch.randn(V, H).double()}, "weight"),
        ({"option_token_ids": torch.tensor([1, 2, 3, V])}, "option_token_ids"),  # id outside [0, V)
        ({"option_token_ids": torch.tensor([1.0, 2, 3, 4])}, "option_token_ids"),
        ({"option_token_ids": torch.ones(5, 4, dtype=torch.long)}, "option_token_ids"),  # [P', K] with P' != P
        ({"answers": torch.tensor([0, 1, 2, 4, 0, 1])}, "answers"),  # answer 4 >= K
        ({"answers": torch.tensor([0, 1, 2, 3, 0, 1]), "num_options": 3}, "answers"),  # answer 3 >= 3 options
        ({"num_options": torch.tensor([4, 4, 4, 4, 4, 5])}, "num_options"),  # more options than slots
        ({"num_options": 0}, "num_options"),
        ({"num_options": 2.5}, "num_options"),
        ({"caption_index": torch.tensor([0, 0, 1, 1, 2, 3])}, "caption_index"),  # caption 3 >= C
        ({"caption_index": torch.tensor([0, 0, 0, 0, 2, 2])}, "caption_index"),  # caption 1 has no prompts
        ({"num_captions": 0}, "num_captions"),
        ({"bias": torch.randn(V - 1)}, "bias"),
        ({"temperature": -0.5}, "temperature"),
        ({"mode": "lenient"}, "mode"),
    ],
)
def test_mcq_rewards_rejects(overrides, name):
    args = _mcq_args(**overrides)
    with pytest.raises(ValueError, match=f"^{name}:"):
        ops.mcq_rewards(**args)


def test_mcq_error_names_the_empty_caption():
    with pytest.raises(ValueError, match="caption 1 of num_captions=3 has no prompts"):
        ops.mcq_rewards(**_mcq_args(caption_index=torch.tensor([0, 0, 0, 0, 2, 2])))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
def test_checks_run_before_any_backend(backend):
    """Whatever backend is asked for (even one that is unavailable here), bad input fails the same way."""
    with pytest.raises(ValueError, match="^targets:"):
        ops.token_logprobs(_logits(), torch.tensor([0, 1, V, 2]), backend=backend)
