"""`python -m caprl_core.world ablations` (caprl_core.world.ablations): arms with the same flags are one run per seed,
the 95% interval is Student's t, a stopped command reruns only what has no result, and the table and figure are
written. The end-to-end run is one short training per arm on a few held-out images (plumbing, not the table)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from caprl_core.world import ablations, make_world_data
from caprl_core.world.ablations import Arm, arms, markdown_table, summarise, t_interval


def test_arms_with_the_same_flags_share_their_runs():
    table = arms(list(ablations.FAMILIES))
    defaults = [a for a in table if not a.flags and a.eval_data is None]
    assert len(defaults) >= 4 and {a.run_name for a in defaults} == {"defaults"}  # one run per seed, not one per family
    named = {a.run_name for a in table if a.flags or a.eval_data}
    assert len(named) == len([a for a in table if a.flags or a.eval_data])  # a directory per flags and eval data
    assert Arm("sight", "plain images", (), "@faint-heldout").run_name == "defaults__eval_faint-heldout"
    assert Arm("draws", "N=1", ("--num-draws", "1")).run_name == "num-draws_1"
    with pytest.raises(ValueError, match="--families: unknown nope"):
        arms(["draws", "nope"])


def test_t_interval_is_students_95_percent():
    mean, half = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3, t(0.975, 2) = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    mean, half = t_interval([0.5, 0.7])  # sd 0.1414, t(0.975, 1) = 12.706
    assert half == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2), rel=1e-6)
    assert math.isnan(t_interval([0.4])[1])
    values = [float(i % 2) for i in range(15)]  # 14 degrees of freedom: t = 2.145, not the normal 1.96
    sd = math.sqrt(sum((v - 7 / 15) ** 2 for v in values) / 14)
    assert t_interval(values)[1] == pytest.approx(2.145 * sd / math.sqrt(15), rel=1e-6)
    assert t_interval(values * 4)[1] > 1.96 * math.sqrt(sum((v - 7 / 15) ** 2 for v in values * 4) / 59) / math.sqrt(60)


def test_summary_rows_and_markdown():
    table = arms(["control"])
    results = {
        (a.run_name, s): {
            "mean_accuracy": acc,
            "fact_precision": 1.0,
            "fact_recall": acc,
            "mean_caption_tokens": 10.0 + s,
        }  # fmt: skip
        for a, base in zip(table, (0.9, 0.3), strict=True)
        for s, acc in ((0, base), (1, base + 0.02))
    }
    rows = summarise(results, table, [0, 1, 2])  # seed 2 has no result yet: two seeds count
    assert [(r["arm"], r["seeds"]) for r in rows] == [("true reward", 2), ("shuffled", 2)]
    assert rows[0]["mean_accuracy"] == pytest.approx(0.91) and rows[1]["mean_caption_tokens"] == pytest.approx(10.5)
    text = markdown_table(rows)
    assert "| control | true reward | 2 | 91.0 ± " in text and "| control | shuffled | 2 | 31.0 ± " in text
    # paired by seed: both seeds differ by exactly -0.6, so the interval is 0 though each arm's own is not
    assert math.isnan(rows[0]["delta_accuracy"]) and rows[1]["delta_accuracy"] == pytest.approx(-0.6)
    assert rows[1]["delta_accuracy_ci95"] == pytest.approx(0.0, abs=1e-12) and rows[1]["mean_accuracy_ci95"] > 0.1
    assert "| -60.0 ± 0.0 points |" in text and text.splitlines()[2].endswith("| - |")


def test_the_command_runs_each_arm_and_a_rerun_trains_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    code = ablations.main(["--out", str(out), "--families", "control", "--seeds", "0", "--steps", "1",
                           "--eval-images", "2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    table = json.loads((out / "table.json").read_text())
    assert [r["arm"] for r in table["rows"]] == ["true reward", "shuffled"]
    assert {r["run"] for r in table["runs"]} == {"defaults-seed0", "shuffle-rewards_true-seed0"}
    for run in table["runs"]:
        metrics = (out / "runs" / run["run"] / "train" / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 1 and 0 <= run["mean_accuracy"] <= 1 and run["train_s"] > 0
    assert (out / "ablations.png").stat().st_size > 0 and "| control | shuffled | 1 |" in (out / "table.md").read_text()

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a rerun must reuse result.json, not train again")

    monkeypatch.setattr(subprocess, "call", no_subprocess)
    assert ablations.main(["--out", str(out), "--families", "control", "--seeds", "0", "--steps", "1"]) == 0


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    for argv, message in ((["--families", "nope"], "--families: unknown nope"),
                          (["--seeds", "1", "1"], "--seeds: each seed once"),
                          (["--steps", "0"], "--steps: must be >= 1")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            ablations.main(["--out", str(tmp_path), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    from caprl_core.world.__main__ import main as world_main  # the same command through python -m caprl_core.world

    with pytest.raises(SystemExit) as e:
        world_main(["ablations", "--out", str(tmp_path), "--families", "nope"])
    assert e.value.code == 2 and "--families: unknown nope" in capsys.readouterr().err


def test_the_qa_family_trains_on_the_same_images_with_and_without_leaky_questions(tmp_path):
    files = ablations.prepare_data(tmp_path, {"@qa-leaky", "@qa-filtered"})
    rows = {name: [json.loads(line) for line in open(files[name])] for name in ("@qa-leaky", "@qa-filtered")}
    leaky = [q["leaky"] for r in rows["@qa-leaky"] for q in r["questions"]]
    assert len(rows["@qa-leaky"]) == 256 and 0.4 < sum(leaky) / len(leaky) < 0.6
    assert not any(q["leaky"] for r in rows["@qa-filtered"] for q in r["questions"])
    images = {r["image"] for r in rows["@qa-leaky"]}
    assert {r["image"] for r in rows["@qa-filtered"]} <= images and len(rows["@qa-filtered"]) >= 240
    before = {name: os.path.getmtime(path) for name, path in files.items()}
    assert ablations.prepare_data(tmp_path, {"@qa-leaky"})["@qa-leaky"] == files["@qa-leaky"]  # reused, not rewritten
    assert os.path.getmtime(files["@qa-leaky"]) == before["@qa-leaky"]
    with pytest.raises(ValueError, match="no data file named @nope"):
        ablations.prepare_data(tmp_path, {"@nope"})
    faded = ablations.prepare_data(tmp_path, {"@qa-leaky-faint"})["@qa-leaky-faint"]
    assert open(faded).read() == open(files["@qa-leaky"]).read()  # the same scenes and questions, faded images


def test_the_sight_family_trains_on_faded_images_and_evaluates_on_faded_held_out_ones(tmp_path, monkeypatch):
    """Its arms are evaluated on the held-out split faded by FAINT (the same scenes as the plain held-out images);
    "faint images" trains on the faded training split; the evaluation is told which data to read."""
    assert {a.eval_data for a in arms(["sight"])} == {"@faint-heldout"}
    files = ablations.prepare_data(tmp_path, {"@faint-train", "@faint-heldout"})
    plain = make_world_data(tmp_path / "plain", "heldout")
    assert open(files["@faint-heldout"]).read() == plain.read_text()  # the same scenes and questions, faded images
    assert len(open(files["@faint-train"]).read().splitlines()) == 256
    calls = []

    def record(command, **kwargs):
        calls.append(command)
        if "caprl_core.eval" in command:  # what run_arm reads back
            out = Path(command[command.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "summary.json").write_text(json.dumps({m: 0.5 for m in ablations.METRICS}))
        return 0

    monkeypatch.setattr(subprocess, "call", record)
    arm = next(a for a in arms(["sight"]) if a.name == "faint images")
    ablations.run_arm(arm, 0, tmp_path / "abl", data=files)
    train, evaluate = calls
    assert train[train.index("--data") + 1] == files["@faint-train"]
    assert evaluate[evaluate.index("--data") + 1] == files["@faint-heldout"]


def test_the_faint_level_trains_and_evaluates_every_arm_on_faded_images():
    plain, faint = arms(["draws", "control"]), arms(["draws", "control"], "faint")
    assert [(a.family, a.name) for a in faint] == [(a.family, a.name) for a in plain]
    assert all(a.flags[:2] == ("--data", "@faint-train") and a.eval_data == "@faint-heldout" for a in faint)
    assert {a.run_name for a in faint}.isdisjoint({a.run_name for a in plain})
    # the faint level's defaults are the sight family's "faint images" runs: one run, not two
    assert {a.run_name for a in arms(["sight"]) if a.name == "faint images"} <= {a.run_name for a in faint}
    qa = arms(["qa"], "faint")  # its own data files, faded
    assert [a.flags for a in qa] == [
        ("--data", "@qa-filtered-faint", "--reader", "@qa-reader"),
        ("--data", "@qa-leaky-faint", "--reader", "@qa-reader"),
    ]  # one reader for both
    with pytest.raises(ValueError, match="--level faint: sight is a comparison of levels itself"):
        arms(["draws", "sight"], "faint")


def test_the_qa_reader_is_built_once_into_the_data_directory(tmp_path, monkeypatch):
    built = []

    def build(directory):
        built.append(directory)
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")

    monkeypatch.setattr(ablations, "_build_qa_reader", build)
    first = ablations.prepare_data(tmp_path, {"@qa-reader"})["@qa-reader"]
    assert first == str(tmp_path / "data" / "qa-reader") and (tmp_path / "data" / "qa-reader" / "config.json").exists()
    assert ablations.prepare_data(tmp_path, {"@qa-reader"}) == {"@qa-reader": first} and len(built) == 1  # reused
