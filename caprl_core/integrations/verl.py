"""The CapRL reward as a verl custom reward function.

verl (checked against verl 0.9.1's source: `verl/trainer/ppo/reward.py`, `verl/workers/reward_manager/naive.py` and
`batch.py`) loads `custom_reward_function.path` / `.name` from a Python file and calls it with keywords:

- per response (the default "naive" reward manager): `compute_score(data_source=..., solution_str=...,
  ground_truth=..., extra_info=..., **reward_kwargs) -> float`;
- per batch (`reward_model.reward_manager=batch`): `compute_score(data_sources=[...], solution_strs=[...],
  ground_truths=[...], extra_infos=[...], **reward_kwargs) -> list[float]`.

The CapRL reward needs the image's MCQs and a reader model, so build one in that file and export the functions:

    # my_caprl_reward.py, named in verl's config: custom_reward_function.path=my_caprl_reward.py
    from caprl_core.integrations.verl import make_batch_compute_score, make_compute_score
    reward = CapRLReward(reader, reader_tokenizer, RewardConfig(mode="hard"))
    compute_score = make_compute_score(reward)              # custom_reward_function.name=compute_score
    compute_batch_score = make_batch_compute_score(reward)  # with reward_model.reward_manager=batch

The MCQs of a row come from `extra_info[questions_key]`, else from `ground_truth`: a list of MCQ dicts or its JSON
text. Both this project's rows ({"question", "options", "answer"}) and the released CapRL verl rows
(`reward_model.ground_truth` = [{"question", "choices": ["A. ...", ...], "answer": "B"}]) are accepted, read by the
strict parser `caprl_core.convert` also uses (`caprl_core.qa_rows`: a bad question is left out with a warning naming
it, "U.S." stays a choice). The batched
variant scores all captions in one reader call (prefix sharing across them); prefer it.

verl itself was installed here (`pip install --no-deps verl`, 0.9.1) but does not import without ray and its other
dependencies, so tests/test_verl_reward.py checks these functions against the call contract above, not inside verl.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from caprl_core.data import MCQ
from caprl_core.qa_rows import good_questions
from caprl_core.reward import CapRLReward


def make_compute_score(reward: CapRLReward, questions_key: str = "questions") -> Callable[..., float]:
    """verl's per-response `compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float`:
    the reader's accuracy (hard) or mean probability of the right options (soft) from this caption alone."""

    def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None,
                      **reward_kwargs: Any) -> float:  # fmt: skip
        rewards, _ = reward.score([solution_str], [row_questions(ground_truth, extra_info, questions_key)])
        return float(rewards[0])

    return compute_score


def make_batch_compute_score(reward: CapRLReward, questions_key: str = "questions") -> Callable[..., list[float]]:
    """verl's batch `compute_score(data_sources, solution_strs, ground_truths, extra_infos) -> list[float]`, one
    reader call for the whole batch."""

    def compute_score(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                      extra_infos: Sequence[Any] | None = None, **reward_kwargs: Any) -> list[float]:  # fmt: skip
        extra_infos = [None] * len(solution_strs) if extra_infos is None else list(extra_infos)
        if not len(ground_truths) == len(extra_infos) == len(solution_strs):
            raise ValueError(f"solution_strs, ground_truths, extra_infos: expected equal lengths, got "
                             f"{len(solution_strs)}, {len(ground_truths)}, {len(extra_infos)}")  # fmt: skip
        rows = zip(ground_truths, extra_infos, strict=True)
        questions = [row_questions(gt, extra, questions_key) for gt, extra in rows]
        rewards, _ = reward.score(list(solution_strs), questions)
        return rewards.tolist()

    return compute_score


def row_questions(ground_truth: Any, extra_info: Any, questions_key: str = "questions") -> list[MCQ]:
    """The MCQs of one verl row: `extra_info[questions_key]` when present, else `ground_truth`; either a list (or numpy
    array, as verl's non-tensor batch holds them) of MCQ dicts, or its JSON text."""
    source = "ground_truth"
    found = ground_truth
    if isinstance(extra_info, dict) and extra_info.get(questions_key) is not None:
        source, found = f"extra_info[{questions_key!r}]", extra_info[questions_key]
    if isinstance(found, str):
        try:
            found = json.loads(found)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: expected a list of MCQs or its JSON text, got bad JSON ({err})") from err
    if hasattr(found, "tolist"):
        found = found.tolist()
    if not isinstance(found, list) or not found:
        raise ValueError(f"{source}: expected a non-empty list of MCQ dicts, got {type(found).__name__}")
    return good_questions(found, source)
