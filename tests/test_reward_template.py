"""Issue 23, case 5: a reader loaded from a directory reads prompts in its own wording by default. The shipped world
reader carries caprl_prompt.json; docs/reward.md's example (`CapRLReward(reader, tokenizer, RewardConfig(...))`, the
reader from `from_pretrained`) used the generic prompt instead and scored the reference caption 0.25 and an empty
one 0.215 (the issue's figures, with the reader built before issue 25). Now the directory's template applies unless
the config names one."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from caprl_core.data import load_jsonl
from caprl_core.policy import tiny_policy_and_reader
from caprl_core.reward import CapRLReward
from caprl_core.reward_config import RewardConfig
from caprl_core.reward_prompts import DEFAULT_TEMPLATE, load_prompt_template
from caprl_core.world import SHIPPED, make_world_data


@pytest.fixture(scope="module")
def shipped_reader():
    return AutoModelForCausalLM.from_pretrained(SHIPPED / "reader"), AutoTokenizer.from_pretrained(SHIPPED / "reader")


def test_the_docs_example_scores_the_reference_high_and_an_empty_caption_low(shipped_reader, tmp_path):
    reader, tokenizer = shipped_reader
    examples = load_jsonl(make_world_data(tmp_path, "heldout")).examples[:4]
    reward = CapRLReward(reader, tokenizer, RewardConfig(mode="soft"))
    assert reward.config.template == load_prompt_template(SHIPPED / "reader") != DEFAULT_TEMPLATE
    rewards, _ = reward.score([e.caption for e in examples] + [""] * 4, [e.questions for e in examples] * 2, step=0)
    assert rewards[:4].min() > 0.8, rewards  # measured 0.90-0.99 (generic template: 0.06-0.42)
    assert rewards[4:].max() < 0.01, rewards  # measured 9e-5-2e-4 (generic template: 0.22-0.46)


def test_an_explicit_template_wins_and_a_model_in_memory_gets_the_default(shipped_reader):
    reader, tokenizer = shipped_reader
    explicit = CapRLReward(reader, tokenizer, RewardConfig(template=DEFAULT_TEMPLATE))
    assert explicit.config.template == DEFAULT_TEMPLATE
    _, tiny_reader, tiny_tokenizer, _ = tiny_policy_and_reader()
    assert CapRLReward(tiny_reader, tiny_tokenizer).config.template == DEFAULT_TEMPLATE
