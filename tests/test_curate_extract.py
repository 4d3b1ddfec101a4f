"""Extraction of the generator's markdown MCQs (caprl_core.curate.extract): canned outputs in the official format and
its usual damage, each dropped block counted by its reason."""

from __future__ import annotations

import pytest

from caprl_core.curate.extract import REASONS, extract_questions
from caprl_core.data import MCQ


def block(n: int, question: str, options: list[str], answer: str | None) -> str:
    lines = [f"#### {n}. **{question}**"] + [f"- {'ABCDEFGH'[i]}) {o}" for i, o in enumerate(options)]
    return "\n".join(lines + ([f"**Answer:** {answer}"] if answer is not None else [])) + "\n"


GOOD = block(1, "What colour is the bus?", ["Red", "Blue", "Green", "Yellow"], "B) Blue")


def test_clean_output_in_the_official_format():
    text = GOOD + "\n" + block(2, "How many wheels are visible?", ["Two", "Four", "Six", "Eight"], "D) Eight")
    out = extract_questions(text)
    assert out.questions == [MCQ("What colour is the bus?", ("Red", "Blue", "Green", "Yellow"), 1),
                             MCQ("How many wheels are visible?", ("Two", "Four", "Six", "Eight"), 3)]  # fmt: skip
    assert not out.dropped and out.num_blocks == 2


def test_extra_prose_around_blocks_is_tolerated():
    text = "Here are five questions about the image:\n\n" + GOOD + "\nI hope these help!\n"
    out = extract_questions(text)
    assert len(out.questions) == 1 and not out.dropped
    assert out.questions[0].options == ("Red", "Blue", "Green", "Yellow")


@pytest.mark.parametrize(
    "damaged, reason",
    [
        (block(1, "Q?", ["a", "b", "c", "d"], None), "missing_answer"),
        (block(1, "Q?", ["a", "b", "c", "d"], "E) e"), "answer_outside_options"),
        (block(1, "Q?", ["a", "b", "c", "d"], "none of them"), "answer_outside_options"),
        (block(1, "Q?", ["Red", "red", "c", "d"], "A) Red"), "duplicate_options"),
        (block(1, "Q?", ["a", "b", "c"], "A) a"), "option_count"),
        (block(1, "Q?", ["a", "b", "c", "d", "e", "f", "g"], "A) a"), "option_count"),
        (block(1, "Q?", ["a", "b", "c", "d"], "B) c"), "answer_mismatch"),
        ("#### 1. **Q?**\n- A) a\n- C) b\n- B) c\n- D) d\n**Answer:** A\n", "option_labels"),
        ("#### 1. ****\n- A) a\n- B) b\n- C) c\n- D) d\n**Answer:** A\n", "no_question"),
    ],
)
def test_each_damage_is_dropped_and_counted_by_reason(damaged, reason):
    # the damaged block sits between two good ones: nothing else is lost, nothing guessed
    text = GOOD + damaged + GOOD.replace("#### 1.", "#### 3.")
    out = extract_questions(text)
    assert reason in REASONS
    assert dict(out.dropped) == {reason: 1}
    assert len(out.questions) == 2 and out.num_blocks == 3


def test_truncated_last_block():
    text = GOOD + "#### 2. **What is on the roof?**\n- A) A sign\n- B) A"
    out = extract_questions(text)
    assert dict(out.dropped) == {"truncated": 1} and len(out.questions) == 1


def test_tolerated_variants():
    # 5 and 6 options, an answer given as a bare letter, bold answer text, a "*" bullet
    text = (block(1, "Q1?", ["a", "b", "c", "d", "e"], "E") + block(2, "Q2?", list("uvwxyz"), "**C) w**")
            + "#### 3. **Q3?**\n* A) x\n* B) y\n* C) z\n* D) t\n**Answer:** D) t.\n")  # fmt: skip
    out = extract_questions(text)
    assert [q.answer for q in out.questions] == [4, 2, 3] and not out.dropped


def test_nothing_parseable():
    out = extract_questions("random tokens ## without any block\n- A) orphan option\n**Answer:** A")
    assert out.questions == [] and out.num_blocks == 0
