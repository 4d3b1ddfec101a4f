"""The miniature world: its caption grammar and facts, what a caption implies for each question kind, the shipped
models (they load, the reader reads, the policy is terse), and a small build that learns."""

from __future__ import annotations

import random

import pytest

from caprl_core import world
from caprl_core.data import MCQ, Scene, Shape, describe, load_jsonl, scene_questions, synthetic_scene
from caprl_core.world.grammar import (
    caption_fact_counts,
    fact_scores,
    implied_answer,
    parse_caption,
    reference_scene,
    terse_caption,
)

SCENE = Scene((Shape("circle", "red", "top-left"), Shape("square", "blue", "bottom-left"),
               Shape("triangle", "orange", "bottom-right")))  # fmt: skip


def test_reference_caption_parses_back_to_its_scene():
    rng = random.Random(0)
    for _ in range(200):
        scene = synthetic_scene(rng)
        claims = parse_caption(describe(scene))
        assert claims.complete and not claims.unparsable and claims.count == len(scene.shapes)
        assert reference_scene(describe(scene)) == scene
        assert fact_scores(claims, scene) == (len(scene.shapes) + 1,) * 4  # every claim true, every fact stated


def test_terse_caption_and_unparsable_phrases():
    assert terse_caption(SCENE, 1) == "A red circle in the top-left."
    assert terse_caption(SCENE, 2) == "A red circle in the top-left and a blue square in the bottom-left."
    claims = parse_caption(terse_caption(SCENE, 2))
    assert claims.count is None and not claims.complete and len(claims.items) == 2
    assert fact_scores(claims, SCENE) == (2, 2, 2, 4)  # precise, half the facts
    noisy = parse_caption("A red circle in the top-left, a green blob, red red.")
    assert noisy.unparsable == ("a green blob", "red red") and fact_scores(noisy, SCENE) == (1, 3, 1, 4)
    with pytest.raises(ValueError, match="k: expected 1 to 3"):
        terse_caption(SCENE, 4)
    assert reference_scene("A cat on a mat.") is None and reference_scene(None) is None


def test_hallucinations_and_repeats_cost_precision_not_recall():
    listing = "A white image with 3 shapes: a red circle in the top-left, a red circle in the top-left, a green " \
              "square in the top-right, a blue square in the bottom-left."  # fmt: skip
    true, claims, stated, facts = fact_scores(parse_caption(listing), SCENE)
    assert (true, claims, stated, facts) == (3, 5, 3, 4)  # count, red circle, blue square; repeat and green: false
    assert caption_fact_counts([listing, describe(SCENE)], [describe(SCENE)] * 2) == (7, 9, 7, 8)
    assert caption_fact_counts([listing], ["not the world's grammar"]) is None


def _mcq(question: str, options: list[str], answer: str) -> MCQ:
    return MCQ(question, tuple(options), options.index(answer))


@pytest.mark.parametrize(
    ("caption", "question", "options", "expected"),
    [
        (describe(SCENE), "How many shapes are in the image?", ["2", "3"], "3"),
        (terse_caption(SCENE, 3), "How many shapes are in the image?", ["2", "3"], None),  # no count clause
        (describe(SCENE), "Is there a circle in the image?", ["yes", "no"], "yes"),
        (describe(SCENE), "Is there a circle in the image?", ["no", "yes"], "yes"),
        (terse_caption(SCENE, 1), "Is there a square in the image?", ["yes", "no"], None),  # not said, not complete
        (describe(Scene(SCENE.shapes[:1])), "Is there a square in the image?", ["yes", "no"], "no"),
        (describe(SCENE), "What is in the top-right of the image?", ["nothing", "a red circle"], "nothing"),
        (terse_caption(SCENE, 3), "What is in the top-right of the image?", ["nothing", "a red circle"], None),
        (terse_caption(SCENE, 1), "What is in the top-left of the image?", ["nothing", "a red circle"], "a red circle"),
        (terse_caption(SCENE, 1), "What colour is the circle?", ["red", "blue"], "red"),
        (terse_caption(SCENE, 1), "What colour is the square?", ["red", "blue"], None),
        (terse_caption(SCENE, 2), "What shape is the blue object?", ["square", "circle"], "square"),
        (terse_caption(SCENE, 2), "Where is the blue square?", ["top-left", "bottom-left"], "bottom-left"),
        ("A green circle in the top-left.", "What colour is the circle?", ["red", "blue"], None),  # wrong: not offered
        ("A blue circle in the top-left.", "What colour is the circle?", ["red", "blue"], "blue"),  # wrong: taken
    ],
)
def test_implied_answer(caption, question, options, expected):
    mcq = _mcq(question, options, options[0])
    got = implied_answer(parse_caption(caption), mcq)
    assert (None if got is None else options[got]) == expected


def test_world_questions_are_all_understood():
    rng = random.Random(1)
    for _ in range(100):
        scene = synthetic_scene(rng)
        for mcq in scene_questions(scene, rng, 20):
            # From the reference caption, what the caption implies is the truth.
            assert implied_answer(parse_caption(describe(scene)), mcq) == mcq.answer


def test_world_data_splits_are_fixed_by_seed(tmp_path):
    a = world.make_world_data(tmp_path / "a", "heldout", 4)
    b = world.make_world_data(tmp_path / "b", "heldout", 4)
    t = world.make_world_data(tmp_path / "t", "train", 4)
    assert a.read_text() == b.read_text() != t.read_text()
    assert all(reference_scene(ex.caption) is not None for ex in load_jsonl(a).examples)
    with pytest.raises(ValueError, match="split"):
        world.make_world_data(tmp_path, "test")


def test_shared_draws_give_the_captions_of_a_key_the_same_prompts_but_their_own_captions():
    from caprl_core.models import tiny_qwen2, tiny_tokenizer
    from caprl_core.reward import CapRLReward, RewardConfig

    tok = tiny_tokenizer()
    reward = CapRLReward(tiny_qwen2(tokenizer=tok), tok, RewardConfig(num_draws=3))
    pools = [scene_questions(SCENE, random.Random(0), 6)] * 4
    captions = ["one", "two", "three", "four"]
    shared = reward.reader_prompts(captions, pools, step=5, draw_keys=[0, 0, 1, 1])
    own = reward.reader_prompts(captions, pools, step=5)
    q = shared.question_index
    assert q[0:3] == q[3:6] and q[6:9] == q[9:12] and shared.orders[0:3] == shared.orders[3:6]
    assert own.question_index[0:3] != own.question_index[3:6] or own.orders[0:3] != own.orders[3:6]
    with pytest.raises(ValueError, match="draw_keys"):
        reward.reader_prompts(captions, pools, step=0, draw_keys=[0])


# --- building ----------------------------------------------------------------------------------------------------


def test_a_small_build_learns_and_is_deterministic(tmp_path):
    from caprl_core.world.build import BuildConfig, build
    from caprl_core.world.reader import make_reader, train_reader

    config = BuildConfig(reader_steps=2, policy_steps=2, reader_batch=4, policy_batch=4, reader_hidden=32,
                         reader_layers=1, policy_hidden=32, policy_layers=1, eval_pairs=8, eval_images=2)  # fmt: skip
    card = build(tmp_path / "a", config, progress=False)
    build(tmp_path / "b", config, progress=False)
    for name in ("reader", "policy"):
        assert (tmp_path / "a" / name / "model.safetensors").read_bytes() == \
            (tmp_path / "b" / name / "model.safetensors").read_bytes()  # fmt: skip
    assert set(card["reader"]) == {"reference", "terse", "empty"}
    # Learning: over 30 steps the reader's training loss (answer + what the caption says, per option and per cell)
    # falls well below where it starts.
    from caprl_core.models import tiny_tokenizer

    losses = []
    model = make_reader(tiny_tokenizer(), hidden_size=32, num_layers=1)
    train_reader(model, tiny_tokenizer(), steps=30, batch_size=16, lr=1e-2,
                 log=lambda step, parts, accuracy: losses.append(sum(parts)))  # fmt: skip
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses


def test_a_reader_directory_carries_its_prompt(tmp_path):
    from caprl_core.reward import (
        DEFAULT_HEADER,
        PROMPT_FILE,
        PromptTemplate,
        load_prompt_template,
        save_prompt_template,
    )

    assert load_prompt_template(tmp_path) is None
    template = PromptTemplate(header="Answer from the caption only.\n\n", answer_cue="The answer is")
    save_prompt_template(template, tmp_path)
    assert load_prompt_template(tmp_path) == template
    (tmp_path / PROMPT_FILE).write_text('{"answer_cue": "Reply:"}')
    assert load_prompt_template(tmp_path) == PromptTemplate(header=DEFAULT_HEADER, answer_cue="Reply:")
    for text, match in (
        ("[1]", "expected a JSON object"),
        ('{"cue": "x"}', "expected a JSON object"),
        ('{"caption": "no placeholder"}', r"must contain \{caption\}"),
        ("{", "invalid JSON"),
    ):
        (tmp_path / PROMPT_FILE).write_text(text)
        with pytest.raises(ValueError, match=match):
            load_prompt_template(tmp_path)
