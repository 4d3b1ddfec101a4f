"""The training command end to end on the tiny built-in setup: config parsing and validation, a short run that
changes the weights and logs finite metrics, a checkpoint that transformers loads, and a resume after SIGKILL in
the middle of a checkpoint write that continues exactly like an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caprl_core.config import TrainConfig
from caprl_core.config_cli import parse_config
from caprl_core.rl.progress import TIMING_KEYS

SMALL = ["--steps", "5", "--images-per-step", "2", "--group-size", "3", "--max-new-tokens", "8",
         "--num-draws", "2", "--synthetic-images", "8", "--checkpoint-every", "2", "--sample-every", "2",
         "--progress", "false"]  # fmt: skip


def _run(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "caprl_core.train", *SMALL, "--output-dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def test_config_defaults_flags_and_files(tmp_path):
    config, resume = parse_config([])
    assert not resume and config.reward.num_draws == 4 and config.steps == 40  # the miniature world's defaults
    assert config.reward.mode == "soft" and config.model.policy is None
    assert TrainConfig().rollout.group_size == 8 and TrainConfig().optim.lr == 1e-6  # the recipe's, for real models
    config, _ = parse_config(["--group-size", "6", "--lr", "3e-4", "--aggregation", "constant", "--resume",
                              "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert config.rollout.group_size == 6 and config.optim.lr == 3e-4 and config.optim.aggregation == "constant"
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 7\n[rollout]\ngroup_size = 5\n[optim]\nschedule = "cosine"\n')
    config, _ = parse_config(["--config", str(toml), "--steps", "9"])  # flags override the file
    assert (config.steps, config.rollout.group_size, config.optim.schedule) == (9, 5, "cosine")
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"reward": {"mode": "soft"}, "seed": 3}))
    config, _ = parse_config(["--config", str(js)])
    assert config.reward.mode == "soft" and config.seed == 3


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--lr", "-1"], "--lr"),
        (["--group-size", "1"], "--group-size"),
        (["--aggregation", "seq-sum"], "--aggregation"),
        (["--policy", "/no/such/dir"], "--policy"),
        (["--data", "/no/such/file.jsonl"], "--data"),
        (["--epsilon-high", "0.1"], "--epsilon-high"),
        (["--steps", "ten"], "--steps"),
        (["--mask-truncated", "maybe"], "--mask-truncated"),
    ],
)
def test_bad_config_names_the_option(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        parse_config(argv)


def test_bad_config_file_names_the_option(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(ValueError, match="optim.learning_rate"):
        parse_config(["--config", str(bad)])


@pytest.mark.parametrize(
    ("suffix", "text", "match"),
    [
        (".json", '{"optim": {"lr": "1e-6"}}', "optim.lr: expected float, got str '1e-6'"),
        (".toml", "steps = 1.5\n", "steps: expected int, got float 1.5"),
        (".toml", "[rollout]\ngroup_size = true\n", "rollout.group_size: expected int, got bool True"),
        (".json", '{"progress": "no"}', "progress: expected bool, got str 'no'"),
        (".json", '{"kv_cache_tokens": 1e4}', "kv_cache_tokens: expected int or null, got float"),
        (".toml", "[model]\npolicy = 3\n", "model.policy: expected str or null, got int 3"),
    ],
)
def test_config_file_values_are_type_checked(suffix, text, match, tmp_path):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"--config: {path}: {match}")):
        parse_config(["--config", str(path)])


def test_config_file_int_for_float_and_null_for_optional(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"optim": {"lr": 1, "epsilon_high": null}, "kv_cache_tokens": 4096}')
    config, _ = parse_config(["--config", str(path)])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float) and config.optim.epsilon_high is None
    assert config.rollout.kv_cache_tokens == 4096


def test_resume_needs_an_output_dir(tmp_path):
    with pytest.raises(ValueError, match="--resume: needs --output-dir"):
        parse_config(["--resume"])
    path = tmp_path / "c.toml"
    path.write_text(f'[log]\noutput_dir = "{tmp_path / "run"}"\n')
    assert parse_config(["--resume", "--config", str(path)])[1]


def test_short_run_resume_after_sigkill_in_a_checkpoint_write(tmp_path):
    """Uninterrupted 5 steps vs a run SIGKILLed while writing its step-3 checkpoint, then resumed: same metrics."""
    clean = tmp_path / "clean"
    done = _run(clean)
    assert done.returncode == 0, done.stderr
    rows = _metrics(clean)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for r in rows:
        for key in ("reward_mean", "accuracy", "loss", "grad_norm", "caption_length", "lr", "clip_fraction"):
            assert math.isfinite(r[key]), (key, r)
    assert (clean / "plot.png").stat().st_size > 1000
    samples = [json.loads(line) for line in (clean / "samples.jsonl").read_text().splitlines()]
    for sample in samples:  # the image (inside the run directory: relative) and its reference beside the captions
        assert (clean / sample["image"]).is_file() and sample["reference"] and sample["id"], sample
    for r in rows:  # the synthetic data's facts are known, so the captions' precision and recall are logged
        assert 0 <= r["fact_recall"] <= 1 and (math.isnan(r["fact_precision"]) or 0 <= r["fact_precision"] <= 1)
    # The weights moved: the final checkpoint differs from the shipped policy the run started from.
    from safetensors.torch import load_file

    from caprl_core.world import SHIPPED

    final = load_file(str(sorted((clean / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
    start = load_file(str(SHIPPED / "policy" / "model.safetensors"))
    assert any(not torch.equal(final[k], start[k]) for k in final if k in start)

    crashed = tmp_path / "crashed"
    killed = _run(crashed, env={"CAPRL_TEST_KILL_IN_CHECKPOINT": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [r["step"] for r in _metrics(crashed)] == [0, 1, 2, 3]  # step 3 logged, its checkpoint half written
    resumed = _run(crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step-000001" in resumed.stderr
    again = _metrics(crashed)
    assert [r["step"] for r in again] == [0, 1, 2, 3, 4]
    assert [_stable(r) for r in again] == [_stable(r) for r in rows]


def test_checkpoint_loads_in_transformers_and_generates(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    out = tmp_path / "run"
    done = _run(out, "--steps", "1")
    assert done.returncode == 0, done.stderr
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer("A red circle", return_tensors="pt")["input_ids"]
    generated = model.generate(input_ids=ids, min_new_tokens=4, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)


def test_kl_to_the_initial_policy_and_length_reward_are_wired(tmp_path):
    out = tmp_path / "kl"
    done = _run(out, "--steps", "2", "--beta", "0.05", "--length-weight", "0.5", "--length-l1", "10",
                "--length-l2", "20", "--aggregation", "seq-mean-token-mean", "--advantage", "rloo")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = _metrics(out)
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)
    assert rows[0]["kl"] < 1e-4  # step 0: the policy is still the reference
    # captions of <= 8 tokens are under length_l1: the length term adds its full weight
    assert all(abs(r["reward_mean"] - r["accuracy"] - 0.5) < 1e-6 for r in rows)


def test_a_bad_reader_is_an_error_naming_the_flag_and_makes_no_run_dir(tmp_path, capsys):
    """--reader alone is allowed (the policy is the shipped one); a directory that does not load is a one-line error
    naming the flag, before any run directory exists."""
    from caprl_core.train import main

    reader = tmp_path / "reader"
    reader.mkdir()
    out = tmp_path / "run"
    assert main(["--reader", str(reader), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--reader {reader}: not a Hugging Face model directory" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_control_and_shared_draw_options_are_wired(tmp_path):
    """--shuffle-rewards feeds each caption another caption's reward (the logged rewards stay the true ones);
    --shared-draws gives the G captions of an image the same questions."""
    from caprl_core.rl.scoring import rewards_and_advantages
    from caprl_core.rl.setup import setup

    config, _ = parse_config(["--output-dir", str(tmp_path / "run"), "--synthetic-images", "4", "--group-size", "4",
                              "--images-per-step", "2", "--max-new-tokens", "8", "--shared-draws", "true"])  # fmt: skip
    run = setup(config)
    batch = run.examples[:2]
    from caprl_core.rl.rollout import rollout

    ro = rollout(run.engine, run.prompter, run.tokenizer, batch, config, 0)
    seen = []
    score = run.reward.score
    run.reward.score = lambda *a, **k: (seen.append(k["draw_keys"]), score(*a, **k))[1]
    rewards, advantages, _ = rewards_and_advantages(run.reward, ro, batch, config, 0)
    assert seen == [[0, 0, 0, 0, 1, 1, 1, 1]]
    config.reward.shuffle_rewards = True
    shuffled_rewards, shuffled, _ = rewards_and_advantages(run.reward, ro, batch, config, 0)
    assert torch.equal(rewards, shuffled_rewards)  # what is logged is the truth
    from caprl_core import ops

    perm = torch.from_numpy(__import__("numpy").random.default_rng([config.seed, 0, 7]).permutation(8))
    assert torch.allclose(shuffled, ops.group_advantages(rewards[perm, 0], group_size=4))


def test_model_load_error_is_one_line_naming_the_flag_and_makes_no_run_dir(tmp_path, capsys):
    """A policy directory whose weights file is corrupt: exit 2 with one line, not a traceback, and no run dir."""
    from caprl_core.models import write_real_format_dirs
    from caprl_core.train import main
    from caprl_core.world import make_world_data

    policy, reader = write_real_format_dirs(tmp_path / "models", widths="test")
    (policy / "model.safetensors").write_bytes(b"not a safetensors file")
    data = make_world_data(tmp_path / "data", "train", 2)
    out = tmp_path / "run"
    capsys.readouterr()  # drop the builder's progress bars
    assert main(["--policy", str(policy), "--reader", str(reader), "--data", str(data), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"python -m caprl_core.train: error: --policy {policy}: cannot load the model"), err
    assert len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("missing", ["--reader", "--data"])
def test_a_real_policy_without_reader_or_data_is_an_error_naming_the_flag(missing, tmp_path, capsys):
    """The shipped reader and the world's data are defaults for the world's own policy only: a policy directory of
    the user's without --reader (or --data) is a one-line error, exit 2, before any run directory exists."""
    from caprl_core.models import write_real_format_dirs
    from caprl_core.train import main
    from caprl_core.world import SHIPPED, make_world_data

    policy, reader = write_real_format_dirs(tmp_path / "models", widths="test")
    given = {"--reader": str(reader), "--data": str(make_world_data(tmp_path / "data", "train", 2))}
    del given[missing]
    out = tmp_path / "run"
    capsys.readouterr()
    argv = ["--policy", str(policy), *[x for kv in given.items() for x in kv], "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"python -m caprl_core.train: error: {missing}: required with --policy {policy}"), err
    assert len(err.splitlines()) == 1 and not out.exists()
    # the world's own policy, named by its directory, keeps the world's defaults
    config, _ = parse_config(["--policy", str(SHIPPED / "policy"), "--output-dir", str(out)])
    assert config.model.reader is None and config.data.data is None


def test_dtype_applies_to_the_builtin_models(tmp_path):
    from caprl_core.rl.setup import setup

    config, _ = parse_config(["--dtype", "bfloat16", "--output-dir", str(tmp_path / "run"), "--synthetic-images", "2"])
    run = setup(config)
    assert run.policy.dtype == torch.bfloat16 and run.reward.model.dtype == torch.bfloat16


def test_help_describes_every_option_and_print_config_resolves(capsys):
    from caprl_core.config import FIELDS
    from caprl_core.config_cli import HELP, build_parser

    assert set(HELP) == set(FIELDS)
    text = build_parser().format_help()
    for name in FIELDS:
        assert HELP[name].split()[0] in text, name
    assert "(default: 8; without --policy 4)" in " ".join(text.split())  # num_draws: the default that applies
    assert "{grpo,rloo}" in text and "{token,sequence}" in text
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--print-config", "--lr", "3e-4"])
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 3e-4 and printed["reward"]["num_draws"] == 4 and printed["steps"] == 40


def test_shared_prefix_run_reproduces_the_unshared_run(tmp_path):
    """3 steps with the group-shared update forward (the default) and with --shared-prefix false: the same metrics
    within float tolerance (the same captions, rewards and losses), with fewer tokens and images in the update."""
    counts = ("update_tokens", "update_images")
    runs = {}
    for shared in ("true", "false"):
        out = tmp_path / shared
        done = _run(out, "--steps", "3", "--shared-prefix", shared)
        assert done.returncode == 0, done.stderr
        runs[shared] = [_stable(r) for r in _metrics(out)]
    assert len(runs["true"]) == len(runs["false"]) == 3
    for shared, unshared in zip(runs["true"], runs["false"], strict=True):
        assert shared.keys() == unshared.keys()
        for key in unshared.keys() - set(counts):
            a, b = shared[key], unshared[key]
            if isinstance(b, float) and math.isnan(b):
                assert math.isnan(a), key
            else:
                assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (key, a, b)
        assert shared["update_tokens"] < unshared["update_tokens"]
        assert shared["update_images"] * 3 == unshared["update_images"] == 2 * 3  # SMALL: 2 images, G = 3


def test_recipe_reward_preset_sets_the_servers_reward_under_explicit_options():
    from caprl_core.reward_prompts import RECIPE_TEMPLATE
    from caprl_core.rl.scoring import reward_config

    config, _ = parse_config(["--reward-preset", "recipe"])
    g = config.reward
    assert (g.num_draws, g.mode, g.reader_temperature) == (8, "soft", 0.6)  # over the tiny run's 4 draws
    assert (g.length_weight, g.length_l1, g.length_l2, g.length_combine) == (0.2, 2048, 3072, "sum")
    made = reward_config(config, None)
    assert made.template == RECIPE_TEMPLATE and made.temperature == 0.6 and made.answer_letters == "ABCDEFGHI"
    assert made.readout == "vocab" and made.cannot_answer_letter == "F"
    assert made.cannot_answer_text == "Can not answer based on the caption" and made.max_options == 9
    config, _ = parse_config(["--reward-preset", "recipe", "--reader-temperature", "0.9", "--num-draws", "3"])
    assert (config.reward.reader_temperature, config.reward.num_draws, config.reward.mode) == (0.9, 3, "soft")
    assert reward_config(config, None).temperature == 0.9
    default, _ = parse_config([])
    assert default.reward.reward_preset == "default" and reward_config(default, None).template != RECIPE_TEMPLATE
    with pytest.raises(ValueError, match="--reward-preset"):
        parse_config(["--reward-preset", "paper"])
