"""The paged sampler against Hugging Face: greedy tokens equal `generate`, log-probs equal a full forward pass,
seeded sampling is reproducible and draws from the right distribution, forks and the prefix cache compute shared
work once. Tiny random fp32 models on CPU (the engine's PyTorch attention path; one Triton run under the
interpreter)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caprl_core.models import tiny_llama, tiny_qwen2, tiny_qwen2_5_vl, tiny_qwen3, tiny_qwen3_vl, vl_prompt_inputs
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import SamplingParams

PROMPT_LENGTHS = (1, 5, 17, 30, 9, 23)


def _prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 1, (n,), generator=gen).tolist() for n in lengths]


def _hf_greedy(model, prompt, max_new_tokens: int, **generate_kwargs) -> list[int]:
    """HF generate on one unpadded prompt (token list or VL dict) on the model's device; greedy, no early stop."""
    if isinstance(prompt, dict):
        kw = {
            k: (v[None] if k in ("input_ids", "mm_token_type_ids") else v).to(model.device) for k, v in prompt.items()
        }
    else:
        kw = {"input_ids": torch.tensor([prompt], device=model.device)}
    kw["attention_mask"] = torch.ones_like(kw["input_ids"])
    out = model.generate(**kw, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, **generate_kwargs)  # fmt: skip
    return out[0, kw["input_ids"].shape[1] :].tolist()


def _full_forward_logits(model, prompt_ids: list[int], completion: list[int]) -> torch.Tensor:
    """Logits [len(completion), V] predicting each completion token, from one forward over prompt + completion."""
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt_ids) - 1 : -1]


# Qwen3: q/k RMS norms and a head_dim (24) that is not hidden / heads (16): the paged cache must be sized by it.
@pytest.mark.parametrize("build", [tiny_qwen2, tiny_llama, tiny_qwen3], ids=["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("num_kv_blocks", [256, 14], ids=["big-cache", "preempting-cache"])
def test_greedy_matches_hf_generate(build, num_kv_blocks):
    model = build()
    prompts, new = _prompts(512), 16
    engine = Engine(model, num_kv_blocks=num_kv_blocks, block_size=4, max_batch_tokens=64)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=new))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out[0].token_ids == _hf_greedy(model, prompt, new)
        assert out[0].finish_reason == "length"
    if num_kv_blocks == 14:
        assert engine.stats.preemptions > 0
    assert model.config._attn_implementation == "sdpa"  # switched back after the engine's steps


def test_repetition_penalty_matches_hf_generate():
    """HF's rule over prompt and completion tokens; a strong penalty changes what greedy decoding picks (so the test
    would fail if the penalty were ignored), and policy_logprobs stay those of the unpenalised policy."""
    model = tiny_qwen2()
    prompts, new = _prompts(512, lengths=(5, 9, 17)), 12
    engine = Engine(model, num_kv_blocks=64, block_size=4)
    plain = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=new))
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=new, repetition_penalty=3.0))
    changed = 0
    for prompt, out, before in zip(prompts, outs, plain, strict=True):
        assert out[0].token_ids == _hf_greedy(model, prompt, new, repetition_penalty=3.0)
        changed += out[0].token_ids != before[0].token_ids
        logits = _full_forward_logits(model, prompt, out[0].token_ids)
        own = logits.log_softmax(-1).gather(1, torch.tensor(out[0].token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(out[0].policy_logprobs), own, atol=1e-4, rtol=0)
    assert changed > 0
    with pytest.raises(ValueError, match="repetition_penalty must be finite and > 0"):
        SamplingParams(repetition_penalty=0.0)


# Qwen3-VL: DeepStack features added after decoder layers 0 and 1 (without them 3 of the 4 outputs differ),
# interleaved M-RoPE, 16-px patches with interpolated position embeddings.
@pytest.mark.parametrize("build", [tiny_qwen2_5_vl, tiny_qwen3_vl], ids=["qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("num_kv_blocks", [128, 18], ids=["big-cache", "preempting-cache"])
def test_greedy_matches_hf_generate_vl(build, num_kv_blocks):
    model = build()
    prompts = [
        vl_prompt_inputs(model, [1, 2], [[1, 4, 6]], [5, 6, 7], seed=1),
        vl_prompt_inputs(model, [3], [[1, 4, 4], [1, 6, 2]], [8, 9, 10, 11, 12], seed=2),  # two grids
        [7, 8, 9, 10],  # text only, in the same batch
        vl_prompt_inputs(model, [], [[1, 2, 2]], [4], seed=3),
    ]
    new = 12
    engine = Engine(model, num_kv_blocks=num_kv_blocks, block_size=4)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=new))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out[0].token_ids == _hf_greedy(model, prompt, new)
    if num_kv_blocks == 18:
        assert engine.stats.preemptions > 0
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_same_image_tokens_different_pixels_do_not_share_cache():
    model = tiny_qwen2_5_vl()
    a = vl_prompt_inputs(model, [1, 2, 3], [[1, 4, 4]], [5, 6, 7, 8], seed=1)
    b = vl_prompt_inputs(model, [1, 2, 3], [[1, 4, 4]], [5, 6, 7, 8], seed=2)  # same ids, other pixels
    engine = Engine(model, num_kv_blocks=64, block_size=4)
    out_a = engine.generate([a], SamplingParams(temperature=0, max_new_tokens=6))[0][0]
    hits_before = engine.stats.cached_tokens
    out_b = engine.generate([b], SamplingParams(temperature=0, max_new_tokens=6))[0][0]
    # Only block 0 ([1, 2, 3, <vision_start>], no image token) may be shared; every block with image tokens differs.
    assert engine.stats.cached_tokens - hits_before == 4
    assert out_b.token_ids == _hf_greedy(model, b, 6)
    assert out_a.token_ids == _hf_greedy(model, a, 6)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=50, top_p=0.9)],
                         ids=["plain", "filtered"])  # fmt: skip
def test_logprobs_match_full_forward(sampling):
    from caprl_core.sampler.sampling import filtered_logprobs

    model = tiny_qwen2()
    prompts = _prompts(512, (6, 19, 11))
    params = SamplingParams(n=3, max_new_tokens=12, seed=7, **sampling)
    outs = Engine(model, num_kv_blocks=64, block_size=4).generate(prompts, params)
    worst = 0.0
    for prompt, samples in zip(prompts, outs, strict=True):
        for c in samples:
            logits = _full_forward_logits(model, prompt, c.token_ids)
            rows = len(c.token_ids)
            expect = filtered_logprobs(
                logits, torch.full((rows,), params.temperature), torch.full((rows,), params.top_k),
                torch.full((rows,), params.top_p),
            ).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]  # fmt: skip
            assert torch.isfinite(expect).all()  # every sampled token is inside its filtered support
            worst = max(worst, (expect - torch.tensor(c.logprobs)).abs().max().item())
    assert worst <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_policy_logprobs_are_the_unfiltered_policy(dtype):
    """policy_logprobs: log_softmax(logits / T) over the whole vocabulary, before bans, top-k and top-p, from
    fp32-accumulated logits (a bf16 lm_head would round them); logprobs keep the filtered distribution."""
    model = tiny_qwen2().to(dtype)
    prompts = _prompts(512, (6, 19))
    banned = (3, 4, 5)
    params = SamplingParams(n=3, max_new_tokens=10, seed=3, temperature=0.7, top_k=40, top_p=0.8,
                            banned_token_ids=banned)  # fmt: skip
    outs = Engine(model, num_kv_blocks=64, block_size=4).generate(prompts, params)
    gaps = []
    for prompt, samples in zip(prompts, outs, strict=True):
        for c in samples:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                hidden = model.model(input_ids=ids).last_hidden_state[0, len(prompt) - 1 : -1]
            logits = hidden.float() @ model.lm_head.weight.float().t()  # fp32 accumulation of the model's weights
            expect = (logits / 0.7).log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            # bf16: the paged attention path and HF's SDPA round differently in bf16 before the head.
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(torch.tensor(c.policy_logprobs), expect, atol=tol, rtol=0)
            assert not set(c.token_ids) & set(banned)
            gaps.append(torch.tensor(c.logprobs) - torch.tensor(c.policy_logprobs))
    gap = torch.cat(gaps)
    assert (gap >= -1e-5).all() and gap.max() > 1e-3  # filtering only renormalises upwards, and it did here


def test_sampler_logits_accumulate_in_fp32_for_a_bf16_head():
    from caprl_core.sampler.model import ModelAdapter

    model = tiny_qwen2().to(torch.bfloat16)
    hidden = torch.randn(5, model.config.hidden_size, dtype=torch.bfloat16)
    expect = hidden.float() @ model.lm_head.weight.float().t()
    got = ModelAdapter(model).logits(hidden)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)  # a bf16 head's output would be ~1e-2 off


def test_greedy_logprobs_are_plain_log_softmax():
    model = tiny_qwen2()
    prompt = _prompts(512, (9,))[0]
    engine = Engine(model, num_kv_blocks=32, block_size=4)
    c = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8))[0][0]
    expect = _full_forward_logits(model, prompt, c.token_ids).log_softmax(-1)
    expect = expect.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(c.logprobs), expect, atol=1e-4, rtol=0)


def test_same_seed_same_output_whatever_the_batch():
    model = tiny_qwen2()
    prompts = _prompts(512, (7, 13, 4))
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=123)
    first = Engine(model, num_kv_blocks=64, block_size=4).generate(prompts, params)
    # The same requests in a different batch (another prompt after them, a preempting cache, other batch limits):
    # the same samples. (Sample i of prompts[j] draws from a generator seeded from (seed, j, i).)
    crowded = [*prompts, _prompts(512, (20,), seed=5)[0]]
    other = [*([params] * 3), SamplingParams(n=2, temperature=1.0, max_new_tokens=10)]
    engine = Engine(model, num_kv_blocks=14, block_size=4, max_batch_tokens=16)
    again = engine.generate(crowded, other)[:3]
    assert engine.stats.preemptions > 0
    assert [[c.token_ids for c in s] for s in first] == [[c.token_ids for c in s] for s in again]
    reseeded = Engine(model, num_kv_blocks=64, block_size=4).generate(prompts, SamplingParams(
        n=4, temperature=1.0, max_new_tokens=10, seed=124))  # fmt: skip
    assert [[c.token_ids for c in s] for s in first] != [[c.token_ids for c in s] for s in reseeded]
    # The n samples of one prompt differ from each other.
    assert len({tuple(c.token_ids) for c in first[0]}) == 4


def _filtered_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Independent oracle: the distribution sampled from after temperature, top-k (ties kept), top-p."""
    x = logits.astype(np.float64) / temperature
    if top_k:
        x = np.where(x < np.sort(x)[::-1][top_k - 1], -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for i in order:
        if mass >= top_p and keep.any():
            break
        keep[i] = True
        mass += p[i]
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def test_first_token_distribution_matches_filtered_distribution():
    vocab, draws = 16, 6000
    model = tiny_qwen2(vocab_size=vocab)
    with torch.no_grad():  # sharpen the random model so the filters bite
        model.lm_head.weight.mul_(5.0)
    prompt = list(range(16))  # a whole block: the forks copy nothing
    temperature, top_k, top_p = 0.9, 6, 0.8
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
    expect = _filtered_distribution(logits, temperature, top_k, top_p)
    plain = _filtered_distribution(logits, 1.0, 0, 1.0)
    assert (expect == 0).sum() >= 2 and not np.allclose(expect, plain, atol=0.02)  # the test is not vacuous
    params = SamplingParams(n=draws, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=1, seed=3)
    out = Engine(model, num_kv_blocks=draws + 8, block_size=16, max_num_seqs=draws).generate([prompt], params)[0]
    counts = np.bincount([c.token_ids[0] for c in out], minlength=vocab)
    assert counts[expect == 0].sum() == 0  # never a filtered token

    def chi2(p: np.ndarray) -> float:
        support = p > 0
        e = draws * p[support]
        return float(((counts[support] - e) ** 2 / e).sum()) + (math.inf if counts[~support].any() else 0.0)

    dof = int((expect > 0).sum()) - 1
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[dof]  # chi-square quantile at p = 0.001
    assert chi2(expect) < critical
    assert chi2(plain) > critical  # the unfiltered distribution is rejected by the same test


def test_fork_shares_prompt_blocks_and_prefills_once():
    model = tiny_qwen2()
    prompt = _prompts(512, (40,))[0]  # 2 full blocks of 16 + 8 tokens in a partial block
    engine = Engine(model, num_kv_blocks=64, block_size=16)
    outs = engine.generate([prompt], SamplingParams(n=8, temperature=1.0, max_new_tokens=4, seed=0))
    assert len(outs[0]) == 8
    assert engine.stats.prefill_tokens == 40  # not 8 x 40
    assert engine.stats.forks == 7
    # 2 shared full blocks + one partial block per sample (40 + 4 tokens stay inside it): 10, not 8 x 3 = 24.
    assert engine.stats.peak_used_blocks == 2 + 8
    for c in outs[0]:  # each fork continues from the prompt: its log-probs agree with a full forward pass
        logits = _full_forward_logits(model, prompt, c.token_ids)
        lp = logits.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), lp, atol=1e-4, rtol=0)


def test_fork_runs_the_vision_tower_once_per_image():
    model = tiny_qwen2_5_vl()
    calls = []
    model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    prompts = [vl_prompt_inputs(model, [1], [[1, 4, 6]], [2, 3], seed=1),
               vl_prompt_inputs(model, [4], [[1, 4, 4], [1, 2, 6]], [5], seed=2)]  # fmt: skip
    engine = Engine(model, num_kv_blocks=128, block_size=4)
    outs = engine.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=5, seed=0))
    assert [len(o) for o in outs] == [8, 8]
    assert len(calls) == 3 and engine.stats.vision_calls == 3  # three images, sixteen samples
    assert engine.stats.prefill_tokens == sum(len(p["input_ids"]) for p in prompts)


def test_prefill_shares_prefix_and_matches_uncached_hidden_states():
    model = tiny_qwen2()
    prefix = _prompts(512, (40,), seed=1)[0]  # 5 blocks of 8
    questions = _prompts(512, (5, 5, 5, 5), seed=2)
    prompts = [prefix + q for q in questions]
    engine = Engine(model, num_kv_blocks=128, block_size=8)
    hidden = engine.prefill(prompts)
    assert hidden.shape == (4, model.config.hidden_size)
    with torch.no_grad():
        expect = torch.stack([model.model(input_ids=torch.tensor([p])).last_hidden_state[0, -1] for p in prompts])
    assert (hidden - expect).abs().max().item() <= 1e-5
    assert engine.stats.prefill_tokens == 45 + 3 * 5  # the 40-token prefix is computed once
    assert engine.stats.cached_tokens == 3 * 40
    # A second call finds the prefix in the cache too, and gives the same states.
    again = engine.prefill(prompts[:1])
    assert engine.stats.cached_tokens == 4 * 40
    assert (again[0] - hidden[0]).abs().max().item() <= 1e-5


def test_triton_attention_backend_matches_hf_under_interpreter():
    pytest.importorskip("triton")
    model = tiny_qwen2()
    prompts, new = _prompts(512, (3, 10)), 5
    engine = Engine(model, num_kv_blocks=16, block_size=4, attn_backend="triton")
    assert engine.attn_backend == "triton"  # not a silent fallback to the PyTorch path
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=new))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out[0].token_ids == _hf_greedy(model, prompt, new)


@pytest.mark.gpu  # deselected (and counted as such) without CUDA
@pytest.mark.parametrize("attn_backend", ["triton", "torch"])
@pytest.mark.parametrize("num_kv_blocks", [256, 14], ids=["big-cache", "preempting-cache"])
def test_greedy_matches_hf_generate_on_cuda(attn_backend, num_kv_blocks):
    """The GPU paths (Triton store/prefill/decode kernels, CUDA sampling) give HF's greedy tokens. fp32: in bf16 a
    near-tie between two logits may flip on a different summation order, which is not an engine error."""
    model = tiny_qwen2().cuda()
    prompts, new = _prompts(512), 16
    engine = Engine(model, num_kv_blocks=num_kv_blocks, block_size=4, max_batch_tokens=64, attn_backend=attn_backend)
    assert engine.attn_backend == attn_backend  # not a silent fallback
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=new))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out[0].token_ids == _hf_greedy(model, prompt, new)
    if num_kv_blocks == 14:
        assert engine.stats.preemptions > 0


def test_stop_tokens_end_a_completion():
    model = tiny_qwen2()
    prompt = _prompts(512, (6,))[0]
    free = Engine(model, num_kv_blocks=32, block_size=4).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=10)
    )
    tokens = free[0][0].token_ids
    stop = tokens[3]
    out = Engine(model, num_kv_blocks=32, block_size=4).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(stop,))
    )[0][0]
    assert out.finish_reason == "stop"
    assert out.token_ids == tokens[: tokens.index(stop) + 1]


def test_progress_bar_on_stderr_changes_nothing(capsys):
    model = tiny_qwen2()
    prompts = _prompts(512, (6, 9))
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=5, seed=3)
    quiet = Engine(model, num_kv_blocks=64, block_size=4).generate(prompts, params)
    assert capsys.readouterr().err == ""
    shown = Engine(model, num_kv_blocks=64, block_size=4).generate(prompts, params, progress=True)
    err = capsys.readouterr().err
    assert "sampler" in err and "4/4" in err  # tqdm: 2 prompts x n=2 finished sequences
    assert [[c.token_ids for c in g] for g in shown] == [[c.token_ids for c in g] for g in quiet]


def test_engine_uses_the_model_in_place_and_recovers_from_a_failed_step(monkeypatch):
    model = tiny_qwen2()
    engine = Engine(model, num_kv_blocks=32, block_size=4)
    assert engine.adapter.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    prompts = _prompts(512, (6, 9))
    params = SamplingParams(temperature=0, max_new_tokens=6)
    good = engine.generate(prompts, params)
    calls = {"n": 0}
    real = engine.adapter.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.adapter, "forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(_prompts(512, (11, 4), seed=9), params)
    assert model.config._attn_implementation == "sdpa"
    assert engine.block_manager.num_free == engine.num_kv_blocks
    again = engine.generate(prompts, params)
    assert [o[0].token_ids for o in again] == [o[0].token_ids for o in good]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SamplingParams(n=0), "n must be"),
        (lambda: SamplingParams(temperature=-0.1), "temperature"),
        (lambda: SamplingParams(top_p=0.0), "top_p"),
        (lambda: SamplingParams(top_p=1.5), "top_p"),
        (lambda: SamplingParams(top_k=-1), "top_k"),
        (lambda: SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_sampling_params(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_prompts_and_engine_arguments():
    model = tiny_qwen2()
    engine = Engine(model, num_kv_blocks=8, block_size=4)
    ok = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        engine.generate([[1, 2], []], ok)
    with pytest.raises(ValueError, match=r"prompts\[0\].*KV cache"):
        engine.generate([list(range(40))], ok)
    with pytest.raises(ValueError, match=r"prompts\[0\].*\[0, 512\)"):
        engine.generate([[1, 600]], ok)
    with pytest.raises(ValueError, match="list of prompts"):
        engine.generate([1, 2, 3], ok)
    with pytest.raises(ValueError, match=r"prompts\[0\].*maximum length"):
        Engine(model, num_kv_blocks=2048, block_size=4).generate([[1] * 4096], ok)
    with pytest.raises(ValueError, match="pixel_values"):
        engine.generate([{"input_ids": [1, 2], "pixel_values": torch.zeros(4, 8)}], ok)
    with pytest.raises(ValueError, match="at most one"):
        Engine(model, num_kv_blocks=8, kv_cache_tokens=64)
    with pytest.raises(ValueError, match="block_size"):
        Engine(model, num_kv_blocks=8, block_size=0)
    with pytest.raises(ValueError, match="params"):
        engine.generate([[1], [2]], [ok])


def test_banned_tokens_are_never_sampled():
    model = tiny_qwen2(vocab_size=16)
    prompt = list(range(8))
    banned = tuple(range(0, 16, 2))
    out = Engine(model, num_kv_blocks=512, block_size=4).generate(
        [prompt], SamplingParams(n=64, temperature=2.0, max_new_tokens=4, seed=0, banned_token_ids=banned)
    )[0]
    drawn = {t for c in out for t in c.token_ids}
    assert drawn and not drawn & set(banned)
    assert len(drawn) > 3  # still sampling among the others


def test_default_cache_follows_the_calls_need_and_is_decided_at_allocation():
    """No size given: nothing is allocated at construction; the first call gets its need (every sample at its
    maximum length, next power of two), a bigger call grows it, free_kv_cache lets the next call decide again."""
    model = tiny_qwen2()
    engine = Engine(model, block_size=4)
    assert engine.kv_cache is None and engine.num_kv_blocks is None
    params = SamplingParams(n=3, temperature=0, max_new_tokens=6)
    small = engine.generate(_prompts(512, (5, 9)), params)
    assert engine.num_kv_blocks == 32  # 3 samples x 3 blocks + 3 x 4 = 21 -> 32 and engine.kv_cache.shape[2] == 32
    engine.generate(_prompts(512, (30, 30, 30)), params)  # 3 * 3 * 9 = 81 -> 128
    assert engine.num_kv_blocks == 128 and engine.stats.preemptions == 0
    engine.generate(_prompts(512, (5, 9)), params)  # smaller: the cache is kept
    assert engine.num_kv_blocks == 128
    engine.free_kv_cache()
    again = engine.generate(_prompts(512, (5, 9)), params)
    assert engine.num_kv_blocks == 32
    assert [[c.token_ids for c in o] for o in again] == [[c.token_ids for c in o] for o in small]
    capped = Engine(model, block_size=4, kv_cache_memory_fraction=1e-9)
    with pytest.raises(ValueError, match="kv_cache_memory_fraction"):
        capped.generate(_prompts(512, (5,)), params)


def test_prefill_shared_prefix_keeps_only_the_prefix_computed_alone():
    """With shared_prefix, each call starts from a cache holding that prefix's full blocks only, computed by a
    prefill of its own: the same call gives the same bits on a fresh engine and after other calls."""
    model = tiny_qwen2()
    header = _prompts(512, (21,), seed=3)[0]  # 5 full blocks of 4 + 1 token
    tails = [_prompts(512, (7, 3, 12), seed=s) for s in (4, 5)]
    calls = [[header + t for t in tail] for tail in tails]
    engines = [Engine(model, block_size=4) for _ in calls]
    fresh = [e.prefill(c, shared_prefix=header) for e, c in zip(engines, calls, strict=True)]
    assert [e.stats.shared_prefix_tokens for e in engines] == [21, 21]  # the header alone, once per cold cache
    engine = Engine(model, block_size=4)
    engine.prefill(calls[1] + calls[0], shared_prefix=header)  # leaves every caption prefix cached
    for call, want in zip(calls, fresh, strict=True):
        before = engine.stats.prefill_tokens
        got = engine.prefill(call, shared_prefix=header)
        assert torch.equal(got, want)
        # Only the header's 5 full blocks came from the cache: each prompt computed everything after them.
        assert engine.stats.prefill_tokens - before == sum(len(p) - 20 for p in call)
    with pytest.raises(ValueError, match="shared_prefix"):
        engine.prefill(calls[0], shared_prefix=[1, 2, 10_000])


@pytest.mark.parametrize("size", [{}, {"num_kv_blocks": 64}], ids=["by-need", "fixed"])
def test_release_keeps_the_shared_prefix_blocks_with_the_recomputed_bits(size):
    """release_kv_cache(keep_prefix=header) after every call, as the trainer's reward does: over several calls the
    header is computed alone once, every result has the bits of an engine that frees everything (and so computes
    the header again each time), and while released the engine holds the header's full blocks and nothing more."""
    model = tiny_qwen2()
    header = _prompts(512, (21,), seed=3)[0]  # 5 full blocks of 4 + 1 token
    kept, freed = Engine(model, block_size=4, **size), Engine(model, block_size=4, **size)
    for step, lengths in enumerate([(7, 3), (12, 30, 5), (40,) * 6, (2, 9)]):  # the third call grows a by-need cache
        call = [header + tail for tail in _prompts(512, lengths, seed=10 + step)]
        assert torch.equal(kept.prefill(call, shared_prefix=header), freed.prefill(call, shared_prefix=header))
        # The blocks as computing the header alone leaves them, so the call allocated the same ones.
        bms = kept.block_manager, freed.block_manager
        assert [(bm.free_ids, bm.hash_to_block) for bm in bms] == [(bm.free_ids, bm.hash_to_block) for bm in bms[::-1]]
        kept.release_kv_cache(keep_prefix=header)
        freed.free_kv_cache()
        assert kept.kv_cache is None and kept.held_kv_bytes == 5 * kept.block_bytes
        assert freed.held_kv_bytes == 0
    assert kept.stats.shared_prefix_tokens == 21  # one header prefill over the 4 calls
    assert freed.stats.shared_prefix_tokens == 4 * 21
    assert kept.stats.cached_tokens - freed.stats.cached_tokens == 0  # the same prompts hit the same header blocks


def test_cache_growth_keeps_the_shared_prefix_blocks():
    """A call that outgrows the cache reallocates it: the last shared prefix's full blocks move to the new one (they
    used to be lost, so the header was computed alone again), with the bits of a fresh engine."""
    model = tiny_qwen2()
    header = _prompts(512, (21,), seed=3)[0]
    engine = Engine(model, block_size=4)
    engine.prefill([header + [1, 2]], shared_prefix=header)
    small = engine.num_kv_blocks
    big = [header + tail for tail in _prompts(512, (40,) * 6, seed=7)]
    got = engine.prefill(big, shared_prefix=header)
    assert engine.num_kv_blocks > small and engine.stats.shared_prefix_tokens == 21
    fresh = Engine(model, block_size=4)
    assert torch.equal(got, fresh.prefill(big, shared_prefix=header)) and fresh.stats.shared_prefix_tokens == 21


def test_release_keeps_nothing_it_cannot_reuse():
    """Nothing is kept with prefix caching off, for a prefix other than the last shared prefix, or by free_kv_cache;
    a second release keeps what the first kept; a generate call never sees the kept blocks."""
    model = tiny_qwen2()
    header = _prompts(512, (21,), seed=3)[0]
    call = [header + tail for tail in _prompts(512, (7, 3), seed=4)]
    off = Engine(model, block_size=4, enable_prefix_caching=False)
    want = off.prefill(call, shared_prefix=header)
    off.release_kv_cache(keep_prefix=header)
    assert off.held_kv_bytes == 0
    engine = Engine(model, block_size=4)
    assert torch.equal(engine.prefill(call, shared_prefix=header), want)
    engine.release_kv_cache(keep_prefix=header[:12])  # cached, but not the prefix computed alone
    assert engine.held_kv_bytes == 0
    engine.prefill(call, shared_prefix=header)
    engine.release_kv_cache(keep_prefix=header)
    engine.release_kv_cache(keep_prefix=header)
    assert engine.held_kv_bytes == 5 * engine.block_bytes
    params = SamplingParams(n=2, temperature=0, max_new_tokens=5)
    prompts = [header[:9], _prompts(512, (6,), seed=5)[0]]
    assert engine.generate(prompts, params) == Engine(model, block_size=4).generate(prompts, params)
    engine.free_kv_cache()
    assert engine.held_kv_bytes == 0
    with pytest.raises(ValueError, match="keep_prefix"):
        engine.release_kv_cache(keep_prefix=[1, 10_000])


def test_reward_config_kv_cache_tokens_sizes_the_readers_engine():
    """RewardConfig.kv_cache_tokens reaches the reader's Engine (None: sized by need); sizing it twice is an error."""
    from caprl_core.models import tiny_tokenizer
    from caprl_core.reward import CapRLReward
    from caprl_core.reward_config import RewardConfig

    tok = tiny_tokenizer()
    reader = tiny_qwen2(tokenizer=tok)
    fixed = CapRLReward(reader, tok, RewardConfig(kv_cache_tokens=1000, engine_kwargs={"block_size": 8}))
    assert fixed.engine.num_kv_blocks == 125 and fixed.engine.fixed_kv_blocks == 125
    assert CapRLReward(reader, tok, RewardConfig()).engine.fixed_kv_blocks is None
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        RewardConfig(kv_cache_tokens=0)
    with pytest.raises(ValueError, match="engine_kwargs"):
        RewardConfig(kv_cache_tokens=1000, engine_kwargs={"num_kv_blocks": 8})
