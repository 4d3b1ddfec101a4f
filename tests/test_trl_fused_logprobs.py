"""`caprl_core.integrations.trl` against TRL's own log-prob path, on tiny random fp32 models on CPU.

TRL's `GRPOTrainer._get_per_token_logps_and_entropies` (its fused lm_head, `add_fused_lm_head`) is the oracle: ours
must give the same log-probs and entropies (0 on padded completion positions included), the same GRPO loss and the
same gradients, for a batch with left-padded prompts and right-padded completions, at several temperatures, for a
text Qwen2 and a Qwen2.5-VL with two images of different grids. Tolerance 1e-5: both compute in fp32 from the same
hidden states; what differs is the order of the vocabulary sums (TRL: 32,768-wide chunks; ours: the C++ kernel's
tiles) and T^-1 multiply vs T divide, ~1e-7 relative.

Run: pytest tests/test_trl_fused_logprobs.py
"""

from __future__ import annotations

import pytest
import torch

datasets = pytest.importorskip("datasets", reason="TRL's GRPOTrainer takes a datasets.Dataset")
trl = pytest.importorskip("trl", reason="the test compares with TRL's GRPOTrainer")

from caprl_core.integrations.trl import FusedLogprobGRPOTrainer, FusedLogprobsMixin, use_fused_logprobs  # noqa: E402
from caprl_core.models import tiny_qwen2, tiny_qwen2_5_vl, tiny_tokenizer, vl_prompt_inputs  # noqa: E402

ATOL = 1e-5
PROMPT_LENGTHS = [5, 3, 5, 2]  # left-padded to 5
COMPLETION_LENGTHS = [6, 6, 2, 4]  # right-padded to 6


def _trainer(model, tok, tmp_path, temperature: float = 1.0, cls=None):
    """A GRPOTrainer that is never trained: only its log-prob and loss methods are called."""
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
        temperature=temperature, report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
    )  # fmt: skip
    dataset = datasets.Dataset.from_list([{"prompt": "a red circle"}] * 4)
    reward = lambda prompts, completions, **kwargs: [0.0] * len(completions)
    return (cls or trl.GRPOTrainer)(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                                    processing_class=tok)  # fmt: skip


def _text_batch(tok, vocab: int) -> dict:
    """prompt_ids [4, 5] left-padded, completion_ids [4, 6] right-padded (pad positions hold the pad id)."""
    gen = torch.Generator().manual_seed(0)
    pad = tok.pad_token_id
    prompt_ids = torch.full((4, max(PROMPT_LENGTHS)), pad)
    completion_ids = torch.full((4, max(COMPLETION_LENGTHS)), pad)
    for row, (p, c) in enumerate(zip(PROMPT_LENGTHS, COMPLETION_LENGTHS, strict=True)):
        prompt_ids[row, -p:] = torch.randint(0, vocab - 20, (p,), generator=gen)
        completion_ids[row, :c] = torch.randint(0, vocab - 20, (c,), generator=gen)
    return {"prompt_ids": prompt_ids, "prompt_mask": (prompt_ids != pad).long(), "completion_ids": completion_ids,
            "completion_mask": (completion_ids != pad).long()}  # fmt: skip


def _logps(trainer, batch: dict, batch_size=None):
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    vision = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids") if k in batch}
    logps, entropy, aux = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention_mask, batch["completion_ids"].size(1), batch_size, compute_entropy=True,
        **vision,
    )  # fmt: skip
    assert aux is None
    return logps, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_logps_and_entropies_equal_trl(tmp_path, temperature):
    tok = tiny_tokenizer()
    trainer = _trainer(tiny_qwen2(tokenizer=tok, seed=1), tok, tmp_path, temperature)
    batch = _text_batch(tok, len(tok))
    with torch.no_grad():
        want_logps, want_entropy = _logps(trainer, batch)
        use_fused_logprobs(trainer)
        assert isinstance(trainer, FusedLogprobsMixin) and isinstance(trainer, trl.GRPOTrainer)
        got_logps, got_entropy = _logps(trainer, batch)
        chunked_logps, _ = _logps(trainer, batch, batch_size=3)  # a chunk of 3 sequences, then one of 1
    assert got_logps.shape == want_logps.shape == batch["completion_ids"].shape
    torch.testing.assert_close(got_logps, want_logps, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_entropy, want_entropy, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked_logps, want_logps, atol=ATOL, rtol=0)
    padded = batch["completion_mask"] == 0
    assert padded.any() and (got_logps[padded] == 0).all() and (got_entropy[padded] == 0).all()
    assert (got_logps[~padded] < 0).all(), "a real completion token should have a negative log-prob"


def test_grpo_loss_and_gradients_equal_trl(tmp_path):
    tok = tiny_tokenizer()
    batch = _text_batch(tok, len(tok))
    gen = torch.Generator().manual_seed(1)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    results = []
    for cls in (trl.GRPOTrainer, FusedLogprobGRPOTrainer):
        trainer = _trainer(tiny_qwen2(tokenizer=tok, seed=1), tok, tmp_path, temperature=0.8, cls=cls)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, read by the loss
        if "old_per_token_logps" not in batch:  # off-policy by a random amount: ratios != 1, some clipped
            with torch.no_grad():
                logps, _ = _logps(trainer, batch)
            batch["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=gen)
            batch["num_items_in_batch"] = batch["completion_mask"].sum()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (want_loss, want_grads), (got_loss, got_grads) = results
    assert want_loss.abs() > 1e-3, "a zero loss would not test anything"
    torch.testing.assert_close(got_loss, want_loss, atol=ATOL, rtol=0)
    assert got_grads.keys() == want_grads.keys() and "lm_head.weight" in got_grads
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, atol=ATOL, rtol=0, msg=name)


def _vl_batch(model, tok) -> dict:
    """Two sequences, one image each (grids [1, 4, 4] and [1, 2, 4] patches: 4 and 2 image tokens), left-padded
    prompts, right-padded completions; pixel_values, image_grid_thw and num_images as TRL passes them."""
    rows = [vl_prompt_inputs(model, [5, 6], [grid], [7, 8, 9], seed=i) for i, grid in enumerate([[1, 4, 4], [1, 2, 4]])]
    lengths = torch.tensor([len(r["input_ids"]) for r in rows])
    width, pad = int(lengths.max()), tok.pad_token_id
    prompt_ids = torch.full((2, width), pad)
    mm_prompt = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        prompt_ids[i, width - lengths[i] :] = r["input_ids"]
        mm_prompt[i, width - lengths[i] :] = r["mm_token_type_ids"]
    completion_ids = torch.tensor([[10, 11, 12, 13, 14], [15, 16, pad, pad, pad]])
    return {
        "prompt_ids": prompt_ids, "prompt_mask": (torch.arange(width) >= width - lengths[:, None]).long(),
        "completion_ids": completion_ids, "completion_mask": (completion_ids != pad).long(),
        "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
        "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows]), "num_images": [1, 1],
        "mm_token_type_ids": torch.cat([mm_prompt, torch.zeros_like(completion_ids)], dim=1),
    }  # fmt: skip


def test_qwen2_5_vl_logps_equal_trl(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_qwen2_5_vl(tokenizer=tok, seed=3)
    batch = _vl_batch(model, tok)
    trainer = _trainer(model, tok, tmp_path, temperature=0.7)
    with torch.no_grad():
        want_logps, want_entropy = _logps(trainer, batch, batch_size=1)  # chunks: the images are sliced per sequence
        use_fused_logprobs(trainer)
        got_logps, got_entropy = _logps(trainer, batch, batch_size=1)
        blind_logps, _ = _logps(trainer, {**batch, "pixel_values": batch["pixel_values"] + 1.0}, batch_size=1)
    torch.testing.assert_close(got_logps, want_logps, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_entropy, want_entropy, atol=ATOL, rtol=0)
    assert (got_logps - blind_logps).abs().max() > 1e-4, "the log-probs should depend on the image"


def test_use_fused_logprobs_rejects_other_objects():
    with pytest.raises(TypeError, match="trainer"):
        use_fused_logprobs(object())


def test_softcapped_logits_fall_back_to_trl(tmp_path):
    """TRL's head soft-caps the logits when the config says so; ours cannot, so it must hand over to TRL's path
    (with a warning) rather than return different log-probs."""
    tok = tiny_tokenizer()
    model = tiny_qwen2(tokenizer=tok, seed=1)
    model.config.final_logit_softcapping = 2.0  # read by TRL's add_fused_lm_head when the trainer is built
    trainer = _trainer(model, tok, tmp_path)
    batch = _text_batch(tok, len(tok))
    with torch.no_grad():
        want_logps, _ = _logps(trainer, batch)
        use_fused_logprobs(trainer)
        with pytest.warns(UserWarning, match="final_logit_softcapping"):
            got_logps, _ = _logps(trainer, batch)
    torch.testing.assert_close(got_logps, want_logps, atol=0, rtol=0)
