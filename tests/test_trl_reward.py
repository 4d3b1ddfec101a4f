"""Our reward inside someone else's trainer: one step of TRL's `GRPOTrainer` on CPU, rewarded by
`CapRLReward.as_trl_reward()` with a tiny random reader.

The policy is a text-only tiny Qwen2. TRL's vision path needs a full `Qwen2_5_VLProcessor`, and with transformers
5.24 that cannot even be constructed without torchvision (its video processor requires it), which this project's
environments lack. So there is no Qwen2.5-VL policy case here, neither run nor skipped. A text policy cannot see
the image, so its prompt quotes the reference caption instead: the point is the plumbing (TRL's reward call, its
logging, the optimiser step), not what the policy learns.

Run: pytest tests/test_trl_reward.py
"""

from __future__ import annotations

import functools

import pytest
import torch

datasets = pytest.importorskip("datasets", reason="TRL's GRPOTrainer takes a datasets.Dataset")
trl = pytest.importorskip("trl", reason="the test runs TRL's GRPOTrainer")

from caprl_core.data import load_jsonl  # noqa: E402
from caprl_core.models import tiny_qwen2, tiny_tokenizer  # noqa: E402
from caprl_core.reward import CapRLReward  # noqa: E402
from caprl_core.reward_config import RewardConfig  # noqa: E402
from caprl_core.world.scenes import make_synthetic_dataset  # noqa: E402

NUM_PROMPTS = 2
NUM_GENERATIONS = 2  # the least GRPO accepts: advantages are taken within a prompt's group
NUM_COMPLETIONS = NUM_PROMPTS * NUM_GENERATIONS


def _train_dataset(tmp_path):
    """Rows {"prompt": chat messages, "questions": [{"question", "options", "answer"}, ...]}: the synthetic images'
    MCQs; the prompt quotes the reference caption since a text policy cannot see the image. Conversational prompts
    make TRL pass completions as chat messages, as it would for a VL policy."""
    examples = load_jsonl(make_synthetic_dataset(tmp_path / "data", NUM_PROMPTS, seed=0)).examples
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Describe the image: {ex.caption}"}],
            "questions": [
                {"question": q.question, "options": list(q.options), "answer": q.answer} for q in ex.questions
            ],
        }
        for ex in examples
    ]
    return datasets.Dataset.from_list(rows)


class _Recorder:
    """Wraps a TRL reward function, keeping its name (TRL names the logged metric after it) and recording every
    call's keyword names and returned rewards."""

    def __init__(self, fn):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.calls: list[tuple[set[str], list]] = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = self.fn(prompts, completions, **kwargs)
        self.calls.append((set(kwargs), list(rewards)))
        return rewards


def test_grpo_trainer_step_with_caprl_reward(tmp_path):
    tok = tiny_tokenizer()
    policy = tiny_qwen2(tokenizer=tok, seed=1)
    reader = tiny_qwen2(tokenizer=tok, seed=2)
    # Soft mode: a random reader gives each completion a different reward almost surely, so advantages are non-zero
    # and the step moves the weights. In hard mode the completions of a group tie (measured: this test with
    # mode="hard" leaves every weight unchanged), and zero advantages give a zero gradient.
    config = RewardConfig(num_draws=2, mode="soft", engine_kwargs=dict(kv_cache_tokens=8192, block_size=16))
    reward = CapRLReward(reader, tok, config)  # the reader shares the policy's tokenizer
    reward_fn = _Recorder(reward.as_trl_reward(questions_column="questions"))

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=NUM_COMPLETIONS, num_generations=NUM_GENERATIONS,
        max_completion_length=8, max_steps=1, learning_rate=1e-2, report_to="none", use_cpu=True, logging_steps=1,
        save_strategy="no", bf16=False, seed=0,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=policy, reward_funcs=[reward_fn], args=args, train_dataset=_train_dataset(tmp_path), processing_class=tok
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    assert trainer.state.global_step == 1
    assert len(reward_fn.calls) == 1, "one generation batch, so one reward call"
    keys, rewards = reward_fn.calls[0]
    # What TRL passes besides prompts/completions: every dataset column but "prompt", and the trainer state.
    assert {"questions", "completion_ids", "trainer_state"} <= keys
    assert len(rewards) == NUM_COMPLETIONS
    assert all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in rewards), rewards

    logs = next(log for log in trainer.state.log_history if "loss" in log)
    key = f"rewards/{reward_fn.__name__}/mean"
    assert reward_fn.__name__ == "caprl_reward"
    assert key in logs, sorted(logs)
    assert logs[key] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)

    assert logs["grad_norm"] > 0
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert changed, "the GRPO step left every policy weight unchanged"
