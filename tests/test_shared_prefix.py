"""The group-shared training forward (`caprl_core.shared_prefix`) against the unshared one, its reference: the same
log-probs and the same gradient on every parameter (vision tower included) on tiny Qwen2, Qwen2.5-VL and Qwen3-VL
models, with ragged and truncated captions, G in {1, 2, 8}, groups split across micro-batches and gradient
checkpointing; and the work it saves, counted with hooks on the model (tokens into the decoder, images into the
vision tower)."""

from __future__ import annotations

import pytest
import torch

from caprl_core.config_cli import parse_config
from caprl_core.models import tiny_qwen2, tiny_qwen2_5_vl, tiny_qwen3_vl, vl_prompt_inputs
from caprl_core.precision import MasterWeightOptimizer
from caprl_core.rl.batches import policy_logprobs, training_batch
from caprl_core.rl.rollout import Rollout
from caprl_core.rl.update import update
from caprl_core.sampler.sequence import Completion
from caprl_core.shared_prefix import Group, block_mask, shared_prefix_inputs

CPU = torch.device("cpu")
ATOL = 1e-5  # fp32: the two paths sum the same terms in other orders (SDPA blocks, gradient accumulation)


def _model(kind: str):
    if kind == "qwen2":
        return tiny_qwen2(vocab_size=97, hidden_size=32, num_heads=4, num_kv_heads=2, seed=1)
    if kind == "qwen3_vl":  # DeepStack: the image rows of the packed row get the vision blocks' features too
        return tiny_qwen3_vl(vocab_size=97, hidden_size=32, num_heads=4, num_kv_heads=2, seed=1)
    return tiny_qwen2_5_vl(vocab_size=97, hidden_size=32, num_heads=4, num_kv_heads=2, seed=1)


def _prompts(model, kind: str) -> list[dict]:
    """Two prompts of different lengths (and, for Qwen2.5-VL, images of different grids)."""
    if kind == "qwen2":
        return [{"input_ids": torch.tensor([5, 9, 13, 2, 7])}, {"input_ids": torch.tensor([11, 3, 8])}]
    return [vl_prompt_inputs(model, [4, 6], [[1, 4, 4]], [9, 10, 12], seed=0),
            vl_prompt_inputs(model, [3], [[1, 4, 6]], [8], seed=1)]  # fmt: skip


def _rollout(model, kind: str, group_size: int, lengths: list[int] | None = None, seed: int = 0) -> Rollout:
    """Captions of ragged lengths (1 token included), every other one truncated, with made-up sampler log-probs."""
    prompts = _prompts(model, kind)
    gen = torch.Generator().manual_seed(seed)
    n = len(prompts) * group_size
    lengths = lengths or [1 + (7 * i + 3) % 9 for i in range(n)]
    completions = []
    for i, length in enumerate(lengths):
        tokens = torch.randint(0, 90, (length,), generator=gen).tolist()
        logp = (-torch.rand(length, generator=gen) * 5).tolist()
        completions.append(Completion(tokens, logp, "length" if i % 2 else "stop", logp))
    truncated = torch.tensor([c.finish_reason == "length" for c in completions])
    return Rollout(prompts, completions, [""] * n, truncated)


def _logp_and_grads(model, ro, group_size: int, shared: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs of every caption in one micro-batch and the gradient of a random weighting of them."""
    model.zero_grad(set_to_none=True)
    rows = list(range(len(ro.completions)))
    batch = training_batch(ro, rows, group_size, CPU, model, shared)
    logp, _ = policy_logprobs(model, batch, temperature=0.9)
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(3))
    (logp * weights * batch.mask).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logp.detach().masked_fill(~batch.mask, 0), grads


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("group_size", [1, 2, 8])
def test_logprobs_and_gradients_equal_the_unshared_forward(kind: str, group_size: int) -> None:
    model = _model(kind).train()
    ro = _rollout(model, kind, group_size)
    logp, grads = _logp_and_grads(model, ro, group_size, shared=False)
    logp_shared, grads_shared = _logp_and_grads(model, ro, group_size, shared=True)
    assert torch.allclose(logp_shared, logp, rtol=0, atol=ATOL), (logp_shared - logp).abs().max()
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == names == set(grads_shared)  # every parameter gets a gradient on both paths
    if kind == "qwen2_5_vl":
        assert any(name.startswith("model.visual.") and g.abs().max() > 0 for name, g in grads.items())
    for name in names:
        diff = (grads_shared[name] - grads[name]).abs().max()
        assert diff <= ATOL, f"{name}: max abs gradient difference {diff}"


def _update(model, ro, group_size: int, shared: bool, *extra: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """update's metrics and the gradients it stepped with."""
    config, _ = parse_config(["--group-size", str(group_size), "--shared-prefix", str(shared).lower(),
                              "--max-new-tokens", "16", *extra])  # fmt: skip
    optimizer = MasterWeightOptimizer(model, lambda params: torch.optim.SGD(params, lr=0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0)
    grads: dict[str, torch.Tensor] = {}
    step = optimizer.step

    def capture(max_grad_norm=None):
        grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        return step(max_grad_norm)

    optimizer.step = capture
    advantages = torch.randn(len(ro.completions), generator=torch.Generator().manual_seed(5))
    metrics = update(model, None, optimizer, scheduler, ro, advantages, config, CPU)
    return metrics, grads


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_update_with_split_groups_and_checkpointing_equals_the_unshared_update(kind: str, checkpointing: bool) -> None:
    """micro_batch_size 3 with G = 4 splits groups between micro-batches; masked truncated captions; k3 metrics."""
    model = _model(kind)
    if checkpointing:
        model.gradient_checkpointing_enable()
    ro = _rollout(model, kind, 4)
    extra = ("--micro-batch-size", "3", "--mask-truncated", "true", "--aggregation", "seq-mean-token-mean")
    metrics, grads = _update(model, ro, 4, False, *extra)
    metrics_shared, grads_shared = _update(model, ro, 4, True, *extra)
    counted = ("update_tokens", "update_images")
    assert metrics_shared["update_tokens"] < metrics["update_tokens"]
    for key in metrics.keys() - set(counted):
        assert metrics_shared[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key
    assert set(grads) == set(grads_shared) and grads
    for name, g in grads.items():
        assert (grads_shared[name] - g).abs().max() <= ATOL, name


class _Counter:
    """Forward hooks: tokens into the decoder's first layer, calls of the vision tower and the images they encode."""

    def __init__(self, model) -> None:
        decoder = getattr(model.model, "language_model", model.model)
        self.tokens = self.vision_calls = self.images = 0
        decoder.layers[0].register_forward_pre_hook(self._count_tokens)
        if hasattr(model.model, "visual"):
            model.model.visual.register_forward_pre_hook(self._count_images, with_kwargs=True)

    def _count_tokens(self, module, args) -> None:
        self.tokens += args[0].shape[0] * args[0].shape[1]  # hidden_states [rows, L, H]

    def _count_images(self, module, args, kwargs) -> None:
        self.vision_calls += 1
        self.images += kwargs["grid_thw"].shape[0]  # [images, 3]


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl"])
@pytest.mark.parametrize("shared", [False, True])
def test_tokens_and_vision_calls_per_update_follow_the_formula(kind: str, shared: bool) -> None:
    """B = 2 images, G = 8 captions of n = 6 tokens, micro-batches of one group: unshared, B * G * (P + n) tokens and
    B * G images encoded; shared, sum of P + B * G * n tokens and each image once (one call per micro-batch)."""
    group_size, n = 8, 6
    model = _model(kind)
    ro = _rollout(model, kind, group_size, lengths=[n] * 2 * group_size)
    counter = _Counter(model)
    metrics, _ = _update(model, ro, group_size, shared, "--micro-batch-size", str(group_size))
    prompt_lengths = [len(p["input_ids"]) for p in ro.prompts]
    if shared:
        tokens, images = sum(prompt_lengths) + 2 * group_size * n, 2
    else:
        tokens, images = sum(group_size * (p + n) for p in prompt_lengths), 2 * group_size
    if kind == "qwen2":
        images = 0
    assert counter.tokens == metrics["update_tokens"] == tokens
    assert counter.images == metrics["update_images"] == images
    assert counter.vision_calls == (2 if kind == "qwen2_5_vl" else 0)  # one per micro-batch


def test_block_mask_by_hand() -> None:
    # one image: prompt of 2 tokens, captions of 2 and 1 tokens; a second image: prompt of 1, caption of 1
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    captions = torch.tensor([-1, -1, 0, 0, 1, -1, 2])
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)  # fmt: skip
    assert torch.equal(block_mask(groups, captions), expected)


def test_positions_continue_from_the_prompt() -> None:
    model = _model("qwen2_5_vl")
    prompts = _prompts(model, "qwen2_5_vl")
    inputs, index, images = shared_prefix_inputs(model, prompts, [Group(1, [[1, 2, 3], [4]])], CPU)
    positions = inputs["position_ids"][:, 0]  # [3, T]
    plen = len(prompts[1]["input_ids"])
    rope, _ = model.model.get_rope_index(prompts[1]["input_ids"][None], prompts[1]["mm_token_type_ids"][None],
                                         image_grid_thw=prompts[1]["image_grid_thw"])  # fmt: skip
    start = int(rope.max()) + 1
    assert torch.equal(positions[:, :plen], rope[:, 0])
    assert torch.equal(positions[:, plen:], torch.tensor([start, start + 1, start + 2, start]).expand(3, -1))
    assert index.tolist() == [[plen - 1, plen, plen + 1], [plen - 1, 0, 0]] and images == 1


def test_an_attention_implementation_without_dense_masks_is_an_error_naming_the_option() -> None:
    model = _model("qwen2")
    model.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="shared_prefix"):
        shared_prefix_inputs(model, _prompts(model, "qwen2"), [Group(0, [[1]])], CPU)


def test_eager_attention_takes_the_additive_mask() -> None:
    model = _model("qwen2").train()
    model.model.config._attn_implementation = "eager"
    ro = _rollout(model, "qwen2", 2)
    logp, _ = _logp_and_grads(model, ro, 2, shared=False)
    logp_shared, _ = _logp_and_grads(model, ro, 2, shared=True)
    assert (logp_shared - logp).abs().max() <= ATOL
