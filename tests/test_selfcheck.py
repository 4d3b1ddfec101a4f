"""caprl_core.selfcheck: what it labels as timed is what it times (a `fwd` timing runs no backward; `fwd+bwd`
runs exactly one), and it passes on every backend that runs here.

Run: pytest tests/test_selfcheck.py
"""

from __future__ import annotations

import json

import torch

from caprl_core import selfcheck


def test_timings_are_what_their_labels_say(monkeypatch, capsys):
    """Each timed call reports how many backward passes (autograd.grad calls) it made instead of its time."""
    real_grad = torch.autograd.grad
    calls = []

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    def count_backwards(fn, repeats=3):
        calls.clear()
        fn()
        return float(len(calls))

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(selfcheck, "_median_seconds", count_backwards)
    assert selfcheck.main(["--vocab", "67", "--tokens", "8", "--hidden", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    results = json.loads(lines[-1])["results"]
    assert results, "selfcheck ran no backend"
    for key, result in results.items():
        op = key.split("/")[0]
        assert result["seconds"]["fwd"] == 0, f"{key}: the forward timing ran a backward"
        if op in selfcheck.DIFFERENTIABLE:
            assert result["seconds"]["fwd+bwd"] == 1, f"{key}: the fwd+bwd timing did not run one backward"
        else:
            assert "fwd+bwd" not in result["seconds"], key
    timed = [line for line in lines[:-1] if "max|err|" in line]
    assert all(" fwd " in line for line in timed)
    assert sum("fwd+bwd" in line for line in timed) == sum(k.split("/")[0] in selfcheck.DIFFERENTIABLE for k in results)
