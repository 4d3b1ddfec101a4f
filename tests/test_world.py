"""The miniature world: its caption grammar and facts, what a caption implies for each question kind, the shipped
models (they load, the reader reads, the policy is terse), and a small build that learns."""

from __future__ import annotations

import random

import pytest

from caprl_core import world
from caprl_core.data import MCQ, load_jsonl
from caprl_core.world.grammar import (
    caption_fact_counts,
    fact_scores,
    implied_answer,
    parse_caption,
    question_kind,
    reference_scene,
    terse_caption,
)
from caprl_core.world.scenes import Scene, Shape, describe, scene_questions, synthetic_scene

SCENE = Scene((Shape("circle", "red", "top"), Shape("square", "blue", "right"),
               Shape("triangle", "orange", "bottom")))  # fmt: skip
REFERENCE = "top: red circle. left: none. right: blue square. bottom: orange triangle."


def test_reference_caption_parses_back_to_its_scene():
    assert describe(SCENE) == REFERENCE
    rng = random.Random(0)
    for _ in range(200):
        scene = synthetic_scene(rng)
        claims = parse_caption(describe(scene))
        assert len(claims.statements) == 4 and not claims.unparsable
        assert reference_scene(describe(scene)) == scene
        assert fact_scores(claims, scene) == (4, 4, 4, 4)  # every claim true, every cell stated


def test_terse_caption_and_unparsable_phrases():
    assert terse_caption(SCENE, 1) == "top: red circle."
    assert terse_caption(SCENE, 2) == "top: red circle. left: none."
    assert fact_scores(parse_caption(terse_caption(SCENE, 2)), SCENE) == (2, 2, 2, 4)  # precise, half the facts
    noisy = parse_caption("Top: red circle. A green blob. right: red.")
    assert noisy.unparsable == ("a green blob", "right: red") and fact_scores(noisy, SCENE) == (1, 3, 1, 4)
    with pytest.raises(ValueError, match="k: expected 1 to 4"):
        terse_caption(SCENE, 5)
    assert reference_scene("A cat on a mat.") is None and reference_scene(None) is None
    assert reference_scene("top: none. left: none. right: none. bottom: none.") is None  # no shape: not a scene
    assert reference_scene(terse_caption(SCENE, 3)) is None  # a cell missing: facts unknown


def test_hallucinations_and_repeats_cost_precision_not_recall():
    listing = "top: red circle. top: red circle. left: green square. right: blue square."
    true, claims, stated, facts = fact_scores(parse_caption(listing), SCENE)
    assert (true, claims, stated, facts) == (2, 4, 2, 4)  # red circle, blue square; the repeat and green: false
    assert caption_fact_counts([listing, REFERENCE], [REFERENCE] * 2) == (6, 8, 6, 8)
    assert caption_fact_counts([listing], ["not the world's grammar"]) is None


def _mcq(question: str, options: list[str], answer: str) -> MCQ:
    return MCQ(question, tuple(options), options.index(answer))


@pytest.mark.parametrize(
    ("caption", "question", "options", "expected"),
    [
        (REFERENCE, "What is at the top?", ["red circle", "none"], "red circle"),
        (REFERENCE, "What is at the left?", ["red circle", "none"], "none"),
        (terse_caption(SCENE, 1), "What is at the left?", ["red circle", "none"], None),  # not said
        (terse_caption(SCENE, 1), "What colour is the shape at the top?", ["blue", "red"], "red"),
        (terse_caption(SCENE, 1), "What shape is at the top?", ["square", "circle"], "circle"),
        (REFERENCE, "What shape is at the left?", ["square", "circle"], None),  # said to be empty: no such option
        ("top: green circle.", "What colour is the shape at the top?", ["red", "blue"], None),  # wrong: not offered
        ("top: blue circle.", "What colour is the shape at the top?", ["red", "blue"], "blue"),  # wrong: taken
        ("top: blue circle. top: red circle.", "What is at the top?", ["red circle", "blue circle"], None),  # both
        ("top: red circle. top: red circle.", "What is at the top?", ["red circle", "none"], "red circle"),
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
        questions = scene_questions(scene, rng, 20)
        assert len(questions) == 4 + 2 * len(scene.shapes)  # each cell's content; a shape's colour and kind
        for mcq in questions:
            # From the reference caption, what the caption implies is the truth.
            assert implied_answer(parse_caption(describe(scene)), mcq) == mcq.answer
            # From a caption of the other cells only, nothing.
            kind, cell = question_kind(mcq.question)
            others = " ".join(p + "." for p in describe(scene).split(".") if p.strip() and p.split(":")[0].strip()
                              != cell)  # fmt: skip
            assert implied_answer(parse_caption(others), mcq) is None


def test_world_data_splits_are_fixed_by_seed(tmp_path):
    a = world.make_world_data(tmp_path / "a", "heldout", 4)
    b = world.make_world_data(tmp_path / "b", "heldout", 4)
    t = world.make_world_data(tmp_path / "t", "train", 4)
    assert a.read_text() == b.read_text() != t.read_text()
    assert all(reference_scene(ex.caption) is not None for ex in load_jsonl(a).examples)
    with pytest.raises(ValueError, match="split"):
        world.make_world_data(tmp_path, "test")


def test_faint_data_has_the_same_scenes_with_shapes_faded_towards_their_cell(tmp_path):
    """`world data --faint F`: the same scenes and questions as the plain split, each shape's colour moved F of the way
    to its cell's grey (facts that are hard to see); the cells' greys unchanged; a bad F names the flag."""
    from PIL import Image

    from caprl_core.world.__main__ import main
    from caprl_core.world.scenes import CELL_SHADES, COLOURS, GRID_CELLS

    plain = world.make_world_data(tmp_path / "plain", "heldout", 3)
    assert main(["data", "--split", "heldout", "--out", str(tmp_path / "faint"), "--num", "3", "--faint", "0.5"]) == 0
    faint = tmp_path / "faint" / "data.jsonl"
    assert faint.read_text() == plain.read_text()
    scene = reference_scene(load_jsonl(plain).examples[0].caption)
    shape = scene.shapes[0]
    row, col = GRID_CELLS[shape.position]
    centre = (col * 28 + 14, row * 28 + 18)  # inside the shape whatever its kind
    got = Image.open(tmp_path / "faint" / "images" / "00000.png").convert("RGB").getpixel(centre)
    want = tuple(round((c + g) / 2) for c, g in zip(COLOURS[shape.colour], CELL_SHADES[shape.position], strict=True))
    assert Image.open(plain.parent / "images" / "00000.png").convert("RGB").getpixel(centre) == COLOURS[shape.colour]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1, (got, want)
    with pytest.raises(SystemExit):
        main(["data", "--split", "heldout", "--out", str(tmp_path / "bad"), "--faint", "1.0"])


def test_shared_draws_give_the_captions_of_a_key_the_same_prompts_but_their_own_captions():
    from caprl_core.models import tiny_qwen2, tiny_tokenizer
    from caprl_core.reward import CapRLReward
    from caprl_core.reward_config import RewardConfig

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
                         reader_layers=1, policy_hidden=32, policy_layers=1, eval_pairs=8, eval_images=2,
                         vqa_read_steps=2, vqa_see_steps=2, vqa_batch=4,
                         vqa_eval_images=2)  # fmt: skip
    card = build(tmp_path / "a", config, progress=False)
    build(tmp_path / "b", config, progress=False)
    for name in ("reader", "policy", "vqa"):
        assert (tmp_path / "a" / name / "model.safetensors").read_bytes() == \
            (tmp_path / "b" / name / "model.safetensors").read_bytes()  # fmt: skip
    assert set(card["reader"]) == {"reference", "terse", "empty"}
    assert set(card["vqa"]) == {"questions", "hard", "soft"} and set(card["seconds"]) == {"reader", "policy", "vqa"}
    # Learning: over 30 steps the reader's training loss (the answer and the auxiliary labels: key, look, option,
    # letter) falls well below where it starts.
    from caprl_core.models import tiny_tokenizer

    losses, names = [], set()

    def log(step, parts, accuracy):
        losses.append(sum(parts.values()))
        names.update(parts)

    model = make_reader(tiny_tokenizer(), hidden_size=32, num_layers=1)
    train_reader(model, tiny_tokenizer(), steps=30, batch_size=16, lr=1e-2, chunk=5, log=log)
    assert names == {"answer", "key", "look", "option", "letter"}
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses


def test_a_reader_directory_carries_its_prompt(tmp_path):
    from caprl_core.reward_prompts import (
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


# --- the shipped models -----------------------------------------------------------------------------------------


def test_the_shipped_models_are_small_read_and_see():
    """The package's reader answers unseen reference captions (>= 93%) and says "cannot be answered" for empty
    ones; its start policy states what it sees correctly but only part of each scene (the room GRPO has to teach)."""
    from caprl_core.policy import PolicyPrompter, load_policy, load_reader
    from caprl_core.world import SHIPPED
    from caprl_core.world.build import check_policy, check_reader

    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"shipped files: {size / 2**20:.1f} MB"
    reader, tokenizer = load_reader(SHIPPED / "reader")
    card = check_reader(reader, tokenizer, 200)
    # 0.93, not the 0.95 of the build before issue 25: that reader was checked on scenes from its own training stream
    # (269 shared); on the partition's unseen "check" scenes the rebuilt one reads 0.945 here (0.9225 on the card's
    # 400 pairs), and the old one's 0.9775 on the card was partly memory.
    assert card["reference"]["accuracy"] >= 0.93, card
    assert card["empty"]["agrees_with_caption"] == 1.0, card  # every empty caption: "cannot be answered"
    policy, tokenizer, image_processor = load_policy(SHIPPED / "policy")
    captions = check_policy(policy, PolicyPrompter(tokenizer, image_processor), 16)
    assert captions["fact_precision"] >= 0.9 and captions["fact_recall"] <= 0.6, captions
