"""torchrun + FSDP2 on CPU (gloo), one FSDP group per decoder layer and vision block (the default): two ranks compute
the one-process run's steps, write one log and one checkpoint that transformers loads, resume exactly after a rank is
SIGKILLed, and checkpoints move between world sizes, in fp32 and in bf16 (the GPU default: one process keeps fp32
master copies, N ranks' fp32 shards are the masters). The wrapping itself is checked in-process on a one-rank mesh.

Each run is a real `torchrun --standalone --nproc_per_node=2` (localhost only) of `python -m caprl_core.train` on the
tiny built-in models; the runs are shared between tests through module fixtures to keep the file under a few minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caprl_core.checkpoint import COMPLETE
from caprl_core.distributed import World, local_images
from caprl_core.rl.progress import TIMING_KEYS

# The tiny random pair (this file checks the machinery, not learning) at the learning rate of its old default run.
SMALL = ["--policy", "tiny-random", "--reader", "tiny-random", "--lr", "2e-4", "--warmup-steps", "2",
         "--steps", "3", "--images-per-step", "2", "--group-size", "3", "--max-new-tokens", "8", "--num-draws", "2",
         "--synthetic-images", "8", "--checkpoint-every", "2", "--sample-every", "1",
         "--progress", "false"]  # fmt: skip
# What differs between world sizes by construction: each rank's reader computes the few-shot header once.
PER_RANK_KEYS = ("reader_tokens_computed",)
# Compared with a tolerance across world sizes (reduction order); the rest must be equal.
FLOAT_KEYS = ("sampled_mass", "sampler_kl", "sampler_max_abs_diff", "is_weight_mean", "entropy", "loss", "grad_norm",
              "clip_fraction", "ratio_mean", "ratio_max", "ratio_min", "is_weight_max", "is_weight_min")  # fmt: skip


def _env(extra: dict | None = None) -> dict:
    # Per-layer FSDP groups (the default) whatever the caller's environment says; a test may ask for the single group.
    return {**os.environ, "OMP_NUM_THREADS": "1", "CAPRL_FSDP_GROUPS": "layers", **(extra or {})}


def _train(out: Path, *extra: str, ranks: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*launcher, "-m", "caprl_core.train", *SMALL, "--output-dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(env), timeout=900)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS and k not in PER_RANK_KEYS}


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def _assert_same_steps(a: list[dict], b: list[dict]) -> None:
    """Equal step by step: the same captions, rewards and advantages; loss-side floats up to reduction order."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        x, y = _stable(x), _stable(y)
        assert set(x) == set(y)
        for key in x:
            if key in FLOAT_KEYS:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
            else:
                assert y[key] == x[key], (x["step"], key)


def _assert_close_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    """fp32 weights of two world sizes: equal up to the order of fp32 gradient sums. Measured worst difference 2.5e-7
    with per-layer groups (3.6e-7 with the single group before; 2 ranks vs 1 process, 3 steps); a 1.01x lr on the
    ranks moved them 3.3e-5 apart, which the old 1e-4 let pass."""
    assert sorted(a) == sorted(b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    done = _train(out)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    done = _train(out, ranks=2)
    assert done.returncode == 0, done.stderr
    return out


def test_two_ranks_compute_the_one_process_steps(one_process, two_ranks):
    one, two = _metrics(one_process), _metrics(two_ranks)
    assert [r["step"] for r in two] == [0, 1, 2]  # one log, one line per step (rank 0 writes it)
    assert [r["reward_mean"] for r in two] == [r["reward_mean"] for r in one]
    _assert_same_steps(one, two)
    _assert_close_weights(_weights(one_process, 2), _weights(two_ranks, 2))
    start = _weights(one_process, 1)  # and they moved: this is no comparison of two untrained models
    assert any(not torch.equal(start[k], w) for k, w in _weights(two_ranks, 2).items())
    # rank 0 wrote the samples of its share's first images: the same lines one process writes for those images
    lines = (two_ranks / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 and set(lines) <= set((one_process / "samples.jsonl").read_text().splitlines())


def test_two_ranks_with_gradient_checkpointing_compute_the_one_process_steps(one_process, tmp_path):
    """Per-layer groups under `--gradient-checkpointing` (transformers' non-reentrant checkpoint re-runs each layer,
    FSDP hooks included, in the backward) and the group-shared forward (the default): still the one-process steps.
    Measured: the same metrics and weights as the 2-rank run without it, bit for bit."""
    out = tmp_path / "checkpointed"
    done = _train(out, "--gradient-checkpointing", "true", ranks=2)
    assert done.returncode == 0, done.stderr
    _assert_same_steps(_metrics(one_process), _metrics(out))
    _assert_close_weights(_weights(one_process, 2), _weights(out, 2))


@pytest.mark.slow  # one more torchrun run (~40 s on the shared 2-core machine); the default tests cover per-layer
def test_per_layer_groups_step_exactly_what_the_single_group_steps(two_ranks, tmp_path):
    """The old single group (CAPRL_FSDP_GROUPS=whole) and the per-layer groups on 2 ranks: the same forward on the
    same gathered weights and per-element sums of the same two gradients, so equal metrics and bit-equal weights
    (measured so in fp32)."""
    out = tmp_path / "whole"
    done = _train(out, ranks=2, env={"CAPRL_FSDP_GROUPS": "whole"})
    assert done.returncode == 0, done.stderr
    assert [_stable(r) for r in _metrics(out)] == [_stable(r) for r in _metrics(two_ranks)]
    assert all(torch.equal(v, _weights(two_ranks, 2)[k]) for k, v in _weights(out, 2).items())


@pytest.mark.slow  # two more runs (~80 s on the shared 2-core machine)
def test_tied_qwen3_vl_per_layer_with_gradient_checkpointing_computes_the_one_process_steps(tmp_path):
    """Qwen3-VL in its released layout (tied embeddings, as Qwen2.5-VL-3B; DeepStack mergers in the root group), 3
    decoder layers and 2 vision blocks each their own group, `--gradient-checkpointing`: 2 ranks step what one process
    steps (measured: weights 1.9e-7 apart). The torchrun checkpoint also names the tied lm_head (equal to the
    embeddings; the single group wrote it too), which one process's save_pretrained leaves out."""
    from caprl_core.qwen3_dirs import write_qwen3_format_dirs
    from caprl_core.world import make_world_data

    policy, reader = write_qwen3_format_dirs(tmp_path / "models", widths="test", seed=0)
    data = make_world_data(tmp_path / "data", "train", 8)
    args = ["--policy", str(policy), "--reader", str(reader), "--data", str(data), "--gradient-checkpointing", "true"]
    runs = {ranks: tmp_path / f"ranks-{ranks}" for ranks in (1, 2)}
    for ranks, out in runs.items():
        done = _train(out, *args, ranks=ranks)
        assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_steps(_metrics(runs[1]), _metrics(runs[2]))
    one, two = _weights(runs[1], 2), _weights(runs[2], 2)
    assert torch.equal(two.pop("lm_head.weight"), two["model.language_model.embed_tokens.weight"])
    _assert_close_weights(one, two)


def test_two_rank_checkpoint_loads_in_transformers(two_ranks):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    ckpt = two_ranks / "checkpoints" / "step-000002"
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    saved = _weights(two_ranks, 2)
    loaded = model.state_dict()
    assert any(torch.equal(loaded[k], v) for k, v in saved.items() if k in loaded)
    ids = tokenizer("A red circle", return_tensors="pt")["input_ids"]
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)


def test_sigkilled_rank_then_resume_gives_the_uninterrupted_run(two_ranks, tmp_path):
    out = tmp_path / "crashed"
    killed = _train(out, ranks=2, env={"CAPRL_TEST_KILL_IN_CHECKPOINT": "2"})  # rank 0 dies writing step 2's
    assert killed.returncode != 0
    assert f"exitcode  : -{int(signal.SIGKILL)}" in killed.stderr, killed.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000001"
    resumed = _train(out, "--resume", ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step-000001" in resumed.stderr
    assert [_stable(r) for r in _metrics(out)] == [_stable(r) for r in _metrics(two_ranks)]
    assert all(torch.equal(v, _weights(two_ranks, 2)[k]) for k, v in _weights(out, 2).items())


def _restart_from_step_1(run: Path, into: Path) -> Path:
    """A copy of `run` as if it had stopped after its step-1 checkpoint."""
    shutil.copytree(run, into)
    shutil.rmtree(into / "checkpoints" / "step-000002")
    (into / "checkpoints" / "latest").write_text("step-000001\n")
    return into


def test_checkpoints_move_between_world_sizes(one_process, two_ranks, tmp_path):
    one = _restart_from_step_1(two_ranks, tmp_path / "two-then-one")
    done = _train(one, "--resume")
    assert done.returncode == 0, done.stderr
    _assert_same_steps(_metrics(one_process), _metrics(one))
    _assert_close_weights(_weights(one_process, 2), _weights(one, 2))

    two = _restart_from_step_1(one_process, tmp_path / "one-then-two")
    done = _train(two, "--resume", ranks=2)
    assert done.returncode == 0, done.stderr
    _assert_same_steps(_metrics(one_process), _metrics(two))
    _assert_close_weights(_weights(one_process, 2), _weights(two, 2))


def test_a_global_batch_that_does_not_divide_is_an_error_naming_the_option():
    assert list(local_images(4, World(rank=1, world_size=2))) == [2, 3]
    with pytest.raises(ValueError, match="--images-per-step.*3 images.*world size \\(2"):
        local_images(3, World(rank=0, world_size=2))


# bf16, one caption per micro-batch: one process and each rank run the same bf16 forward and backward per micro-batch,
# and both accumulate several micro-batch gradients (one process 6, each rank 3), so only the order of their fp32 sums
# differs. Accumulated in bf16 instead (the hook that moves them to the masters removed), grad_norm at step 0 was
# 2.6e-5 (relative) off the 2 ranks'.
BF16 = ["--dtype", "bfloat16", "--micro-batch-size", "1"]


@pytest.fixture(scope="module")
def one_process_bf16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-bf16") / "run"
    done = _train(out, *BF16)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def two_ranks_bf16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-bf16") / "run"
    done = _train(out, *BF16, ranks=2)
    assert done.returncode == 0, done.stderr
    return out


def _fp32_masters(out: Path) -> list[torch.Tensor]:
    """The fp32 masters of a bf16 run's step-2 checkpoint, in parameter order: one process saves them as copies in its
    optimizer state (its weights are bf16), N ranks as the weights themselves."""
    from caprl_core.policy import tiny_policy_and_reader
    from caprl_core.resume import saved_masters, saved_parameters

    ckpt = out / "checkpoints" / "step-000002"
    masters = saved_masters(ckpt)
    if all(m is not None for m in masters):
        return masters
    policy = tiny_policy_and_reader(0)[0]
    return saved_parameters(ckpt, policy, [p for p in policy.parameters() if p.requires_grad])


def _assert_bf16_weights_agree(a: Path, b: Path) -> None:
    """Two bf16 runs' fp32 masters within 1e-6: equal up to the order of fp32 gradient sums, as in fp32 (measured
    4.5e-7 between world sizes with the single FSDP group, 2.3e-7 per layer; 6e-8 after a resume, against ~4e-4 of
    movement). Their bf16 weights were equal too
    (all 226,144), but rounding to bf16 hides differences up to half a bf16 spacing (2**-9 relative): the masters are
    the comparison that can fail."""
    worst = max(float((x - y).abs().max()) for x, y in zip(_fp32_masters(a), _fp32_masters(b), strict=True))
    assert worst <= 1e-6, worst


def test_bf16_two_ranks_step_the_one_process_gradient(one_process_bf16, two_ranks_bf16):
    """Gradients accumulate in fp32 on both sides (caprl_core.precision; FSDP reduces in fp32) from the same starting
    masters: grad_norm within 1e-6 relative at every step (measured 3.0e-7, 4.3e-7, 5.3e-7 with the single FSDP group;
    per layer 4.6e-7, 0 (a step with grad_norm 0 on both sides), 6.0e-7: the sampler decodes one image per rank
    instead of two together, so its bf16 log-probs, hence the tis weights, differ in the last bits)."""
    one, two = _metrics(one_process_bf16), _metrics(two_ranks_bf16)
    for x, y in zip(one, two, strict=True):
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-6), (x["step"], x["grad_norm"], y["grad_norm"])
    _assert_same_steps(one, two)
    _assert_bf16_weights_agree(one_process_bf16, two_ranks_bf16)


def test_bf16_checkpoints_move_between_world_sizes(one_process_bf16, two_ranks_bf16, tmp_path):
    """A 2-rank bf16 checkpoint resumes in one bf16 process (its masters rebuilt from the saved fp32 weights) and a
    one-process bf16 checkpoint on 2 ranks (its saved fp32 masters become the shards), like the uninterrupted run."""
    one = _restart_from_step_1(two_ranks_bf16, tmp_path / "two-then-one")
    done = _train(one, *BF16, "--resume")
    assert done.returncode == 0, done.stderr
    _assert_same_steps(_metrics(two_ranks_bf16), _metrics(one))
    _assert_bf16_weights_agree(two_ranks_bf16, one)

    two = _restart_from_step_1(one_process_bf16, tmp_path / "one-then-two")
    done = _train(two, *BF16, "--resume", ranks=2)
    assert done.returncode == 0, done.stderr
    _assert_same_steps(_metrics(one_process_bf16), _metrics(two))
    _assert_bf16_weights_agree(one_process_bf16, two)


def test_a_checkpoint_that_cannot_resume_is_a_one_line_error_naming_resume(one_process, tmp_path):
    """Optimizer state for another number of parameters: one line naming --resume, exit 2, no traceback."""
    out = _restart_from_step_1(one_process, tmp_path / "broken")
    state = out / "checkpoints" / "step-000001" / "trainer_state" / "optimizer.json"
    tree = json.loads(state.read_text())
    tree["masters"] = tree["masters"][:1]
    state.write_text(json.dumps(tree) + "\n")
    marker = state.parent.parent / COMPLETE  # the manifest of file sizes: keep the checkpoint complete
    manifest = json.loads(marker.read_text())
    manifest["files"]["trainer_state/optimizer.json"] = state.stat().st_size
    marker.write_text(json.dumps(manifest))
    done = _train(out, "--resume")
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("python -m caprl_core.train: error: --resume: "), done.stderr[-2000:]
    assert "Traceback" not in done.stderr


# --- the per-layer wrapping itself, in this process on a one-rank gloo mesh (the same FSDP2 code path) -------------


@pytest.fixture
def one_rank(tmp_path) -> World:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield World(0, 1, 0, init_device_mesh("cpu", (1,)))
    finally:
        dist.destroy_process_group()


def _tied_qwen2():
    from caprl_core.models import tiny_qwen2

    model = tiny_qwen2()
    model.lm_head.weight = model.get_input_embeddings().weight  # as Qwen2.5-VL-3B's tie_word_embeddings
    return model


def _layers_and_blocks(policy) -> list[torch.nn.Module]:
    inner = policy.model
    decoder = getattr(inner, "language_model", inner)
    blocks = list(inner.visual.blocks) if hasattr(inner, "visual") else []
    return [*blocks, *decoder.layers]


def _is_dtensor(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


@pytest.mark.parametrize("make", ["qwen2_5_vl", "qwen3_vl", "tied_qwen2"])
def test_each_decoder_layer_and_vision_block_is_its_own_group_and_the_lm_head_is_the_roots(one_rank, make):
    """After `shard_policy`: every decoder layer and vision block is an FSDPModule of its own, and the root's own
    `unshard()` (not recursive in FSDP2) gathers the lm_head (and embeddings tied to it) but no layer's weights. The
    old single group gathers everything there: the last assertions fail on it (checked with per_layer=False)."""
    from caprl_core import models
    from caprl_core.distributed import TokenLogprobs, is_sharded, shard_policy
    from caprl_core.rl.batches import policy_logprobs

    policy = _tied_qwen2() if make == "tied_qwen2" else getattr(models, f"tiny_{make}")()
    expected = _layers_and_blocks(policy)
    assert len(expected) >= 2  # Qwen2: 2 layers; the VL models: 2 vision blocks and 2-3 layers
    root = TokenLogprobs(policy, policy_logprobs)
    units = shard_policy(root, one_rank, torch.float32)
    assert [id(u) for u in units] == [id(m) for m in expected]
    assert all(is_sharded(m) for m in expected) and is_sharded(root)
    root.unshard()
    assert not _is_dtensor(policy.lm_head.weight) and not _is_dtensor(policy.get_input_embeddings().weight)
    assert all(_is_dtensor(p) for m in expected for p in m.parameters())
    root.reshard()
    assert _is_dtensor(policy.lm_head.weight)


def test_a_layer_class_that_holds_the_lm_head_is_refused():
    """The lm_head must stay in the root group: a `_no_split_modules` entry that covers it is an error naming it."""
    from caprl_core.distributed import shard_units
    from caprl_core.models import tiny_qwen2

    model = tiny_qwen2()
    model._no_split_modules = ["Qwen2Model"]  # the whole decoder, embeddings included
    with pytest.raises(ValueError, match="shard_policy: Qwen2Model holds the embeddings or the lm_head"):
        shard_units(model)


def test_one_group_gathers_every_layer_with_the_root(one_rank):
    """The old wrapping (`CAPRL_FSDP_GROUPS=whole`): no layer is an FSDPModule, the root's unshard gathers them all."""
    from caprl_core.distributed import TokenLogprobs, is_sharded, shard_policy
    from caprl_core.models import tiny_qwen2_5_vl
    from caprl_core.rl.batches import policy_logprobs

    policy = tiny_qwen2_5_vl()
    root = TokenLogprobs(policy, policy_logprobs)
    assert shard_policy(root, one_rank, torch.float32, per_layer=False) == []
    assert not any(is_sharded(m) for m in _layers_and_blocks(policy))
    root.unshard()
    assert not any(_is_dtensor(p) for p in policy.parameters())


def _head_loss(policy, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """A forward that, like the fused log-prob op, uses the lm_head weight outside `policy.model`."""
    hidden = policy.model.language_model(input_ids=ids).last_hidden_state
    return (hidden @ policy.lm_head.weight.t() / temperature).logsumexp(-1).sum()


def test_sampler_calls_inside_gathered_keep_every_layer_gathered_then_the_update_steps_as_unsharded(one_rank):
    """Inside `gathered(root)` the sampler calls the layers directly, so their FSDP hooks fire: the weights must stay
    gathered across calls (no collective inside the sampler), every group is resharded after, and the next update's
    forward and backward through the root give the unsharded model's gradients (the root chosen before the sampler
    ran: a layer that made itself FSDP's root at its first call would make this forward fail)."""
    import copy

    from caprl_core.distributed import TokenLogprobs, gathered, shard_policy
    from caprl_core.models import tiny_qwen2_5_vl

    policy = tiny_qwen2_5_vl()
    reference = copy.deepcopy(policy)
    root = TokenLogprobs(policy, _head_loss)
    shard_policy(root, one_rank, torch.float32)
    ids = torch.randint(0, 400, (2, 7))
    with gathered(root):
        assert not any(_is_dtensor(p) for p in policy.parameters())
        with torch.inference_mode():
            first = policy.model.language_model(input_ids=ids).last_hidden_state
            again = policy.model.language_model(input_ids=ids).last_hidden_state  # decode steps: the same weights
        assert not any(_is_dtensor(p) for p in policy.parameters())
        assert torch.equal(first, again)
    assert all(_is_dtensor(p) for p in policy.parameters())
    root(ids, 1.0).backward()
    _head_loss(reference, ids, 1.0).backward()
    for (name, p), q in zip(policy.named_parameters(), reference.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6, msg=name)
