"""Real-format model directories end to end: `write_real_format_dirs` lays out a Qwen2.5-VL-3B-Instruct-style policy
and a Qwen2.5-3B-Instruct-style reader (small widths here); `python -m caprl_core.train` trains 2 steps on them, its
checkpoint is a complete policy directory (weights, tokenizer, image processor, chat template) that the processor
classes and `python -m caprl_core.eval --policy <checkpoint>` load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import train_to_checkpoint
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLImageProcessorPil

from caprl_core import eval as caprl_eval
from caprl_core import train
from caprl_core.models import QWEN_VL_CHAT_TEMPLATE, REAL_VOCAB, qwen_id_tokenizer, write_real_format_dirs
from caprl_core.policy import load_models

RUN = ["--steps", "2", "--images-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--num-draws", "2",
       "--kv-cache-tokens", "4096", "--progress", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    return write_real_format_dirs(tmp_path_factory.mktemp("models"), widths="test")


def test_directories_have_the_real_layout(dirs):
    policy, reader = dirs
    for d in dirs:
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"} <= {p.name for p in d.iterdir()}  # fmt: skip
        assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
    config = json.loads((policy / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert config["vision_config"]["fullatt_block_indexes"] == [1]
    assert json.loads((reader / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    pre = json.loads((policy / "preprocessor_config.json").read_text())
    assert (pre["image_processor_type"], pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (
        "Qwen2VLImageProcessor", 14, 2, 2)  # fmt: skip
    models = load_models(policy, reader)
    assert models.tokenizer.chat_template == QWEN_VL_CHAT_TEMPLATE
    assert models.policy.config.image_token_id == models.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_qwen_id_tokenizer_has_the_real_special_ids():
    tok = qwen_id_tokenizer()
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"])
    assert ids == [151643, 151645, 151652, 151655] and len(tok) == 151665 < REAL_VOCAB
    text = "<|im_start|>user\nWhat colour is the circle? Answer: B<|im_end|>"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert max(tok(" red circle in the top left")["input_ids"]) < 1000  # text never meets the fillers


@pytest.fixture(scope="module")
def trained(dirs, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, its last checkpoint) of 2 training steps on the real-format directories."""
    return train_to_checkpoint(*dirs, tmp_path_factory.mktemp("run"), RUN)


def test_checkpoint_is_a_complete_policy_directory(dirs, trained):
    policy, reader = dirs
    _, ckpt = trained
    names = {p.name for p in ckpt.iterdir()}
    assert {"preprocessor_config.json", "tokenizer.json", "chat_template.json", "model.safetensors"} <= names
    # The processor classes load the checkpoint as they load a hub directory (AutoProcessor needs torchvision).
    assert AutoTokenizer.from_pretrained(ckpt).chat_template == QWEN_VL_CHAT_TEMPLATE
    assert isinstance(Qwen2VLImageProcessorPil.from_pretrained(ckpt), Qwen2VLImageProcessorPil)
    assert AutoImageProcessor.from_pretrained(ckpt).merge_size == 2
    # The trained weights are what a later run or eval loads.
    trained_policy = load_models(ckpt, reader).policy
    start = load_models(policy, reader).policy
    assert not all(torch.equal(a, b) for a, b in zip(trained_policy.parameters(), start.parameters(), strict=True))


def test_eval_on_the_checkpoint(dirs, trained, tmp_path):
    out, ckpt = trained
    argv = ["--policy", str(ckpt), "--reader", str(dirs[1]), "--data", str(out / "data" / "data.jsonl"), "--k", "2",
            "--max-new-tokens", "8", "--num-draws", "2", "--out", str(tmp_path / "eval")]  # fmt: skip
    summary = caprl_eval.main(argv)
    assert summary["num_images"] == 4 and summary["policy"] == str(ckpt)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["num_captions"] == 8


def test_a_run_started_from_a_checkpoint_trains(dirs, trained, tmp_path):
    """--policy <checkpoint> in train: the checkpoint is a start directory like any other."""
    first, ckpt = trained
    out = tmp_path / "second"
    argv = ["--policy", str(ckpt), "--reader", str(dirs[1]), "--data", str(first / "data" / "data.jsonl")]
    assert train.main([*argv, "--output-dir", str(out), *RUN]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
