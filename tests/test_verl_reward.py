"""`caprl_core.integrations.verl`: the CapRL reward behind verl's custom reward function contract.

verl does not import in this project's environments (verl 0.9.1 installs with --no-deps but needs ray), so the
functions are called exactly as verl 0.9.1's reward managers call them (keywords; `naive.py` per response,
`batch.py` per batch) and compared with `CapRLReward.score` on the same captions, questions and step.

Run: pytest tests/test_verl_reward.py
"""

from __future__ import annotations

import json

import pytest
import torch

from caprl_core.data import load_jsonl
from caprl_core.integrations.verl import make_batch_compute_score, make_compute_score, row_questions
from caprl_core.models import tiny_qwen2, tiny_tokenizer
from caprl_core.reward import CapRLReward
from caprl_core.reward_config import RewardConfig
from caprl_core.world.scenes import make_synthetic_dataset

CAPTIONS = ["a red circle left of a blue square", "two green triangles", "nothing at all"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer()
    config = RewardConfig(num_draws=3, mode="soft", engine_kwargs=dict(kv_cache_tokens=8192, block_size=16))
    reward = CapRLReward(tiny_qwen2(tokenizer=tok, seed=2), tok, config)
    examples = load_jsonl(make_synthetic_dataset(tmp_path_factory.mktemp("data"), len(CAPTIONS), seed=0)).examples
    return reward, [list(ex.questions) for ex in examples]


def _ours(q) -> dict:
    return {"question": q.question, "options": list(q.options), "answer": q.answer}


def _released(q) -> dict:
    """The released CapRL verl rows' format: lettered choices, the answer as a letter."""
    return {"question": q.question, "choices": [f"{'ABCDEFGHI'[i]}. {o}" for i, o in enumerate(q.options)],
            "answer": "ABCDEFGHI"[q.answer]}  # fmt: skip


def test_compute_score_is_the_reader_reward(setup):
    reward, questions = setup
    compute_score = make_compute_score(reward)
    extra_info = {"questions": [_ours(q) for q in questions[0]], "index": 0}
    reward.calls = 5
    got = compute_score(data_source="caprl", solution_str=CAPTIONS[0], ground_truth=None, extra_info=extra_info)
    want, _ = reward.score([CAPTIONS[0]], [questions[0]], step=5)
    assert isinstance(got, float) and 0.0 <= got <= 1.0
    assert got == pytest.approx(float(want[0]), abs=1e-7)
    # The same MCQs as verl's ground_truth, in the released rows' JSON: the same reward.
    reward.calls = 5
    gt = json.dumps([_released(q) for q in questions[0]])
    assert compute_score(data_source="caprl", solution_str=CAPTIONS[0], ground_truth=gt) == pytest.approx(got, abs=1e-7)
    # A different caption gets a different (soft) reward from the same draws: the caption is what is scored.
    reward.calls = 5
    other = compute_score(data_source="caprl", solution_str=CAPTIONS[2], ground_truth=gt)
    assert other != pytest.approx(got, abs=1e-6)


def test_batch_compute_score_is_one_reader_call(setup):
    reward, questions = setup
    compute_score = make_batch_compute_score(reward)
    reward.calls = 9
    ground_truths = [[_released(q) for q in qs] for qs in questions]
    extra_infos = [None, {"questions": [_ours(q) for q in questions[1]]}, {}]  # row 1 from extra_info, the others not
    got = compute_score(data_sources=["caprl"] * 3, solution_strs=CAPTIONS, ground_truths=ground_truths,
                        extra_infos=extra_infos)  # fmt: skip
    want, _ = reward.score(CAPTIONS, questions, step=9)
    assert isinstance(got, list) and len(got) == 3
    torch.testing.assert_close(torch.tensor(got), want.cpu(), atol=1e-7, rtol=0)


def test_row_questions_accepts_arrays_and_rejects_bad_rows():
    np = pytest.importorskip("numpy")
    rows = np.array([{"question": "What colour?", "choices": ["(A) red", "B: blue"], "answer": "B"}], dtype=object)
    (mcq,) = row_questions(rows, None)
    assert mcq.options == ("red", "blue") and mcq.answer == 1
    with pytest.raises(ValueError, match="ground_truth"):
        row_questions("not json", None)
    with pytest.raises(ValueError, match="ground_truth"):
        row_questions(None, {"other": 1})
    with pytest.raises(ValueError, match=r"extra_info\['qs'\]"):
        row_questions(None, {"qs": []}, questions_key="qs")
