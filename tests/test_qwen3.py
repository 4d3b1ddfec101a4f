"""The CapRL++ (CapRL 2.0) pair end to end: directories laid out like Qwen3-VL-4B-Instruct (policy) and Qwen3-4B
(reader) with small widths (`caprl_core.qwen3_dirs`); `python -m caprl_core.train` trains 2 steps on them with the
recipe's reward preset, the training forward's log-probs equal the sampler's (DeepStack and M-RoPE on both sides),
the checkpoint reloads with the trained weights, and `python -m caprl_core.eval` evaluates it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import train_to_checkpoint
from PIL import Image

from caprl_core import eval as caprl_eval
from caprl_core.policy import PolicyPrompter, load_models
from caprl_core.qwen3_dirs import QWEN3_VL_CHAT_TEMPLATE, write_qwen3_format_dirs

RUN = ["--steps", "2", "--images-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--num-draws", "2",
       "--kv-cache-tokens", "4096", "--progress", "false", "--reward-preset", "recipe",
       "--checkpoint-every", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    return write_qwen3_format_dirs(tmp_path_factory.mktemp("qwen3"), widths="test")


def test_directories_load_as_qwen3_vl_and_qwen3(dirs):
    policy, reader = dirs
    config = json.loads((policy / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert config["vision_config"]["deepstack_visual_indexes"] == [0, 1]
    models = load_models(policy, reader)
    assert type(models.policy).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(models.reader).__name__ == "Qwen3ForCausalLM"
    text = models.policy.config.text_config
    assert text.head_dim == 24 != text.hidden_size // text.num_attention_heads
    assert text.rope_parameters["mrope_interleaved"] and models.reader.config.head_dim == 24
    assert models.tokenizer.chat_template == QWEN3_VL_CHAT_TEMPLATE
    # 16-px patches without torchvision: a 100x70 image becomes a 4x6 patch grid (64 x 96 px), 6 image tokens.
    prompt = PolicyPrompter(models.tokenizer, models.image_processor)(Image.new("RGB", (100, 70), "blue"))
    assert prompt["image_grid_thw"].tolist() == [[1, 4, 6]] and int(prompt["mm_token_type_ids"].sum()) == 6


@pytest.fixture(scope="module")
def trained(dirs, tmp_path_factory) -> tuple[Path, Path]:
    return train_to_checkpoint(*dirs, tmp_path_factory.mktemp("run"), RUN)


def test_training_steps_run_and_match_the_sampler(trained):
    out, _ = trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        # fp32: the training forward (shared prompt, DeepStack through HF's model) and the paged sampler agree.
        assert row["sampler_max_abs_diff"] < 1e-4 and abs(row["ratio_mean"] - 1) < 1e-5
        assert row["grad_norm"] > 0 and all(v == v for v in row.values() if isinstance(v, float))
        # The recipe's length term: every caption is far under 2,048 tokens, so it adds 0.2 to the accuracy.
        assert row["reward_mean"] == pytest.approx(row["accuracy"] + 0.2, abs=1e-6)


def test_checkpoint_reloads_with_the_trained_weights_and_evaluates(dirs, trained, tmp_path):
    policy, reader = dirs
    out, ckpt = trained
    again = load_models(ckpt, reader).policy
    start = load_models(policy, reader).policy
    assert type(again).__name__ == "Qwen3VLForConditionalGeneration"
    assert not all(torch.equal(a, b) for a, b in zip(again.parameters(), start.parameters(), strict=True))
    argv = ["--policy", str(ckpt), "--reader", str(reader), "--data", str(out / "data" / "data.jsonl"), "--k", "2",
            "--max-new-tokens", "8", "--num-draws", "2", "--out", str(tmp_path / "eval")]  # fmt: skip
    summary = caprl_eval.main(argv)
    assert summary["num_images"] == 4 and summary["num_captions"] == 8
    assert 0 <= summary["mean_accuracy"] <= 1


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# The launch settings each recipe file must resolve to (docs/reward.md), on top of the recipe's reward.
RECIPE_TABLE = {
    "caprl-1.0.toml": {"advantage": "rloo", "scale": "none", "beta": 0.0, "images_per_step": 128, "group_size": 8,
                       "lr": 1e-6, "warmup_steps": 20, "schedule": "constant", "temperature": 1.0,
                       "max_new_tokens": 4096, "num_iterations": 1, "length_weight": 0.0, "aggregation": "token-mean"},
    "caprl-pp.toml": {"advantage": "rloo", "scale": "none", "beta": 0.0, "images_per_step": 128, "group_size": 8,
                      "lr": 1e-5, "warmup_steps": 20, "schedule": "constant", "temperature": 1.0,
                      "max_new_tokens": 4096, "num_iterations": 1, "length_weight": 0.2, "length_combine": "sum",
                      "aggregation": "seq-mean-token-mean", "rollout_correction": "none"},
}  # fmt: skip


@pytest.mark.parametrize("name", list(RECIPE_TABLE))
def test_recipe_file_prints_the_launch_settings(name, capsys):
    from caprl_core.config_cli import parse_config

    with pytest.raises(SystemExit) as stop:
        parse_config(["--config", str(RECIPES / name), "--print-config"])
    assert stop.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    flat = {k: v for section in printed.values() if isinstance(section, dict) for k, v in section.items()}
    assert {k: flat[k] for k in RECIPE_TABLE[name]} == RECIPE_TABLE[name]
    assert (flat["reward_preset"], flat["mode"], flat["reader_temperature"], flat["num_draws"]) == ("recipe", "soft",
                                                                                                    0.6, 8)  # fmt: skip


SMALL = ["--steps", "2", "--images-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--num-draws", "2",
         "--synthetic-images", "4", "--kv-cache-tokens", "4096", "--progress", "false", "--checkpoint-every", "2",
         "--micro-batch-size", "4", "--warmup-steps", "1"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPE_TABLE))
def test_two_steps_with_each_recipe_file(name, tmp_path):
    """Each file as launched, at small batch and length (the flags after --config override it), on directories laid
    out like its models: CapRL 1.0 on Qwen2.5-VL-3B / Qwen2.5-3B, CapRL++ on Qwen3-VL-4B / Qwen3-4B."""
    from caprl_core.models import write_real_format_dirs

    write = write_real_format_dirs if name == "caprl-1.0.toml" else write_qwen3_format_dirs
    policy, reader = write(tmp_path / "models", widths="test")
    out, _ = train_to_checkpoint(policy, reader, tmp_path / "run", ["--config", str(RECIPES / name), *SMALL])
    config = json.loads((out / "config.json").read_text())
    assert config["reward"]["advantage"] == "rloo" and config["optim"]["lr"] == RECIPE_TABLE[name]["lr"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(v == v for r in rows for v in r.values() if isinstance(v, float))
