"""`python -m caprl_core.eval` on a tiny synthetic set: the summary and the per-image details are consistent, every
question is asked exactly once per caption, loading the models from directories gives the built-in defaults'
result, and bad paths are argparse errors that name them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from caprl_core.data import load_jsonl
from caprl_core.eval import main
from caprl_core.evaluator import CaptionEvaluator, EvalConfig
from caprl_core.policy import PolicyPrompter, tiny_policy_and_reader
from caprl_core.world.scenes import make_synthetic_dataset

NUM_IMAGES, K = 4, 2
SUMMARY_KEYS = {"num_images", "num_captions", "num_questions", "mean_accuracy", "best_of_k", "mean_p_correct",
                "mean_caption_tokens", "truncated_fraction", "train_reward", "k", "seconds", "out", "fact_precision",
                "fact_recall"}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), NUM_IMAGES, seed=1, questions_per_image=5)


def _args(data, out, *extra) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--k", str(K), "--max-new-tokens", "8", "--num-draws", "3",
            "--batch-size", "3", *extra]  # fmt: skip


@pytest.fixture
def one_thread():
    """As main() runs the tiny defaults: one thread, so results are bitwise comparable (and fast on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = main(_args(data, out))
    rows = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]
    return summary, rows, out


def test_summary(run):
    summary, _, out = run
    assert SUMMARY_KEYS <= summary.keys()
    # The synthetic set's reference captions are the world's grammar: its facts are known.
    assert 0 <= summary["fact_precision"] <= 1 and 0 <= summary["fact_recall"] <= 1
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["num_images"] == NUM_IMAGES and summary["num_captions"] == NUM_IMAGES * K
    for key in ("mean_accuracy", "best_of_k", "mean_p_correct", "train_reward", "truncated_fraction"):
        assert 0 <= summary[key] <= 1, key
    assert summary["best_of_k"] >= summary["mean_accuracy"]
    assert 0 < summary["mean_caption_tokens"] <= 8


def test_details_count_every_question_once_per_caption(run, data):
    summary, rows, _ = run
    examples = load_jsonl(data).examples
    assert [r["id"] for r in rows] == [ex.id for ex in examples]
    for row, ex in zip(rows, examples, strict=True):
        assert len(row["captions"]) == len(row["caption_tokens"]) == len(row["train_reward"]) == K
        assert np.shape(row["correct"]) == (K, len(ex.questions)) and len(row["p_correct"]) == K
        assert all(c in (0, 1) for per_caption in row["correct"] for c in per_caption)
        assert row["accuracy"] == pytest.approx([np.mean(c) for c in row["correct"]])
    assert summary["num_questions"] == sum(len(ex.questions) for ex in examples)
    assert summary["mean_accuracy"] == pytest.approx(np.mean([np.mean(r["accuracy"]) for r in rows]))
    assert summary["best_of_k"] == pytest.approx(np.mean([max(r["accuracy"]) for r in rows]))


def test_reader_sees_each_caption_question_pair_once(data, one_thread):
    policy, reader, tokenizer, image_processor = tiny_policy_and_reader()
    evaluator = CaptionEvaluator(policy, PolicyPrompter(tokenizer, image_processor), reader, tokenizer,
                                 EvalConfig(k=K, max_new_tokens=4, num_draws=0))  # fmt: skip
    asked = []
    score = evaluator.every_question.score

    def spy(captions, questions, *, step=None):
        asked.extend(zip(captions, [q for pool in questions for q in pool], strict=True))
        assert all(len(pool) == 1 for pool in questions)  # one-question pools: the single draw is that question
        return score(captions, questions, step=step)

    evaluator.every_question.score = spy
    examples = load_jsonl(data).examples
    rows = evaluator.evaluate_batch(examples, 0)
    pairs = zip(rows, examples, strict=True)
    expected = [(caption, mcq) for row, ex in pairs for caption in row["captions"] for mcq in ex.questions]
    assert Counter(asked) == Counter(expected)  # every (caption, question) pair exactly once, nothing else


def test_identical_captions_score_alike(data, tmp_path):
    """Greedy decoding gives k identical captions; they meet the same option orders, so their scores agree."""
    summary = main(_args(data, tmp_path, "--temperature", "0", "--num-draws", "0"))
    rows = [json.loads(line) for line in (tmp_path / "details.jsonl").read_text().splitlines()]
    for row in rows:
        assert len(set(row["captions"])) == 1
        assert row["correct"] == [row["correct"][0]] * K
    assert summary["best_of_k"] == summary["mean_accuracy"] and summary["train_reward"] is None


def test_models_from_directories_match_the_shipped_defaults(run, data, tmp_path, one_thread):
    """No flags is the shipped pair: the same directories given explicitly (copied elsewhere) give the same run."""
    import shutil

    from caprl_core.world import SHIPPED

    for name in ("policy", "reader"):
        shutil.copytree(SHIPPED / name, tmp_path / name)
    out = tmp_path / "out"
    summary = main(_args(data, out, "--policy", str(tmp_path / "policy"), "--reader", str(tmp_path / "reader")))
    rows = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]
    assert rows == run[1]  # same weights, same seeds: the same captions and answers
    assert summary["policy"] == str(tmp_path / "policy") and run[0]["policy"] == "shipped"


def test_a_reader_directory_gives_its_prompt(data, tmp_path, one_thread):
    """A reader directory with caprl_prompt.json is prompted with it: the reader's prompts start with its header."""
    from caprl_core.reward_prompts import PromptTemplate, save_prompt_template

    policy, reader, tokenizer, image_processor = tiny_policy_and_reader(seed=0)
    for name, model in (("policy", policy), ("reader", reader)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    image_processor.save_pretrained(tmp_path / "policy")
    header = "Answer from the caption only.\n\n"
    save_prompt_template(PromptTemplate(header=header), tmp_path / "reader")
    out = tmp_path / "out"
    summary = main(_args(data, out, "--policy", str(tmp_path / "policy"), "--reader", str(tmp_path / "reader")))
    prompts = summary["num_questions"] * K + summary["num_images"] * K * 3  # every question; 3 training draws
    assert summary["reader_prompt_tokens"] < 200 * prompts  # the default few-shot header alone is 310 tokens
    from caprl_core.policy import load_models

    models = load_models(tmp_path / "policy", tmp_path / "reader")
    assert models.reader_template == PromptTemplate(header=header)


@pytest.mark.parametrize("flag", ["--data", "--policy", "--reader"])
def test_missing_path_is_an_argparse_error(flag, tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit) as exit_info:
        main([flag, str(missing), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"{flag}: {missing} does not exist" in capsys.readouterr().err


def test_one_tiny_random_model_is_an_argparse_error(tmp_path, capsys):
    """The rule train uses too (`load_models`): tiny-random for both models, or for neither."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--reader", "tiny-random", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--policy: must be tiny-random too" in capsys.readouterr().err


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "caprl_core.eval", "--help"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--num-draws" in result.stdout and "--policy" in result.stdout


def test_prism_preset_under_explicit_flags():
    from caprl_core.eval import PRISM, _apply_preset, build_parser

    assert PRISM == {"k": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 2048}  # the official evaluation
    argv = ["--preset", "prism", "--max-new-tokens", "8"]
    args = build_parser().parse_args(argv)
    _apply_preset(args, argv)
    assert (args.k, args.temperature, args.top_p, args.max_new_tokens) == (4, 1.0, 1.0, 8)
    plain = build_parser().parse_args([])
    _apply_preset(plain, [])
    assert (plain.temperature, plain.max_new_tokens) == (EvalConfig().temperature, EvalConfig().max_new_tokens)


def test_recipe_reward_preset_reads_with_the_recipes_prompt(data, tmp_path, one_thread):
    """--reward-preset recipe: every question read with the reward server's prompt and whole-vocabulary readout, as
    a recipe-trained policy was rewarded (not the default prompt inside the reader's chat template)."""
    from caprl_core.reward_prompts import RECIPE_TEMPLATE

    policy, reader, tokenizer, image_processor = tiny_policy_and_reader(seed=0)
    prompter = PolicyPrompter(tokenizer, image_processor)
    evaluator = CaptionEvaluator(policy, prompter, reader, tokenizer, EvalConfig(k=K, max_new_tokens=8, num_draws=2),
                                 reward_preset="recipe")  # fmt: skip
    for reward in (evaluator.every_question, evaluator.train_reward):
        assert reward.config.template == RECIPE_TEMPLATE and reward.config.readout == "vocab"
        assert reward.config.cannot_answer_letter == "F" and not reward._chat
    summary = main(_args(data, tmp_path / "out", "--reward-preset", "recipe", "--preset", "prism"))
    assert summary["reward_preset"] == "recipe" and summary["config"]["temperature"] == 1.0
    assert summary["config"]["max_new_tokens"] == 8 and summary["k"] == K  # explicit flags over the preset
    assert 0 <= summary["mean_accuracy"] <= summary["best_of_k"] <= 1


def test_a_crash_leaves_the_earlier_evaluation_whole(run, data, tmp_path, monkeypatch):
    """details.jsonl and summary.json are replaced only when complete: a crash in the second batch leaves the earlier
    evaluation's files as they were (not a partial details.jsonl beside an older summary.json), and no temporary."""
    _, _, first = run
    out = tmp_path / "out"
    shutil.copytree(first, out)
    before = {name: (out / name).read_text() for name in ("details.jsonl", "summary.json")}
    evaluate_batch = CaptionEvaluator.evaluate_batch

    def crash(self, examples, batch_index):
        if batch_index == 1:
            raise RuntimeError("killed in batch 1")
        return evaluate_batch(self, examples, batch_index)

    monkeypatch.setattr(CaptionEvaluator, "evaluate_batch", crash)
    with pytest.raises(RuntimeError, match="killed in batch 1"):
        main(_args(data, out))
    assert {name: (out / name).read_text() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in first.iterdir())


def test_a_run_directory_as_policy_is_named_as_one(tmp_path, capsys):
    """A run directory has a config.json (the run's), so it looked like a model until the tokenizer failed: the
    error now says it is a run and points at its checkpoints."""
    from caprl_core.checkpoint import save_checkpoint

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}\n")
    with pytest.raises(SystemExit):
        main(["--policy", str(run_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"--policy {run_dir}: a training run directory, not a model; give one of its checkpoints, " in err
    assert f"{run_dir / 'checkpoints' / 'step-N'} (it has none yet)" in err
    _, reader, _, _ = tiny_policy_and_reader()
    save_checkpoint(run_dir, 3, model=reader, trainer_state={"step": 3})
    with pytest.raises(SystemExit):
        main(["--policy", str(run_dir), "--out", str(tmp_path / "out")])
    assert f"give one of its checkpoints, e.g. {run_dir / 'checkpoints' / 'step-000003'}" in capsys.readouterr().err
