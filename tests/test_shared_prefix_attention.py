"""The mask-free shared-prefix attention (`caprl_core.segment_attention`, the default of `caprl_core.shared_prefix`)
against the dense [T, T] block mask, its reference: the op alone (forward and backward, GQA, ragged and empty
captions, several images), and through `policy_logprobs` on tiny Qwen2, Qwen2.5-VL and Qwen3-VL models (log-probs and
every parameter's gradient; G in {1, 2, 8}; ragged and truncated captions; gradient checkpointing on and off). A
test with the captions' isolation removed on purpose shows the comparison can fail; others that no [T, T] mask
reaches the model and that the switched model's other forwards are unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_shared_prefix import ATOL, CPU, _logp_and_grads, _model, _prompts, _rollout

from caprl_core import segment_attention
from caprl_core.rl.batches import policy_logprobs, training_batch
from caprl_core.segment_attention import ImageSegments, SegmentLayout
from caprl_core.shared_prefix import ATTENTION_ENV, Group, block_mask, shared_prefix_inputs


def _dense(q, k, v, group_ids, caption_ids, scale):
    """The reference: one SDPA call over the row under `block_mask`. [1, H, T, D] -> [1, T, H, D]."""
    mask = block_mask(group_ids, caption_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)


def _row(images: list[tuple[int, list[int]]]) -> tuple[SegmentLayout, torch.Tensor, torch.Tensor]:
    """Layout and the dense path's group_ids / caption_ids of a row of (prompt length, caption lengths) images."""
    segments, group_ids, caption_ids, start, caption = [], [], [], 0, 0
    for g, (prompt_length, lengths) in enumerate(images):
        segments.append(ImageSegments.build(start, prompt_length, lengths, CPU))
        group_ids += [g] * (prompt_length + sum(lengths))
        caption_ids += [-1] * prompt_length
        for n in lengths:
            caption_ids += [caption] * n
            caption += 1
        start += prompt_length + sum(lengths)
    return SegmentLayout(tuple(segments), start), torch.tensor(group_ids), torch.tensor(caption_ids)


@pytest.mark.parametrize("images", [[(5, [3])], [(7, [1, 4, 0, 6]), (3, [2, 2])], [(1, [9, 1, 5, 2, 8, 3, 7, 4])]])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_segment_attention_equals_the_dense_mask_forward_and_backward(images, heads) -> None:
    layout, group_ids, caption_ids = _row(images)
    gen = torch.Generator().manual_seed(0)
    (hq, hkv), t, d = heads, layout.length, 8
    q, k, v = (torch.randn(1, h, t, d, generator=gen, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv))
    upstream = torch.randn(1, t, hq, d, generator=gen, dtype=torch.float64)
    out = segment_attention.segment_attention(q, k, v, layout, scaling=0.3)
    ref = _dense(q, k, v, group_ids, caption_ids, 0.3)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)  # fp64: the same sums in other orders
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def _both_paths(monkeypatch, kind: str, group_size: int, checkpointing: bool):
    model = _model(kind).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ro = _rollout(model, kind, group_size)
    monkeypatch.setenv(ATTENTION_ENV, "dense")
    dense = _logp_and_grads(model, ro, group_size, shared=True)
    monkeypatch.setenv(ATTENTION_ENV, "segments")
    segments = _logp_and_grads(model, ro, group_size, shared=True)
    return model, dense, segments


def _max_differences(model, dense, segments) -> tuple[float, float]:
    (logp, grads), (logp_seg, grads_seg) = dense, segments
    assert set(grads) == set(grads_seg) == {name for name, p in model.named_parameters() if p.requires_grad}
    return float((logp_seg - logp).abs().max()), max(float((grads_seg[n] - g).abs().max()) for n, g in grads.items())


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("group_size", [1, 2, 8])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_policy_logprobs_and_gradients_equal_the_dense_mask(monkeypatch, kind, group_size, checkpointing) -> None:
    model, dense, segments = _both_paths(monkeypatch, kind, group_size, checkpointing)
    logp_diff, grad_diff = _max_differences(model, dense, segments)
    assert logp_diff <= ATOL and grad_diff <= ATOL, (logp_diff, grad_diff)


def _leaky_caption_attention(q, k, v, kp, vp, image, scaling, dropout, gqa):
    """Deliberately wrong: caption g also sees every token of caption g - 1 (the isolation between captions gone)."""
    g, width = image.caption_index.shape
    index = image.caption_index.reshape(-1)
    qc = q[:, index].unflatten(1, (g, width)).transpose(0, 1)  # [G, Hq, L, D]
    kc = k[:, index].unflatten(1, (g, width)).transpose(0, 1)
    vc = v[:, index].unflatten(1, (g, width)).transpose(0, 1)
    keys = torch.cat([kp.expand(g, -1, -1, -1), kc.roll(1, dims=0), kc], dim=2)  # [G, Hkv, P + 2L, D]
    values = torch.cat([vp.expand(g, -1, -1, -1), vc.roll(1, dims=0), vc], dim=2)
    previous = torch.arange(g)[:, None, None, None] > 0  # caption 0 has no previous caption
    mask = torch.cat([image.mask[:, : image.prompt_length].expand(g, 1, width, -1),
                      previous.expand(g, 1, width, width), image.mask[:, image.prompt_length :].expand(g, 1, -1, -1)],
                     dim=-1)  # fmt: skip
    out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(0, 1).flatten(1, 2)[:, image.kept]


@pytest.mark.parametrize("leak", [False, True], ids=["isolated", "caption_sees_previous_caption"])
def test_the_equality_test_fails_when_captions_see_each_other(monkeypatch, leak: bool) -> None:
    """The same comparison as above (Qwen2.5-VL, G = 2, checkpointing) with the captions' isolation removed on purpose
    in the segment path: it must then fail, far above the tolerance."""
    if leak:
        monkeypatch.setattr(segment_attention, "_caption_attention", _leaky_caption_attention)
    model, dense, segments = _both_paths(monkeypatch, "qwen2_5_vl", 2, True)
    logp_diff, grad_diff = _max_differences(model, dense, segments)
    if leak:
        assert logp_diff > 100 * ATOL and grad_diff > 100 * ATOL, (logp_diff, grad_diff)
    else:
        assert logp_diff <= ATOL and grad_diff <= ATOL, (logp_diff, grad_diff)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3_vl"])
def test_no_dense_mask_reaches_the_decoder(kind: str) -> None:
    """Every decoder layer gets the empty 4D marker as its mask and the layout beside it: transformers built no
    [T, T] mask of its own (it would from the packed positions, were the mask None)."""
    model = _model(kind)
    seen = []
    decoder = getattr(model.model, "language_model", model.model)
    for layer in decoder.layers:
        layer.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["attention_mask"], kw)), with_kwargs=True)
    prompts = _prompts(model, kind)
    inputs, _, _ = shared_prefix_inputs(model, prompts, [Group(0, [[1, 2, 3], [4, 5]]), Group(1, [[6]])], CPU)
    model.model(**inputs, use_cache=False)
    assert len(seen) == len(decoder.layers)
    assert all(mask.numel() == 0 and mask.dim() == 4 for mask, _ in seen)
    assert all(isinstance(kw[segment_attention.SEGMENTS_KWARG], SegmentLayout) for _, kw in seen)
    assert decoder.config._attn_implementation == "caprl_shared_prefix"


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl"])
def test_the_switched_model_runs_other_forwards_unchanged(kind: str) -> None:
    """After the segment forward switched the language model's attention, a padded unshared batch (its own 2D mask)
    gives bit for bit what it gave before: the wrapper hands it to the implementation it replaced."""
    model = _model(kind)
    ro = _rollout(model, kind, 2)
    batch = training_batch(ro, [0, 1, 2, 3], 2, CPU, model, shared_prefix=False)
    with torch.no_grad():
        before, _ = policy_logprobs(model, batch, temperature=1.0)
        segment_attention.use_segment_attention(model)
        after, _ = policy_logprobs(model, batch, temperature=1.0)
    assert torch.equal(before, after)


def test_a_model_that_did_not_build_the_batch_attends_by_segments_too(monkeypatch) -> None:
    """The reference policy (KL term) runs the policy's batch: policy_logprobs switches it too, or its SDPA would
    ignore the layout and attend causally over the whole row."""
    policy, reference = _model("qwen2"), _model("qwen2")
    ro = _rollout(policy, "qwen2", 2)
    monkeypatch.setenv(ATTENTION_ENV, "dense")
    dense = training_batch(ro, [0, 1, 2, 3], 2, CPU, reference, shared_prefix=True)
    monkeypatch.setenv(ATTENTION_ENV, "segments")
    segments = training_batch(ro, [0, 1, 2, 3], 2, CPU, policy, shared_prefix=True)
    with torch.no_grad():
        expected, _ = policy_logprobs(reference, dense, temperature=1.0)
        got, _ = policy_logprobs(reference, segments, temperature=1.0)
    assert (got - expected).masked_fill(~dense.mask, 0).abs().max() <= ATOL


def test_an_unknown_attention_form_is_an_error_naming_the_option() -> None:
    model = _model("qwen2")
    with pytest.raises(ValueError, match="attention"):
        shared_prefix_inputs(model, _prompts(model, "qwen2"), [Group(0, [[1]])], CPU, attention="flex")
