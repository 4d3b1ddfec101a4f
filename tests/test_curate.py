"""QA curation end to end (caprl_core.curate): generate on a tiny random VLM (nothing parseable: 0 kept, said in one
line), the filter's logit scoring against a plain transformers forward, a filter run SIGKILLed mid-write and resumed
(same files as an uninterrupted run), the verl rows read back by `convert`, and the command-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from caprl_core.convert import convert_file
from caprl_core.curate.__main__ import main
from caprl_core.curate.filter import FilterConfig, QuestionFilter, rotation
from caprl_core.curate.prompts import VQAPrompter
from caprl_core.curate.run import KILL_ENV, output_paths
from caprl_core.curate.store import ProgressLog, dataset_row, verl_row, write_jsonl_atomic
from caprl_core.data import DataError, load_jsonl
from caprl_core.models import write_real_format_dirs
from caprl_core.policy import load_policy
from caprl_core.world import make_world_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    """A Qwen2.5-VL directory in the real layout, random weights, test widths, 2 layers."""
    policy, _ = write_real_format_dirs(tmp_path_factory.mktemp("models"), widths="test")
    return policy


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> Path:
    """6 world images with their questions (4 to 6 per image), in the dataset format."""
    return make_world_data(tmp_path_factory.mktemp("world"), "heldout", 6)


def test_generate_on_a_tiny_random_vlm_keeps_nothing_and_says_so(vlm, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (112, 112), colour).save(images / f"{i}.png")
    out = tmp_path / "cand" / "candidates.jsonl"
    summary = main(["generate", "--model", str(vlm), "--images", str(images), "--out", str(out),
                    "--max-new-tokens", "48", "--batch-size", "2", "--no-progress"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("generate: 0 questions kept for 0 of 3 images")
    assert "nothing parseable" in lines[0]
    assert summary["images"] == 3 and summary["parsed"] == 0 and summary["engine"]["sampled_tokens"] > 0
    assert out.read_text() == ""  # written (atomically), empty
    saved = json.loads(output_paths(out)["summary"].read_text())
    assert saved["stage"] == "generate" and saved["repetition_penalty"] == 1.05 and saved["temperature"] == 0.1


@pytest.mark.parametrize("score", ["hard", "soft"])
def test_logit_scores_match_a_plain_forward(vlm, candidates, score):
    model, tokenizer, image_processor = load_policy(vlm)
    prompter = VQAPrompter.from_directory(vlm, tokenizer, image_processor)
    qfilter = QuestionFilter(model, prompter, FilterConfig(rotations=3, score=score))
    example = load_jsonl(candidates).examples[0]
    image = Image.open(example.image)
    got = qfilter.accuracies(image, list(example.questions))
    stats = qfilter.engine.stats
    # one image run through the vision tower for all its questions; the rotations share the question stem
    assert stats.vision_calls == 1 and stats.cached_tokens > stats.prefill_tokens
    vision = prompter.image_inputs(image)
    head = model.get_output_embeddings().weight
    for mcq, pair in zip(example.questions, got, strict=True):
        want = []
        for vis in (vision, None):
            right = 0
            for r in range(3):
                order = rotation(len(mcq.options), r)
                p = prompter(vis, mcq.question, [mcq.options[k] for k in order])
                inputs = {"input_ids": p["input_ids"][None]}
                if vis is not None:
                    inputs.update(pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"])
                with torch.no_grad():
                    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
                letters = hidden @ head[prompter.letter_token_ids(len(order))].T
                answer = order.index(mcq.answer)
                others = torch.cat([letters[:answer], letters[answer + 1 :]])
                if score == "hard":  # strictly highest
                    right += bool(letters[answer] > others.max())
                else:  # its probability over the options
                    right += float(letters.softmax(-1)[answer])
            want.append(right / 3)
        # soft: the engine's paged prefill and a plain forward differ in fp32 summation order; measured 3.1e-5 apart
        assert pair == pytest.approx(tuple(want), **({} if score == "hard" else {"abs": 2e-4})), mcq


def _filter(vlm: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["filter", "--model", str(vlm), "--in", str(inp), "--out", str(out), "--no-progress", *extra]


def test_filter_killed_mid_write_resumes_to_the_uninterrupted_output(vlm, candidates, tmp_path):
    # a random model picks one letter whatever the options: accuracy 1 / (number of options) or so, with the image or
    # not; these thresholds then keep some questions (those with 2 options) and drop others
    loose = ["--min-visual-accuracy", "0.3", "--max-text-accuracy", "0.6"]
    clean = tmp_path / "clean" / "kept.jsonl"
    summary = main(_filter(vlm, candidates, clean, *loose))
    assert summary["candidates"] == sum(len(e.questions) for e in load_jsonl(candidates).examples)
    assert 0 < summary["kept"] < summary["candidates"], summary
    crashed = tmp_path / "crashed" / "kept.jsonl"
    cmd = [sys.executable, "-m", "caprl_core.curate", *_filter(vlm, candidates, crashed, *loose)]
    killed = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, KILL_ENV: "2"})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    progress = output_paths(crashed)["progress"]
    assert not crashed.exists() and not progress.read_bytes().endswith(b"\n")  # 2 images + half a line
    resumed = main(_filter(vlm, candidates, crashed, *loose))
    assert resumed["resumed_images"] == 2 and resumed["images"] == 6 and not progress.exists()
    for name in ("data", "verl", "scores"):
        assert output_paths(crashed)[name].read_bytes() == output_paths(clean)[name].read_bytes(), name
    assert load_jsonl(crashed).examples  # what train --data reads
    kept = [q for line in crashed.read_text().splitlines() for q in json.loads(line)["questions"]]
    assert all(q["visual_accuracy"] > 0.3 and q["text_accuracy"] < 0.6 and q["kept"] for q in kept)


def test_progress_log_cuts_a_partial_line_and_refuses_another_input(tmp_path):
    path = tmp_path / "log.progress"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "quest')
    log = ProgressLog(path)
    assert [r["id"] for r in log.done] == ["a", "b"]
    log.check_order(["a", "b", "c"])
    log.append({"id": "c"})
    log.close()
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'
    with pytest.raises(DataError, match="not of this input"):
        ProgressLog(path).check_order(["x", "a", "b", "c"])


def test_verl_rows_convert_back_to_the_same_dataset(tmp_path):
    image = tmp_path / "img" / "0.png"
    image.parent.mkdir()
    Image.new("RGB", (56, 56), "red").save(image)
    questions = [{"question": "What colour?", "options": ["red", "blue", "U.S.", "green"], "answer": 2,
                  "visual_accuracy": 1.0}]  # fmt: skip
    write_jsonl_atomic(tmp_path / "d.jsonl", [dataset_row("0", image, questions, tmp_path)])
    write_jsonl_atomic(tmp_path / "d.verl.jsonl", [verl_row("0", image, questions, tmp_path)])
    convert_file(tmp_path / "d.verl.jsonl", tmp_path / "back.jsonl")
    ours, back = load_jsonl(tmp_path / "d.jsonl").examples, load_jsonl(tmp_path / "back.jsonl").examples
    assert [(e.id, e.image, e.questions) for e in ours] == [(e.id, e.image, e.questions) for e in back]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["filter", "--model", "M", "--in", "nowhere.jsonl", "--out", "o.jsonl"], "--in: nowhere.jsonl does not exist"),
        (["filter", "--model", "M", "--in", "x", "--out", "o", "--rotations", "0"], "rotations must be an integer"),
        (["generate", "--model", "nowhere", "--images", "IMG", "--out", "o"], "--images: IMG does not exist"),
        (["filter", "--model", "nowhere", "--in", "IN", "--out", "o"], "--model: nowhere does not exist"),
    ],
)
def test_errors_are_one_line_naming_the_flag(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN").write_text("")
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and match in err, err


def test_sampled_mode_generates_and_parses_replies(vlm, candidates):
    model, tokenizer, image_processor = load_policy(vlm)
    prompter = VQAPrompter.from_directory(vlm, tokenizer, image_processor)
    qfilter = QuestionFilter(model, prompter, FilterConfig(mode="sampled", max_new_tokens=4))
    example = load_jsonl(candidates).examples[0]
    got = qfilter.accuracies(Image.open(example.image), list(example.questions))
    assert len(got) == len(example.questions)
    assert all(4 * a == int(4 * a) and 0 <= a <= 1 for pair in got for a in pair)
    assert qfilter.engine.stats.decode_steps > 0 and qfilter.engine.stats.vision_calls == 1


def test_drop_reasons():
    c = FilterConfig()
    assert c.drop_reason(1.0, 0.0) is None
    assert c.drop_reason(0.75, 0.0) == "not_visual"  # strictly above 0.75 is needed
    assert c.drop_reason(1.0, 0.25) == "leaky"  # strictly below 0.25 is needed
    assert c.drop_reason(0.5, 0.5) == "leaky_and_not_visual"
    with pytest.raises(ValueError, match="mode"):
        FilterConfig(mode="vote")
    with pytest.raises(ValueError, match="score"):
        FilterConfig(score="vote")
    with pytest.raises(ValueError, match='score "soft" needs mode "logits"'):
        FilterConfig(mode="sampled", score="soft")


def test_a_resume_with_other_filter_settings_is_refused_naming_the_flag(tmp_path):
    path = tmp_path / "log.progress"
    logged = FilterConfig().settings()
    path.write_text(json.dumps({"id": "a", "questions": [], "settings": logged}) + "\n")
    log = ProgressLog(path)
    log.check_settings(FilterConfig().settings())  # the same settings: resumes
    with pytest.raises(DataError, match=r"--score hard \(logged\) vs soft.*--no-resume"):
        log.check_settings(FilterConfig(score="soft").settings())
    with pytest.raises(DataError, match=r"--min-visual-accuracy 0.75 \(logged\) vs 0.5"):
        log.check_settings(FilterConfig(min_visual=0.5).settings())
    log.close()


@pytest.mark.slow
def test_train_reads_a_filter_output_for_two_steps(candidates, tmp_path):
    """The shipped world VLM filters the world's questions (loose thresholds: it is a captioner, not a VQA model),
    then `train --data` runs 2 steps on the result (45 s on the 2-core dev machine at load 12)."""
    kept = tmp_path / "kept.jsonl"
    from caprl_core.world import SHIPPED

    main(_filter(SHIPPED / "policy", candidates, kept, "--min-visual-accuracy", "0.3", "--max-text-accuracy", "0.6"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "caprl_core.train", "--data", str(kept), "--steps", "2", "--images-per-step", "2",
           "--group-size", "3", "--max-new-tokens", "8", "--num-draws", "2", "--progress", "false",
           "--output-dir", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert json.loads((out / "config.json").read_text())["data"]["data"] == str(kept)
