"""`python -m caprl_core.data convert`: the released verl-style QA rows (JSONL and parquet) to this project's JSONL,
good rows converted exactly, every kind of bad row reported as file:row and left out."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from caprl_core.convert import convert_file
from caprl_core.data import DataError, load_jsonl
from caprl_core.data.__main__ import main
from caprl_core.qa_rows import parse_question

PROMPT = [{"role": "user", "content": "<image>Please describe this image in detail."}]
TRUTH = [
    {"question": "What colour is the bus?", "choices": ["A. Red", "B. Blue", "C. Green"], "answer": "B"},
    {"question": "How many people?", "choices": ["A) 1", "B) 2", "C) 3", "D) Can not answer based on the caption"],
     "answer": "C"},
]  # fmt: skip


def _row(**changes) -> dict:
    row = {"prompt": PROMPT, "images": ["imgs/a.png"], "data_source": "caprl",
           "reward_model": {"ground_truth": TRUTH}, "extra_info": {"index": 7}}  # fmt: skip
    row.update(changes)
    return row


def _truth(**changes) -> dict:
    return {"reward_model": {"ground_truth": [{**TRUTH[0], **changes}]}}


# Every kind of bad row, with the words its message must contain.
BAD_ROWS = [
    (_row(images=[]), "exactly one image"),
    (_row(images=["imgs/a.png", "imgs/b.png"]), "exactly one image"),
    (_row(images="imgs/a.png"), '"images": expected a list'),
    (_row(images=[{"bytes": "..."}]), "embedded bytes"),
    (_row(images=["imgs/missing.png"]), "image file not found"),
    (_row(prompt=[{"role": "user", "content": "Describe it."}]), "0 <image> placeholders"),
    (_row(prompt="<image>Describe it."), '"prompt": expected a list of chat messages'),
    (_row(reward_model={}), "ground_truth"),
    (_row(reward_model={"ground_truth": "[{not json"}), "not JSON"),
    (_row(reward_model={"ground_truth": []}), "non-empty list"),
    (_row(**_truth(answer="D")), "not one of the 3 choices"),
    (_row(**_truth(answer=2)), '"answer": expected one letter'),
    (_row(**_truth(answer="")), '"answer": expected one letter'),
    (_row(**_truth(answer="BC")), '"answer": expected one letter'),
    (_row(**_truth(answer="B Blue")), '"answer": expected one letter'),
    (_row(**_truth(answer="B) Green")), "names option B, whose text is 'Blue'"),
    (_row(**_truth(choices=["A. Red", "C. Blue"])), "labelled 'C', expected 'B'"),
    (_row(**_truth(choices=["A. Red"], answer="A")), "2 to 8 options"),
    (_row(**_truth(choices=["A. Red", "B. Red"], answer="A")), "distinct"),
    (_row(**_truth(choices="A. Red")), '"choices": expected a list'),
    (_row(**_truth(question="")), "question"),
    (_row(**_truth(choices=["A. Red", "B. Can not answer based on the caption"])), '"can not answer" choice'),
    (_row(data_source=3), '"data_source"'),
    ([1, 2], "expected an object"),
]


@pytest.fixture()
def image_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "imgs" / "a.png")
    return tmp_path


def _expect_good(out_path, image_dir) -> None:
    result = load_jsonl(out_path, on_error="raise")
    assert len(result.examples) == 2
    first, second = result.examples
    assert first.id == "7" and second.id == "rows:3"  # extra_info.index once; the repeated index falls back
    assert first.image.resolve() == (image_dir / "imgs" / "a.png").resolve()
    assert [(q.question, q.options, q.answer) for q in first.questions] == [
        ("What colour is the bus?", ("Red", "Blue", "Green"), 1),
        ("How many people?", ("1", "2", "3"), 2),  # the file's "can not answer" choice dropped: the reward adds one
    ]
    assert json.loads(out_path.read_text().splitlines()[0])["data_source"] == "caprl"


def test_image_given_as_an_object_with_a_path(image_dir, tmp_path):
    src = image_dir / "rows.jsonl"
    src.write_text(json.dumps(_row(images=[{"path": "imgs/a.png", "bytes": None}])) + "\n")
    result = convert_file(src, tmp_path / "data.jsonl")
    assert result.num_written == 1 and not result.errors


def test_jsonl_good_rows_convert_and_every_bad_row_is_reported(image_dir, tmp_path):
    src = image_dir / "rows.jsonl"
    good = [_row(), _row(reward_model={"ground_truth": json.dumps(TRUTH)})]  # ground truth as a JSON string too
    lines = [json.dumps(good[0]), "", json.dumps(good[1])] + [json.dumps(r) for r, _ in BAD_ROWS] + ["{broken"]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "data.jsonl"
    result = convert_file(src, out)
    assert (result.num_rows, result.num_written) == (len(BAD_ROWS) + 3, 2)
    _expect_good(out, image_dir)
    expected = [(f"{src}:{i + 4}:", words) for i, (_, words) in enumerate(BAD_ROWS)]
    expected.append((f"{src}:{len(lines)}:", "invalid JSON"))
    for prefix, words in expected:  # a bad question: file:row:question, then the row (no good question left)
        row_errors = [e for e in result.errors if e.startswith(prefix)]
        assert row_errors and words in " ".join(row_errors), (prefix, words, row_errors)
    assert all(any(e.startswith(p) for p, _ in expected) for e in result.errors)


def test_image_root_and_parquet(image_dir, tmp_path):
    pytest.importorskip("pyarrow")  # an optional extra (caprl-core[parquet]); the JSONL path needs nothing
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_row(images=["a.png"]), _row(images=["a.png"]), _row(images=["b.png"])]
    for row in rows:  # parquet needs one type per column: the ground truth as JSON strings, as released files do
        row["reward_model"] = {"ground_truth": json.dumps(TRUTH)}
    src = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "data.jsonl"
    result = convert_file(src, out, image_root=image_dir / "imgs")
    assert result.num_written == 2 and len(result.errors) == 1
    assert result.errors[0].startswith(f"{src}:3: image file not found")
    assert load_jsonl(out).examples[0].image.resolve() == (image_dir / "imgs" / "a.png").resolve()


def test_missing_pyarrow_is_an_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    src = tmp_path / "rows.parquet"
    src.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"rows\.parquet: reading parquet needs pyarrow"):
        convert_file(src, tmp_path / "out.jsonl")


def test_cli_convert_strict_and_no_good_row(image_dir, tmp_path, capsys):
    src = image_dir / "rows.jsonl"
    src.write_text(json.dumps(_row()) + "\n" + json.dumps(_row(images=[])) + "\n")
    out = tmp_path / "data.jsonl"
    assert main(["convert", str(src), str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 rows, 1 written" in text and f"{src}:2: " in text
    assert main(["convert", str(src), str(out), "--strict"]) == 1
    bad = image_dir / "bad.jsonl"
    bad.write_text(json.dumps(_row(images=[])) + "\n")
    assert main(["convert", str(bad), str(tmp_path / "none.jsonl")]) == 1
    assert "no row converts" in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()


@pytest.mark.parametrize(
    "answer,index",
    [("B", 1), ("B)", 1), ("B.", 1), ("B) Blue", 1), (" B. blue ", 1), ("C) Green.", 2)],
)
def test_answers_the_parser_accepts(answer, index):
    mcq = parse_question({**TRUTH[0], "answer": answer})
    assert (mcq.options, mcq.answer) == (("Red", "Blue", "Green"), index)


def test_choices_are_labelled_only_when_all_carry_consecutive_labels():
    us = parse_question({"question": "Which country?", "choices": ["U.S.", "Canada", "U. K."], "answer": "A"})
    assert (us.options, us.answer) == (("U.S.", "Canada", "U. K."), 0)  # "U." is no label: nothing stripped
    mixed = parse_question({"question": "Which?", "choices": ["A. Red", "U.S."], "answer": "B"})
    assert mixed.options == ("A. Red", "U.S.")
    labelled = parse_question({"question": "Which?", "choices": ["(A) U.S.", "(B) Canada"], "answer": "A"})
    assert labelled.options == ("U.S.", "Canada")


def test_a_row_keeps_its_good_questions_and_names_the_bad_ones(image_dir, tmp_path):
    truth = [TRUTH[0], {**TRUTH[0], "answer": ""}, TRUTH[1], {**TRUTH[0], "answer": "BC"},
             {**TRUTH[0], "answer": "B)"}, {**TRUTH[0], "answer": "B) text"}]  # fmt: skip
    src = image_dir / "rows.jsonl"
    src.write_text(json.dumps(_row(reward_model={"ground_truth": truth})) + "\n")
    out = tmp_path / "data.jsonl"
    result = convert_file(src, out)
    assert result.num_written == 1
    assert [e.split(": ")[0] for e in result.errors] == [f"{src}:1:2", f"{src}:1:4", f"{src}:1:6"]
    (example,) = load_jsonl(out, on_error="raise").examples
    assert [(q.options, q.answer) for q in example.questions] == [
        (("Red", "Blue", "Green"), 1),
        (("1", "2", "3"), 2),
        (("Red", "Blue", "Green"), 1),
    ]  # question 1, question 3 (its "can not answer" dropped), question 5 ("B)"): nothing relabelled


def test_trl_and_verl_read_questions_with_the_same_parser():
    from caprl_core.integrations.verl import row_questions

    rows = [TRUTH[0], {**TRUTH[0], "answer": "B)"}, {"question": "Where?", "choices": ["U.S.", "Canada"],
                                                      "answer": "A"}]  # fmt: skip
    with pytest.warns(UserWarning, match=r"ground_truth:4: \"answer\": expected one letter"):
        got = row_questions(rows + [{**TRUTH[0], "answer": "BC"}], None)
    assert got == [parse_question(r) for r in rows]
    assert got[2].options == ("U.S.", "Canada")
    with pytest.raises(ValueError, match="no good question"):
        row_questions([{**TRUTH[0], "answer": ""}], None)
