"""The world's side of QA curation (issue 26): candidate questions with known ground truth (visual ones only the image
answers, leaky ones their own text answers), the VQA model's training stream (its parts of the scene space only), its
build stages, and the acceptance figure: the curation filter, scored by the shipped VQA model, keeps the visual
questions and drops the leaky ones of held-out images."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from caprl_core.data import MAX_OPTIONS, MCQ, load_jsonl
from caprl_core.world import IMAGE_SIZE
from caprl_core.world.grammar import reference_scene
from caprl_core.world.questions import MIN_OPTIONS, candidate_questions, make_question_data
from caprl_core.world.scenes import COLOURS, POSITIONS, SHAPES, cell_contents, draw_scene, synthetic_scene
from caprl_core.world.splits import scene_part

KINDS = {"visual-content", "visual-colour", "leaky-stated", "leaky-typed"}


def blind_answer(q: dict) -> str | None:
    """What a reader who sees no image can say of a question: the option its text states, or the only option of the
    asked type; None when the text does not tell."""
    stated = [o for o in q["options"] if f": {o}." in q["question"] or f" is {o}." in q["question"]]
    if stated:
        return stated[0]
    asked = COLOURS if "colour" in q["question"] else SHAPES if "shape is" in q["question"] else None
    typed = [o for o in q["options"] if asked is not None and o in asked]
    return typed[0] if len(typed) == 1 else None


def image_answer(scene, q: dict) -> str:
    """The right answer from the scene (what the image shows)."""
    cell = next(c for c in POSITIONS if q["question"].endswith(f"the {c}?"))
    content = cell_contents(scene)[cell]
    if "colour" in q["question"]:
        return content.split()[0]
    return content.split()[1] if "shape is" in q["question"] else content


def test_candidates_have_their_ground_truth():
    """Every candidate is right about its scene and has 5 to 8 distinct options; a leaky one is answered by its text
    alone, a visual one is not (every option is of the asked type and none is said)."""
    rng = random.Random(0)
    counts = Counter()
    for _ in range(300):
        scene = synthetic_scene(rng)
        rows = candidate_questions(scene, rng, 6, 0.5)
        assert len({r["question"] for r in rows}) == len(rows) == 6
        for q in rows:
            counts[q["kind"]] += 1
            MCQ(q["question"], tuple(q["options"]), q["answer"])  # valid in the data format
            assert MIN_OPTIONS <= len(q["options"]) <= MAX_OPTIONS
            right = q["options"][q["answer"]]
            assert right == image_answer(scene, q), q
            assert q["leaky"] == q["kind"].startswith("leaky"), q
            assert blind_answer(q) == (right if q["leaky"] else None), q
    assert set(counts) == KINDS and min(counts.values()) > 100, counts
    assert abs((counts["leaky-stated"] + counts["leaky-typed"]) / 1800 - 0.5) < 0.05


def test_candidates_follow_the_leaky_fraction_and_name_bad_arguments():
    rng = random.Random(1)
    scene = synthetic_scene(rng)
    assert not any(q["leaky"] for q in candidate_questions(scene, rng, 4, 0.0))
    assert all(q["leaky"] for q in candidate_questions(scene, rng, 4, 1.0))
    with pytest.raises(ValueError, match="leaky_fraction"):
        candidate_questions(scene, rng, 4, 1.5)
    with pytest.raises(ValueError, match="n:"):
        candidate_questions(scene, rng, 0)


def test_question_files_are_data_files_of_their_split(tmp_path):
    """`world questions` writes the project's dataset format (the reader ignores "leaky" and "kind"), deterministically,
    of the split's part of the scene space."""
    from caprl_core.world.__main__ import main

    assert main(["questions", "--split", "heldout", "--out", str(tmp_path / "a"), "--num", "12"]) == 0
    jsonl = make_question_data(tmp_path / "b", "heldout", 12)
    assert (tmp_path / "a" / "data.jsonl").read_bytes() == jsonl.read_bytes()
    examples = load_jsonl(jsonl, on_error="raise").examples
    assert len(examples) == 12 and all(len(e.questions) == 6 for e in examples)
    assert {scene_part(reference_scene(e.caption)) for e in examples} == {"heldout"}
    rows = [q for line in jsonl.read_text().splitlines() for q in json.loads(line)["questions"]]
    assert {type(q["leaky"]) for q in rows} == {bool} and {q["kind"] for q in rows} <= KINDS
    none = make_question_data(tmp_path / "c", "train", 4, leaky_fraction=0.0)
    assert not any(q["leaky"] for line in none.read_text().splitlines() for q in json.loads(line)["questions"])
    with pytest.raises(SystemExit):
        main(["questions", "--split", "heldout", "--out", str(tmp_path / "d"), "--leaky-fraction", "2"])


def test_filter_truth_reads_a_filter_against_the_ground_truth(tmp_path):
    """`world filter-truth` joins a filter's NAME.scores.jsonl with the candidates' "leaky" keys: a filter that keeps
    exactly the visual questions scores 1.0 / 1.0, one that keeps everything 1.0 / 0.0; another file is an error."""
    from caprl_core.world.questions import filter_truth

    candidates = make_question_data(tmp_path / "c", "heldout", 6)
    rows = [json.loads(line) for line in candidates.read_text().splitlines()]

    def scores(name: str, keep) -> object:
        path = tmp_path / name
        out = [{**r, "questions": [{**q, "kept": keep(q), "visual_accuracy": 1.0, "text_accuracy": float(q["leaky"])}
                                   for q in r["questions"]]} for r in rows]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in out))
        return path

    perfect = filter_truth(candidates, scores("perfect.jsonl", lambda q: not q["leaky"]))
    assert perfect["visual_kept"] == perfect["leaky_dropped"] == 1.0
    assert perfect["visual"]["questions"] + perfect["leaky"]["questions"] == 36
    everything = filter_truth(candidates, scores("all.jsonl", lambda q: True))
    assert (everything["visual_kept"], everything["leaky_dropped"]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="lacks"):
        filter_truth(candidates, scores("few.jsonl", lambda q: True).write_text("") or tmp_path / "few.jsonl")


def test_the_vqa_stream_draws_only_its_parts():
    """The VQA model trains on scenes of the parts "policy" and "reader" only: never a held-out or check scene."""
    from caprl_core.world.vqa_train import TRAIN_PARTS, vqa_draws

    draws = vqa_draws(random.Random(7_000), 200)
    assert Counter(scene_part(x[3]) for x in draws).keys() == set(TRAIN_PARTS)
    assert {x[2] for x in draws} == {True, False}


def test_make_vqa_keeps_the_readers_logits_on_text():
    """The VQA model starts as the shipped policy's vision tower and the shipped reader: on a text prompt it gives the
    reader's logits exactly (M-RoPE on text is the reader's RoPE), so it starts able to read options."""
    import torch

    from caprl_core.policy import load_policy, load_reader
    from caprl_core.world import SHIPPED
    from caprl_core.world.vqa import make_vqa

    policy, _, _ = load_policy(SHIPPED / "policy")
    reader, tokenizer = load_reader(SHIPPED / "reader")
    model = make_vqa(reader, policy)
    text = ("Answer from the caption only.\nCaption: top: red circle. left: none.\n\nQuestion: What is at the top?\n"
            "Options:\n A. blue square\n B. red circle\nAnswer:")  # fmt: skip
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected, got = reader(input_ids=ids).logits[0, -1], model(input_ids=ids).logits[0, -1]
    assert torch.equal(expected, got)
    letters = [
        tokenizer(" A", add_special_tokens=False)["input_ids"][0],
        tokenizer(" B", add_special_tokens=False)["input_ids"][0],
    ]
    assert got[letters].argmax() == 1  # of the two options, "red circle"


@pytest.fixture(scope="module")
def fresh_vqa():
    """The VQA model before training (`make_vqa` of the shipped reader and policy) and its prompter."""
    from caprl_core.policy import load_policy, load_reader
    from caprl_core.world import SHIPPED
    from caprl_core.world.vqa import make_vqa, world_prompter

    policy, tokenizer, image_processor = load_policy(SHIPPED / "policy")
    reader, _ = load_reader(SHIPPED / "reader")
    tokenizer.chat_template = None
    return make_vqa(reader, policy), world_prompter(tokenizer, image_processor)


def test_ideal_tokens_hold_each_cells_content_words(fresh_vqa):
    """Stage "read"'s image tokens: row-major over the 3x3 grid, a cell's " colour" + " kind" input embeddings, " none"
    at an empty cell and at the corners and centre; frozen copies, not views of the model's table."""
    import torch

    from caprl_core.world.scenes import Scene, Shape
    from caprl_core.world.vqa_train import IdealTokens

    model, prompter = fresh_vqa
    ideal = IdealTokens(model, prompter.tokenizer)
    table = model.get_input_embeddings().weight
    word = lambda w: table[prompter.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]]  # noqa: E731
    scene = Scene((Shape("circle", "red", "top"), Shape("square", "blue", "right")))
    tokens = ideal(scene)
    assert tokens.shape == (9, table.shape[1])
    assert torch.equal(tokens[1], word("red") + word("circle"))  # top: row 0, column 1
    assert torch.equal(tokens[5], word("blue") + word("square"))  # right: row 1, column 2
    for empty in (0, 2, 3, 4, 6, 7, 8):  # left and bottom are empty; the corners and the centre always are
        assert torch.equal(tokens[empty], word("none")), empty
    with torch.no_grad():
        table.add_(1.0)
    try:
        torch.testing.assert_close(ideal(scene)[0], (word("none") - 1.0).detach())  # the targets did not move
    finally:
        with torch.no_grad():
            table.sub_(1.0)


def test_given_image_tokens_stand_in_for_the_vision_towers(fresh_vqa):
    """`_hidden` with image tokens (stage "read") gives the hidden states of the pixel path when the tokens given are
    the vision tower's own: the tokens go where the tower's would."""
    import torch

    from caprl_core.world.scenes import synthetic_scene
    from caprl_core.world.vqa import _hidden

    model, prompter = fresh_vqa
    image = draw_scene(synthetic_scene(random.Random(3)), IMAGE_SIZE)
    prompt = prompter(prompter.image_inputs(image), "What is at the top?", ["none", "red circle", "blue square"])
    ids = [prompt["input_ids"].tolist()]
    with torch.no_grad():
        tower = model.model.visual(prompt["pixel_values"], grid_thw=prompt["image_grid_thw"]).pooler_output
        from_pixels = _hidden(model, ids, [prompt])
        given = _hidden(model, ids, [prompt], [tower])
        other = _hidden(model, ids, [prompt], [torch.zeros_like(tower)])
    torch.testing.assert_close(given, from_pixels, rtol=0, atol=1e-5)
    assert (other - from_pixels).abs().max() > 1e-2  # and they do matter


def test_each_stage_trains_only_its_parameters(fresh_vqa):
    """read: the language model only; see: the vision tower only."""
    import copy

    import torch

    from caprl_core.world.vqa_train import Stage, train_vqa

    base, prompter = fresh_vqa
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    for stage, moved in (("read", {"language"}), ("see", {"vision"})):
        model = copy.deepcopy(base)
        steps = {name: Stage(name, int(name == stage), 2, 1e-3) for name in ("read", "see")}
        train_vqa(model, prompter, **steps, seed=0)
        changed = {"vision" if n.startswith("model.visual.") else "language"
                   for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}  # fmt: skip
        assert changed == moved, stage


def test_rotations_put_the_answer_in_distinct_slots():
    from caprl_core.world.vqa import rotations

    for k in range(MIN_OPTIONS, MAX_OPTIONS + 1):
        orders = rotations(k)
        assert len(orders) == 4 and all(sorted(o) == list(range(k)) for o in orders)
        assert len({o.index(0) for o in orders}) == 4


def test_build_only_vqa_needs_a_build(tmp_path):
    from caprl_core.world.__main__ import main

    with pytest.raises(SystemExit):
        main(["build", "--only", "vqa", "--out", str(tmp_path), "--no-progress"])


# --- the shipped VQA model: the acceptance figure -----------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout():
    from caprl_core.world.vqa import heldout_items

    return heldout_items(24, 31_337)  # 48 questions of held-out scenes, about half leaky, none seen in training


def shortfalls(figures: dict) -> list[str]:
    """What the filter with a VQA model gets wrong on the held-out sample, by the acceptance bars: visual questions
    kept (>= 90% with the soft score) because the model sees them (soft accuracy with the image >= 0.9); leaky ones
    dropped (>= 95%, in both scores) because the model answers them from their text (>= 90% of rotations right without
    the image), not merely because it answers nothing."""
    soft, hard = figures["soft"], figures["hard"]
    checks = {"visual kept >= 0.9": soft["visual"]["kept"] >= 0.9,
              "visual seen >= 0.9": soft["visual"]["image_accuracy"] >= 0.9,
              "leaky dropped >= 0.95": soft["leaky"]["dropped"] >= 0.95 and hard["leaky"]["dropped"] >= 0.95,
              "leaky answered blind >= 0.9": hard["leaky"]["text_accuracy"] >= 0.9}  # fmt: skip
    return [name for name, ok in checks.items() if not ok]


def shipped_figures(heldout, random_weights: bool) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from caprl_core.curate.prompts import VQAPrompter
    from caprl_core.policy import load_policy
    from caprl_core.world import SHIPPED
    from caprl_core.world.vqa import measure

    model, tokenizer, image_processor = load_policy(SHIPPED / "vqa")
    if random_weights:
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(model.config).eval()
    return measure(model, VQAPrompter.from_directory(SHIPPED / "vqa", tokenizer, image_processor), heldout)


def test_the_shipped_vqa_model_keeps_visual_questions_and_drops_leaky_ones(heldout):
    """On 48 candidate questions of held-out images, scored as the curation filter scores (4 rotations, with and
    without the image): the acceptance bars hold with the soft score (docs/world.md has the 384-question figures).
    With the hard score the visual bar cannot hold for any model that cannot see without the image (docs/curate.md):
    there the shipped model keeps about 40%."""
    figures = shipped_figures(heldout, random_weights=False)
    assert figures["questions"]["visual"] >= 15 and figures["questions"]["leaky"] >= 15, figures
    assert shortfalls(figures) == [], figures
    assert figures["hard"]["visual"]["kept"] < 0.9, figures  # the floor of the hard score, as documented


def test_a_random_vqa_model_fails_those_checks(heldout):
    """The shipped architecture with random weights drops the leaky questions too, but because it answers nothing:
    the checks above tell it from the trained model."""
    figures = shipped_figures(heldout, random_weights=True)
    assert {"leaky answered blind >= 0.9", "visual seen >= 0.9", "visual kept >= 0.9"} <= set(shortfalls(figures))
