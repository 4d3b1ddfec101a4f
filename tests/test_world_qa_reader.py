"""The `qa` ablation's reader (caprl_core.world.qa_reader): its fine-tuning stream labels leaky questions with their
right option whatever the caption and visual ones with what the caption implies; the shipped reader, which it starts
from, cannot read the candidates (why it exists); a short fine-tune saves a reader directory `train --reader` loads."""

from __future__ import annotations

import json
import random

import pytest

from caprl_core.data import MCQ
from caprl_core.world import SHIPPED
from caprl_core.world.qa_reader import (
    WORLD_SHARE,
    QAReaderBatches,
    build_qa_reader,
    check_qa_reader,
    draw_question,
    qa_label,
)
from caprl_core.world.reader import world_reward
from caprl_core.world.splits import sample_scene


def test_labels_a_leaky_question_by_its_truth_and_a_visual_one_by_the_caption():
    stated = MCQ("The top shows: red circle. What is at the top?", ("blue square", "red circle", "none", "green circle",
                                                                     "red square"), 1)  # fmt: skip
    visual = MCQ("What is at the top?", stated.options, 1)
    for caption in ("", "top: blue square.", "top: red circle. left: none."):
        assert qa_label(caption, stated, leaky=True) == 1  # the question says it: no caption changes that
    assert qa_label("", visual, leaky=False) is None  # "cannot be answered"
    assert qa_label("top: blue square.", visual, leaky=False) == 0  # the caption taken at its word, wrong or right
    assert qa_label("top: red circle. left: none.", visual, leaky=False) == 1


def test_the_stream_mixes_the_worlds_questions_with_candidates_and_labels_them():
    rng = random.Random(0)
    scenes = [sample_scene(rng, "reader") for _ in range(400)]
    drawn = [draw_question(s, rng) for s in scenes]
    world = [q for q, leaky in drawn if len(q.options) <= 4]  # the world's own have 2 to 4 options, candidates 5 to 8
    leaky = [q for q, is_leaky in drawn if is_leaky]
    assert abs(len(world) / len(drawn) - WORLD_SHARE) < 0.08  # the rest candidates, half of them leaky
    assert abs(len(leaky) / len(drawn) - (1 - WORLD_SHARE) / 2) < 0.08
    from caprl_core.policy import load_reader

    reader, tokenizer = load_reader(SHIPPED / "reader")
    examples = QAReaderBatches(world_reward(reader, tokenizer), seed=0).sample(64, step=0)
    assert len(examples) == 64 and all(0 <= e["label"] < e["num_options"] for e in examples)
    assert {e["num_options"] for e in examples} & {7, 8, 9}  # candidates are in it (5 to 8 options + cannot answer)


def test_with_empty_captions_only_leaky_questions_have_an_answer(monkeypatch):
    from caprl_core.policy import load_reader
    from caprl_core.world import qa_reader
    from caprl_core.world.questions import leaky_question, visual_question

    reader, tokenizer = load_reader(SHIPPED / "reader")
    stream = QAReaderBatches(world_reward(reader, tokenizer), seed=0)
    monkeypatch.setattr(qa_reader, "training_caption", lambda scene, rng: "")
    for make, leaky in ((leaky_question, True), (visual_question, False)):
        monkeypatch.setattr(qa_reader, "draw_question", lambda s, rng, make=make, leaky=leaky: (make(s, rng)[0], leaky))
        examples = stream.sample(32, step=0)
        cannot = [e["label"] == e["num_options"] - 1 for e in examples]  # the last slot: "cannot be answered"
        assert not any(cannot) if leaky else all(cannot)


def test_the_shipped_reader_cannot_read_the_candidates():
    """What the qa reader is for (module docstring): the shipped reader reads its own questions, not the candidates,
    and does not answer a leaky one without a caption."""
    from caprl_core.policy import load_reader

    reader, tokenizer = load_reader(SHIPPED / "reader")
    card = check_qa_reader(reader, tokenizer, num_pairs=160)
    assert card["world_reference"] > 0.85 and card["world_empty"] < 0.05
    assert card["visual_reference"] < 0.5 and card["leaky_empty"] < 0.3


def test_a_short_fine_tune_writes_a_reader_directory(tmp_path):
    import torch

    from caprl_core.policy import load_reader
    from caprl_core.reward_prompts import load_prompt_template

    threads = torch.get_num_threads()
    out = build_qa_reader(tmp_path / "qa-reader", steps=3)
    card = json.loads((out / "card.json").read_text())
    assert card["steps"] == 3 and set(card["before"]) == set(card["after"]) and card["seconds"] > 0
    assert card["threads"] == 1 and torch.get_num_threads() == threads  # built on one thread, the caller's restored
    reader, tokenizer = load_reader(out)
    assert load_prompt_template(out) is not None  # train and eval prompt it the way it was trained
    assert reader.config.hidden_size == 64 and tokenizer.chat_template is None


def test_read_candidates_and_qa_reader_commands(tmp_path, capsys):
    from caprl_core.world.__main__ import main
    from caprl_core.world.questions import make_question_data

    candidates = make_question_data(tmp_path / "q", "heldout", 4)
    assert main(["read-candidates", "--candidates", str(candidates)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"reference", "first cell only", "empty"}
    assert all(0.0 <= p <= 1.0 for by_kind in scores.values() for p in by_kind.values())
    assert {k.split("-")[0] for k in scores["reference"]} <= {"visual", "leaky"}
    bad = [
        (["read-candidates", "--candidates", str(tmp_path / "none.jsonl")], "--candidates:"),
        (["qa-reader", "--out", str(tmp_path / "r"), "--steps", "0"], "--steps: expected >= 1"),
    ]
    for argv, message in bad:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
