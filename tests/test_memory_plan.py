"""caprl_core.memory_plan: parameter counts and saved activations against real transformers modules, the terms'
behaviour (sharding granularity, checkpointing, caches), the CLI, and predicted against measured peaks of the trainer
(bench/bench_memory_plan.py's run at one small width)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from caprl_core.memory_plan import GB, PRESETS, Workload, largest_policy, main, model_dims, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def _numel_on_meta(config) -> int:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_parameter_counts_equal_the_real_modules(family, tmp_path):
    """The real-format directories (Qwen2.5-VL + Qwen2.5, Qwen3-VL + Qwen3 layouts at small widths): the count from
    config.json equals the numel of the model transformers builds from it."""
    from transformers import AutoConfig

    from caprl_core.models import write_real_format_dirs
    from caprl_core.qwen3_dirs import write_qwen3_format_dirs

    write = write_qwen3_format_dirs if family == "qwen3" else write_real_format_dirs
    for directory in write(tmp_path, widths="test"):
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        assert model_dims(directory).params() == _numel_on_meta(config), directory.name
        assert model_dims(config).params() == model_dims(directory).params()


def test_presets_equal_the_released_models_structure():
    """Qwen2.5-VL-3B's and Qwen2.5-3B's presets against transformers' modules built (on the meta device) from a
    config with the released shape; the Qwen3 pair and the 32B from their published totals."""
    from transformers import AutoConfig

    from caprl_core.models import REAL_TEXT, REAL_VISION, REAL_VOCAB, _hub_text_config, _hub_vl_config
    from caprl_core.models import tiny_tokenizer as tokenizer_like

    tok = tokenizer_like()
    vl = _hub_vl_config(REAL_TEXT, REAL_VISION, REAL_VOCAB, tok)
    vl.update(num_hidden_layers=36)
    vl["vision_config"].update(depth=32, fullatt_block_indexes=[7, 15, 23, 31])
    text = {**_hub_text_config(REAL_TEXT, REAL_VOCAB, tok, "Qwen2ForCausalLM", "qwen2"), "num_hidden_layers": 36}
    for preset, config in (("qwen2.5-vl-3b", vl), ("qwen2.5-3b", text)):
        built = AutoConfig.for_model(**config)
        assert PRESETS[preset].params() == _numel_on_meta(built), preset
    # Published totals (model cards / safetensors metadata): Qwen3-4B 4.02 B, Qwen3-VL-4B 4.44 B, Qwen2.5-VL-32B 33.5 B
    for preset, billions in (("qwen3-4b", 4.02), ("qwen3-vl-4b", 4.44), ("qwen2.5-vl-32b", 33.45)):
        assert PRESETS[preset].params() / 1e9 == pytest.approx(billions, rel=0.01), preset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_layer_activations_equal_what_autograd_saves(arch, dtype):
    """Every tensor a decoder layer's forward saves for backward (saved_tensors_hooks), its input included, without
    the parameters and the rotary cos/sin (shared by all layers): equal to `layer_activation_bytes` within 1%."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if arch == "qwen3" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(hidden_size=256, intermediate_size=1376, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=64, num_hidden_layers=1, vocab_size=512)  # fmt: skip
    config._attn_implementation = "sdpa"
    model = model_cls(config).to(dtype)
    T = 300
    x = torch.randn(1, T, 256, dtype=dtype, requires_grad=True)
    positions = torch.arange(T)[None]
    cos, sin = model.model.rotary_emb(x, positions)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
    ignore = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ignore |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    measured = sum(n for ptr, n in saved.items() if ptr not in ignore) / T
    assert model_dims(config).layer_activation_bytes(dtype.itemsize) == pytest.approx(measured, rel=0.01)


def _plan(policy="qwen2.5-vl-32b", reader="qwen2.5-3b", **kw):
    return plan_memory(policy, reader, Workload(**{"world_size": 8, **kw}))


def test_sharding_granularity_term():
    """One group holds the whole model's unsharded gradients and their fp32 copy; per-layer groups the root's and
    one layer's."""
    one, per = _plan(sharding="one-group").update.terms, _plan(sharding="per-layer").update.terms
    P, dims = PRESETS["qwen2.5-vl-32b"].params(), PRESETS["qwen2.5-vl-32b"]
    assert one["unsharded grads + fp32 reduce copy (whole model)"] == P * 6
    assert (
        per["unsharded grads + fp32 reduce copy: root + 1 layer"]
        == (dims.root_params() + dims.largest_group_params()) * 6
    )
    assert _plan(sharding="one-group").update.total - _plan(sharding="per-layer").update.total > 200 * GB


def test_checkpointing_caches_and_world_size_move_their_terms():
    off, on = _plan("qwen2.5-vl-3b"), _plan("qwen2.5-vl-3b", gradient_checkpointing=True)
    assert on.update.terms["activations: decoder layers"] < off.update.terms["activations: decoder layers"] / 10
    # With short captions the update peaks in the optimizer step instead (CPU's per-tensor AdamW: two tensors of the
    # embedding's size beside the gradients), with no activations or gathered groups left
    short = Workload(images_per_step=1, group_size=2, max_new_tokens=8, micro_batch_size=1, prompt_tokens=50,
                     image_patches=64, dtype="float32", optimizer_foreach=False)  # fmt: skip
    step = plan_memory("qwen2.5-vl-3b", "qwen2.5-3b", short).update.terms
    assert step["optimizer step temporary"] == 2 * 151936 * 2048 * 4 and not any(k.startswith("activ") for k in step)
    allocated, touched = _plan(), _plan(kv_cache="touched")
    assert touched.rollout.terms["policy KV cache"] < allocated.rollout.terms["policy KV cache"]
    assert touched.reward.terms["reader KV cache"] < allocated.reward.terms["reader KV cache"]
    whole, layered = _plan(), _plan(rollout_gather="per-layer")
    assert layered.rollout.total < whole.rollout.total - 50 * GB
    one = plan_memory("qwen2.5-vl-3b", "qwen2.5-3b", Workload(world_size=1))
    assert one.rollout.terms["fp32 master weights"] == PRESETS["qwen2.5-vl-3b"].params() * 4  # bf16 compute
    fp32 = plan_memory("qwen2.5-vl-3b", "qwen2.5-3b", Workload(dtype="float32"))
    assert "fp32 master weights" not in fp32.rollout.terms
    for plan in (off, on, touched, one):
        for phase in plan.phases:
            assert all(v > 0 for v in phase.terms.values()), (phase.phase, phase.terms)


def test_largest_policy_fits_and_one_more_layer_does_not():
    w = Workload(world_size=8, gradient_checkpointing=True, rollout_gather="per-layer")
    dims, plan = largest_policy("qwen2.5-3b", w, 80 * GB)
    assert plan.peak <= 80 * GB
    bigger = replace(dims, text=replace(dims.text, layers=dims.text.layers + 1))
    assert plan_memory(bigger, "qwen2.5-3b", w).peak > 80 * GB or dims.text.layers == 2 * 80


def test_workload_errors_name_the_argument():
    with pytest.raises(ValueError, match="images_per_step"):
        Workload(images_per_step=12, world_size=8)
    with pytest.raises(ValueError, match="sharding"):
        Workload(sharding="zero3")
    with pytest.raises(ValueError, match="neither a preset"):
        model_dims("no-such-model")


def test_cli_prints_the_table_and_a_fit_line(capsys, tmp_path):
    assert main(["--policy", "qwen2.5-vl-3b", "--reader", "qwen2.5-3b", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "| **peak** |" in out and "AdamW state (fp32)" in out and "fits in 80 GB" in out
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "num_key_value_heads": 2,
                                                      "intermediate_size": 128, "vocab_size": 1000}))  # fmt: skip
    assert main(["--policy", "qwen2.5-vl-3b", "--reader", str(tmp_path), "--world-size", "1"]) == 0
    assert main(["--policy", "nope", "--reader", "qwen2.5-3b"]) == 2
    assert capsys.readouterr().err.strip().endswith("nor a config.json or a directory holding one")


# A short run at a small width: hidden 128 (real vocabulary), 1 image x 2 captions of 8 tokens, 1 draw, micro-batches
# of 1 caption (two per step: the second forward runs beside the first one's gradients, as in a real update).
SMALL_RUN = ["--steps", "2", "--images-per-step", "1", "--group-size", "2", "--max-new-tokens", "8",
             "--num-draws", "1", "--micro-batch-size", "1", "--dtype", "float32", "--progress", "false",
             "--checkpoint-every", "100"]  # fmt: skip


@pytest.mark.slow
def test_predicted_peaks_within_20_percent_of_the_trainers(tmp_path):
    """The trainer's measured peak per phase (step 1, fp32, CPU resident set) against the plan: within 20%, and the
    part above the process baseline within 25% too, which dropping the AdamW state term breaks."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_memory_plan import NUM_IMAGES, compare

    from caprl_core.world import make_world_data

    data = make_world_data(tmp_path / "data", "train", NUM_IMAGES)
    row = compare(tmp_path, 128, data, SMALL_RUN)
    for phase in ("rollout", "reward", "update"):
        predicted, measured = row[f"{phase}_predicted_mb"], row[f"{phase}_measured_mb"]
        assert predicted == pytest.approx(measured, rel=0.20), (phase, row)
        above = measured - row["baseline_mb"]
        assert predicted - row["baseline_mb"] == pytest.approx(above, rel=0.25), (phase, row)
        without_adamw = predicted - row["plan"][phase]["AdamW state (fp32)"] - row["baseline_mb"]
        assert without_adamw != pytest.approx(above, rel=0.25), (phase, row)


def test_workload_from_the_training_configuration():
    from caprl_core.config import TrainConfig

    config = TrainConfig()
    config.rollout.images_per_step, config.optim.micro_batch_size = 32, 4
    config.model.gradient_checkpointing = True
    w = Workload.from_train_config(config, world_size=8, prompt_tokens=700)
    assert (w.images_per_step, w.group_size, w.max_new_tokens, w.micro_batch_size, w.num_draws) == (32, 8, 512, 4, 8)
    assert (w.dtype, w.gradient_checkpointing, w.shared_prefix, w.world_size, w.prompt_tokens) == (
        "bfloat16", True, True, 8, 700)  # fmt: skip
