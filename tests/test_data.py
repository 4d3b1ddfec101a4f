"""Dataset loading, validation and the synthetic dataset.

The synthetic answers are checked against the pixels: the caption is parsed back into a scene, the scene is checked
against the drawn image (colour of every pixel in a cell, and the kind from how much of its bounding box the shape
fills), and every answer is checked against that scene.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caprl_core import data
from caprl_core.data import MCQ, DataError, load_image, load_jsonl
from caprl_core.world import scenes
from caprl_core.world.scenes import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
# The four cells of the synthetic images: the middles of the edges of a 3x3 grid, (row, column).
CELLS = {"top": (0, 1), "left": (1, 0), "right": (1, 2), "bottom": (2, 1)}


def _no_warnings_load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_jsonl(path, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Synthetic dataset: the truth of every answer.


def _parse_caption(caption: str) -> dict[str, tuple[str, str]]:
    """{cell: (colour, kind)} of the shapes in 'top: red circle. left: none. right: blue square. bottom: none.'."""
    found = re.findall(r"(\w+): (none|\w+ (?:circle|square|triangle))\.", caption)
    assert [cell for cell, _ in found] == list(CELLS), caption  # every cell, in reading order
    return {cell: tuple(content.split()) for cell, content in found if content != "none"}


def _scene_in_image(image: Image.Image) -> dict[str, tuple[tuple[int, ...], str]]:
    """{cell: (rgb, kind)} read from the pixels: kind from the fill fraction of the shape's bounding box; the rest of
    each cell is its shade, and every pixel outside the four cells is white."""
    pixels = np.asarray(image)  # [S, S, 3]
    third = pixels.shape[0] // 3
    scene = {}
    ink_anywhere = (pixels != 255).any(axis=-1)  # [S, S]
    for cell, (row, col) in CELLS.items():
        window = pixels[row * third : (row + 1) * third, col * third : (col + 1) * third]  # [S/3, S/3, 3]
        assert (window[0, 0] == scenes.CELL_SHADES[cell]).all(), f"{cell}: corner is not the cell's shade"
        ink = (window != scenes.CELL_SHADES[cell]).any(axis=-1)
        ink_anywhere[row * third : (row + 1) * third, col * third : (col + 1) * third] = False
        if not ink.any():
            continue
        colours = np.unique(window[ink], axis=0)
        assert len(colours) == 1, f"{cell}: several colours {colours}"
        ys, xs = np.nonzero(ink)
        fill = ink.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        # square 1.0, circle pi/4 = 0.79, triangle 0.5 (plus edge pixels)
        kind = "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle"
        scene[cell] = (tuple(int(c) for c in colours[0]), kind)
    assert not ink_anywhere.any(), "ink outside the four cells"
    return scene


def _true_answer(question: str, scene: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(question kind, right option) for a synthetic question about `scene` ({cell: (colour, kind)})."""
    if m := re.fullmatch(r"What is at the (\w+)\?", question):
        return "content", " ".join(scene[m[1]]) if m[1] in scene else "none"
    if m := re.fullmatch(r"What colour is the shape at the (\w+)\?", question):
        return "colour", scene[m[1]][0]  # asked only of a cell with a shape
    if m := re.fullmatch(r"What shape is at the (\w+)\?", question):
        return "kind", scene[m[1]][1]
    raise AssertionError(f"unknown question kind: {question!r}")


def test_synthetic_round_trip(tmp_path):
    path = make_synthetic_dataset(tmp_path, 32, seed=0)
    assert path == tmp_path / "data.jsonl"
    assert '"image": "images/' in path.read_text()  # stored relative
    result = _no_warnings_load(path)
    assert len(result.examples) == 32 and result.errors == [] and result.num_skipped == 0
    assert len({ex.id for ex in result.examples}) == 32
    kinds_seen = set()
    for ex in result.examples:
        assert ex.image.is_absolute() and ex.image.parent == tmp_path / "images"
        assert len(ex.questions) == 6 and len({q.question for q in ex.questions}) == 6
        image = load_image(ex.image)
        assert image.mode == "RGB" and image.size == (84, 84)
        scene = _parse_caption(ex.caption)
        in_image = _scene_in_image(image)
        assert in_image == {p: (scenes.COLOURS[c], k) for p, (c, k) in scene.items()}, ex.caption
        for q in ex.questions:
            assert 2 <= len(q.options) <= 4
            kind, right = _true_answer(q.question, scene)
            assert q.options[q.answer] == right, (ex.caption, q)
            kinds_seen.add(kind)
    assert kinds_seen == {"content", "colour", "kind"}


def test_scene_questions_are_true_and_varied():
    rng = random.Random(123)
    answers_by_num_options = {2: [], 3: [], 4: []}
    for _ in range(200):
        scene = scenes.synthetic_scene(rng)
        truth = {s.position: (s.colour, s.kind) for s in scene.shapes}
        assert _parse_caption(scenes.describe(scene)) == truth
        questions = scenes.scene_questions(scene, rng, 100)
        assert len(questions) >= 6 and len({q.question for q in questions}) == len(questions)
        for q in questions:
            assert q.options[q.answer] == _true_answer(q.question, truth)[1]
            answers_by_num_options[len(q.options)].append(q.answer)
        assert len(scenes.scene_questions(scene, rng, 3)) == 3
    # the right option's position is uniform: with k options each position gets about 1/k of the answers
    for k, answers in answers_by_num_options.items():
        counts = np.bincount(answers, minlength=k)
        assert len(answers) > 200 and min(counts) > 0.7 * len(answers) / k, (k, counts)


def test_synthetic_is_deterministic(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", 8, seed=5)
    b = make_synthetic_dataset(tmp_path / "b", 8, seed=5)
    c = make_synthetic_dataset(tmp_path / "c", 8, seed=6)
    assert a.read_text() == b.read_text()
    for png in sorted((tmp_path / "a" / "images").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "b" / "images" / png.name).read_bytes()
    assert a.read_text() != c.read_text()


@pytest.mark.parametrize("kwargs", [dict(num_images=0), dict(image_size=8), dict(questions_per_image=0)])
def test_synthetic_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_synthetic_dataset(tmp_path, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Validation: one line per kind of error.


def _question(**overrides):
    return {"question": "What colour?", "options": ["red", "blue", "green"], "answer": 0, **overrides}


def _line(image="img/good.png", questions=None, **extra):
    return json.dumps({"image": image, "questions": [_question()] if questions is None else questions, **extra})


def _write_images(root: Path) -> None:
    (root / "img").mkdir()
    good = io.BytesIO()
    scenes.draw_scene(scenes.synthetic_scene(random.Random(0)), 32).save(good, "PNG")
    (root / "img" / "good.png").write_bytes(good.getvalue())
    (root / "img" / "garbage.png").write_bytes(b"this is not a png")
    (root / "img" / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])


# (line, substring of its error message); None marks a good line. Blank lines are ignored.
def _broken_lines(root: Path) -> list[tuple[str | bytes, str | None]]:
    q = _question
    return [
        (_line(id="a"), None),  # relative path, int answer
        ("", None),
        (_line(str(root / "img" / "good.png"), [q(answer="B")], id="b", caption="ref"), None),  # absolute, letter
        (_line(questions=[q(answer="c"), q(answer=1)], id=7, extra_key=[1]), None),  # lower-case letter, int id
        (_line(), None),  # no id: "<stem>:<line>"
        ("   ", None),
        ('{"image": "img/good.png", "questions": [', "invalid JSON"),
        (b'{"image": "img/\xff.png"}', "invalid UTF-8"),
        ("[1, 2]", "expected a JSON object, got a list"),
        (json.dumps({"questions": [q()]}), 'missing key "image"'),
        (_line(5), '"image": expected a string, got an int'),
        (_line(""), '"image": expected a non-empty path'),
        (json.dumps({"image": "img/good.png"}), 'missing key "questions"'),
        (_line(questions="what?"), '"questions": expected a list, got a string'),
        (json.dumps({"image": "img/good.png", "questions": []}), '"questions": empty list'),
        (_line(questions=["what?"]), "questions[0]: expected a JSON object, got a string"),
        (_line(questions=[{"options": ["a", "b"], "answer": 0}]), 'questions[0]: missing key "question"'),
        (_line(questions=[q(question=3)]), 'questions[0]: "question": expected a string, got an int'),
        (_line(questions=[{"question": "q", "answer": 0}]), 'questions[0]: missing key "options"'),
        (_line(questions=[q(options="ab")]), 'questions[0]: "options": expected a list, got a string'),
        (
            _line(questions=[q(options=["only"])]),
            f"questions[0]: options: expected 2 to {data.MAX_OPTIONS} options, got 1",
        ),
        (
            _line(questions=[q(options=[f"o{i}" for i in range(data.MAX_OPTIONS + 1)])]),
            f"expected 2 to {data.MAX_OPTIONS} options, got {data.MAX_OPTIONS + 1}",
        ),
        (_line(questions=[q(options=["a", "a"])]), "questions[0]: options: expected distinct options"),
        (_line(questions=[q(options=["a", " "])]), "questions[0]: options[1]: expected a non-empty string"),
        (_line(questions=[q(options=["a", 2])]), "questions[0]: options[1]: expected a non-empty string"),
        (_line(questions=[{"question": "q", "options": ["a", "b"]}]), 'questions[0]: missing key "answer"'),
        (_line(questions=[q(answer=3)]), "questions[0]: answer: index 3 is outside the 3 options"),
        (_line(questions=[q(answer=-1)]), "answer: index -1 is outside the 3 options"),
        (_line(questions=[q(answer="D")]), "answer: letter 'D' is beyond the 3 options (A-C)"),
        (_line(questions=[q(answer="AB")]), 'answer: expected an option index or a letter "A".."Z"'),
        (_line(questions=[q(answer=1.0)]), '"answer": expected an int or a string, got a number'),
        (_line(questions=[q(answer=True)]), '"answer": expected an int or a string, got a boolean'),
        (_line(questions=[q(answer=None)]), '"answer": expected an int or a string, got null'),
        (_line(questions=[q(), q(answer=9)]), "questions[1]: answer: index 9"),  # only the second is bad
        (_line(caption=3), '"caption": expected a string or null, got an int'),
        (_line(id=["x"]), '"id": expected a string or an int, got a list'),
        (_line("img/missing.png", id="z"), "image file not found: "),
        (_line("img"), "image file not found: "),  # a directory
        (_line("img/garbage.png"), "unreadable image "),
        (_line("img/truncated.png"), "unreadable image "),
        (_line(id="a"), "duplicate id 'a' (first on line 1)"),
        (_line(5, questions=[]), '"image": expected a string, got an int; "questions": empty list'),  # all reported
        (_line(id="z"), None),  # its id's first line was skipped, so it is no duplicate
    ]


def _write_broken(tmp_path: Path) -> tuple[Path, list[tuple[int, str | None]]]:
    _write_images(tmp_path)
    lines = _broken_lines(tmp_path)
    raw = b"\n".join(line.encode() if isinstance(line, str) else line for line, _ in lines) + b"\n"
    path = tmp_path / "broken.jsonl"
    path.write_bytes(raw)
    expected = [(lineno, err) for lineno, (line, err) in enumerate(lines, start=1) if str(line).strip()]
    return path, expected


def test_skip_keeps_good_lines_and_reports_each_bad_one(tmp_path):
    path, expected = _write_broken(tmp_path)
    bad = [(lineno, err) for lineno, err in expected if err is not None]
    with pytest.warns(UserWarning) as caught:
        result = load_jsonl(path)
    assert len(caught) == 1
    summary = str(caught[0].message)
    assert summary.startswith(f"{path}: {len(bad)} of {len(expected)} lines skipped")
    assert f"{path}:{bad[0][0]}: invalid JSON" in summary and f"... and {len(bad) - 5} more" in summary

    assert [ex.id for ex in result.examples] == ["a", "b", "7", "broken:5", "z"]
    assert [ex.source for ex in result.examples] == [f"{path}:{n}" for n in (1, 3, 4, 5, expected[-1][0])]
    assert {ex.image for ex in result.examples} == {tmp_path / "img" / "good.png"}
    assert result.examples[0].questions == (MCQ("What colour?", ("red", "blue", "green"), 0),)
    assert result.examples[1].questions[0].answer == 1 and result.examples[1].caption == "ref"
    assert [q.answer for q in result.examples[2].questions] == [2, 1]
    assert result.examples[0].caption is None

    assert result.num_skipped == len(bad) == len(result.errors)
    for (lineno, err), message in zip(bad, result.errors, strict=True):
        assert message.startswith(f"{path}:{lineno}: "), message
        assert err in message, (err, message)


def test_every_question_the_validator_accepts_can_be_scored(tmp_path):
    """The validator's option limit and the reward's derive from one constant: questions of every size the validator
    accepts, each answer in the last place, are scored by the reward as train builds it (default RewardConfig, with
    "cannot answer" appended); one option more is a file:line error, not a crash mid-run."""
    from caprl_core.models import tiny_qwen2, tiny_tokenizer
    from caprl_core.reward import CapRLReward
    from caprl_core.reward_config import RewardConfig

    _write_images(tmp_path)
    sizes = range(2, data.MAX_OPTIONS + 1)
    questions = [_question(options=[f"option {i}" for i in range(n)], answer=n - 1) for n in sizes]
    too_many = _question(options=[f"option {i}" for i in range(data.MAX_OPTIONS + 1)])
    path = tmp_path / "sizes.jsonl"
    path.write_text(_line(questions=questions, id="ok") + "\n" + _line(questions=[too_many], id="big") + "\n")
    with pytest.raises(DataError) as error:
        load_jsonl(path, on_error="raise")
    assert error.value.errors == [f"{path}:2: questions[0]: options: expected 2 to {data.MAX_OPTIONS} options, got "
                                  f"{data.MAX_OPTIONS + 1}"]  # fmt: skip
    with pytest.warns(UserWarning, match="1 of 2 lines skipped"):
        (example,) = load_jsonl(path).examples
    tokenizer = tiny_tokenizer()
    reward = CapRLReward(tiny_qwen2(tokenizer=tokenizer), tokenizer, RewardConfig(num_draws=1))
    pools = [[mcq] for mcq in example.questions]  # one question per row: every size is drawn
    rewards, details = reward.score(["a red circle"] * len(pools), pools, step=0)
    assert rewards.shape == (len(pools),) and bool(((rewards == 0) | (rewards == 1)).all())
    assert all(0 <= p <= 1 for p in details.correct_prob)


def test_raise_lists_every_bad_line(tmp_path):
    path, expected = _write_broken(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raise mode does not also warn
        with pytest.raises(DataError) as info:
            load_jsonl(path, on_error="raise")
    bad = [(lineno, err) for lineno, err in expected if err is not None]
    assert isinstance(info.value, ValueError) and len(info.value.errors) == len(bad)
    assert str(info.value).startswith(f"{path}: {len(bad)} of {len(expected)} lines are invalid")
    for lineno, err in bad:
        assert f"{path}:{lineno}: " in str(info.value) and err in str(info.value)


def test_check_images_off_skips_only_the_file_checks(tmp_path):
    _write_images(tmp_path)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([_line("img/missing.png", id="m"), _line("img/garbage.png", id="g")]))
    result = _no_warnings_load(path, check_images=False)
    assert [ex.image.name for ex in result.examples] == ["missing.png", "garbage.png"]


def test_byte_order_mark_and_crlf_line_ends(tmp_path):
    _write_images(tmp_path)
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{_line(id='x')}\r\n\r\n{_line(id='y')}\r\n".encode())
    result = _no_warnings_load(path)
    assert [(ex.id, ex.source) for ex in result.examples] == [("x", f"{path}:1"), ("y", f"{path}:3")]


def test_no_valid_examples_raises_in_both_modes(tmp_path):
    _write_images(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line("img/missing.png") + "\n[]\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    for on_error in ("skip", "raise"):
        with pytest.raises(DataError, match="no valid examples") as info:
            load_jsonl(bad, on_error=on_error)
        assert f"{bad}:1: image file not found" in str(info.value) and len(info.value.errors) == 2
        with pytest.raises(DataError, match=f"{re.escape(str(blank))}: no valid examples"):
            load_jsonl(blank, on_error=on_error)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl(bad, on_error="ignore")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(question="", options=("a", "b"), answer=0), "question"),
        (dict(question="q", options=("a",), answer=0), "options"),
        (dict(question="q", options="ab", answer=0), "options"),
        (dict(question="q", options=("a", "a"), answer=0), "options"),
        (dict(question="q", options=("a", ""), answer=0), r"options\[1\]"),
        (dict(question="q", options=("a", "b"), answer=2), "answer"),
        (dict(question="q", options=("a", "b"), answer=True), "answer"),
    ],
)
def test_mcq_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        MCQ(**kwargs)


def test_mcq_stores_options_as_tuple():
    q = MCQ("q", ["a", "b"], 1)
    assert q.options == ("a", "b")
    with pytest.raises(AttributeError):
        q.answer = 0


def test_load_image_is_rgb_and_upright(tmp_path):
    Image.new("P", (4, 3)).save(tmp_path / "p.png")
    Image.new("RGBA", (4, 3), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    rotated = Image.new("RGB", (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    rotated.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "p.png").mode == "RGB"
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (1, 2, 3)
    assert load_image(tmp_path / "r.jpg").size == (10, 20)


# --------------------------------------------------------------------------------------------------------------
# Command line.


def _cli(*args, hash_seed="0"):
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    cmd = [sys.executable, "-m", "caprl_core.data", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def test_cli_make_synthetic_then_validate(tmp_path):
    # Another hash seed than this process: set iteration order must not leak into the data.
    run = _cli("make-synthetic", "--out", tmp_path / "cli", "--num", 4, "--seed", 3, hash_seed="12345")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(tmp_path / "cli" / "data.jsonl")
    here = make_synthetic_dataset(tmp_path / "here", 4, seed=3)
    assert (tmp_path / "cli" / "data.jsonl").read_bytes() == here.read_bytes()
    assert (tmp_path / "cli/images/00003.png").read_bytes() == (tmp_path / "here/images/00003.png").read_bytes()

    run = _cli("validate", here, "--strict")
    assert run.returncode == 0, run.stderr
    assert "4 examples, 24 questions, 0 lines skipped" in run.stdout

    run = _cli("make-synthetic", "--out", tmp_path / "x", "--num", 0)
    assert run.returncode == 2 and "num_images" in run.stderr


def test_cli_validate_broken(tmp_path):
    path, expected = _write_broken(tmp_path)
    bad = [lineno for lineno, err in expected if err is not None]
    run = _cli("validate", path)
    assert run.returncode == 0, run.stderr
    assert f"5 examples, 6 questions, {len(bad)} lines skipped" in run.stdout
    assert all(f"{path}:{lineno}: " in run.stdout for lineno in bad)
    assert _cli("validate", path, "--strict").returncode == 1

    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("not json\n")
    run = _cli("validate", only_bad)
    assert run.returncode == 1 and f"{only_bad}:1: invalid JSON" in run.stderr
    assert _cli("validate", tmp_path / "nope.jsonl").returncode == 1
