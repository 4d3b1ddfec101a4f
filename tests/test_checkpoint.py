"""Checkpoints: a resumed run continues bit for bit, the directory is a Hugging Face model, old checkpoints are pruned,
a crash (simulated at each stage, and one real SIGKILL) never exposes an incomplete checkpoint, nothing is pickled."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from caprl_core import checkpoint, resume
from caprl_core.checkpoint import save_checkpoint
from caprl_core.models import tiny_qwen2, tiny_qwen2_5_vl, tiny_tokenizer
from caprl_core.resume import latest_checkpoint, load_checkpoint

VOCAB = 512
ROOT = Path(__file__).resolve().parents[1]


def _tied_qwen2(seed: int) -> Qwen2ForCausalLM:
    """tiny_qwen2 with lm_head tied to the embeddings (as in Qwen2.5-VL-3B): its weight is saved once."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = Qwen2ForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _setup(seed: int, tied: bool = False):
    model = (_tied_qwen2(seed) if tied else tiny_qwen2(vocab_size=VOCAB, seed=seed)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # Warm-up over 4 steps: a scheduler that is not restored gives a different lr after resuming.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> list[torch.Tensor]:
    """Each batch draws on torch's, Python's and numpy's global RNGs, so a resume that misses one diverges."""
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, random.randint(6, 10)))  # [B, T]
        scale = float(np.random.uniform(0.5, 1.5))
        loss = model(input_ids=ids, labels=ids).loss * scale
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("tied", [False, True])
def test_resume_is_bit_identical(tmp_path, tied):
    _seed_all(0)
    model, optimizer, scheduler = _setup(0, tied)
    _train(model, optimizer, scheduler, 3)
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"step": 2, "data_position": 6})  # fmt: skip
    expected = _train(model, optimizer, scheduler, 3)

    _seed_all(123)  # another seed, other initial weights: everything must come from the checkpoint
    fresh, fresh_optimizer, fresh_scheduler = _setup(1, tied)
    state = load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert state == {"step": 2, "data_position": 6}
    losses = _train(fresh, fresh_optimizer, fresh_scheduler, 3)

    assert torch.equal(torch.stack(losses), torch.stack(expected))
    _assert_same_weights(fresh, model)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for name, value in optimizer.state[p].items():
            assert torch.equal(fresh_optimizer.state[q][name], value), name


def test_rng_states_are_restored(tmp_path):
    model = tiny_qwen2(num_layers=1)
    _seed_all(7)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    path = save_checkpoint(tmp_path, 0, model=model, trainer_state={})
    after_save = (torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(5))
    _seed_all(99)
    load_checkpoint(path, model=model)
    after_load = (torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(5))
    assert torch.equal(after_load[0], after_save[0])
    assert after_load[1:3] == after_save[1:3]
    assert np.array_equal(after_load[3], after_save[3])


def test_layout_and_no_pickle(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in ((torch, "save"), (torch, "load"), (pickle, "dump"), (pickle, "dumps"), (pickle, "load")):
        monkeypatch.setattr(module, name, refuse)
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 1)
    path = save_checkpoint(tmp_path, 12, model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"step": 12}, processors=[tiny_tokenizer()])  # fmt: skip
    assert path == tmp_path / "checkpoints" / "step-000012"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000012"
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    state_files = {"optimizer.safetensors", "optimizer.json", "scheduler.safetensors", "scheduler.json",
                   "rng.safetensors", "rng.json", "state.json"}  # fmt: skip
    assert {"config.json", "model.safetensors", "tokenizer.json", "COMPLETE"} <= files
    assert {f"trainer_state/{name}" for name in state_files} <= files
    assert not [f for f in files if Path(f).suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    with safe_open(path / "trainer_state" / "optimizer.safetensors", framework="pt") as f:
        assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(f.keys())
    groups = json.loads((path / "trainer_state" / "optimizer.json").read_text())["param_groups"]
    assert groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert groups[0]["betas"] == {"__tuple__": [0.9, 0.999]}
    # A plain-function lambda is code, not state: LambdaLR stores None for it.
    assert json.loads((path / "trainer_state" / "scheduler.json").read_text())["lr_lambdas"] == [None]
    load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)  # torch.load / pickle.load refuse


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl"])
def test_checkpoint_loads_with_from_pretrained_and_generates_the_same(tmp_path, kind):
    tokenizer = tiny_tokenizer()
    build, auto = {"qwen2": (tiny_qwen2, AutoModelForCausalLM),
                   "qwen2_5_vl": (tiny_qwen2_5_vl, AutoModelForImageTextToText)}[kind]  # fmt: skip
    model = build(tokenizer=tokenizer)
    path = save_checkpoint(tmp_path, 5, model=model, trainer_state={"step": 5}, processors=[tokenizer, None])

    loaded = auto.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("describe the image in detail")])  # [1, T]
    greedy = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(loaded.generate(ids, **greedy), model.generate(ids, **greedy))
    assert AutoTokenizer.from_pretrained(path).encode("red circle") == tokenizer.encode("red circle")

    # Qwen2.5-VL is saved in the hub's layout (model.layers.*, visual.*), not its module names; loading maps back.
    fresh = build(tokenizer=tokenizer, seed=1)
    load_checkpoint(path, model=fresh)
    _assert_same_weights(fresh, model)


def test_fallback_through_from_pretrained(tmp_path, monkeypatch):
    """Layouts that are not a renaming of the module names are read by transformers' own loader."""
    model = _tied_qwen2(0)
    path = save_checkpoint(tmp_path, 0, model=model, trainer_state={})
    monkeypatch.setattr(resume, "_checkpoint_key_map", lambda model: None)
    fresh = _tied_qwen2(1)
    load_checkpoint(path, model=fresh)
    _assert_same_weights(fresh, model)


def test_keep_last_prunes_older_checkpoints(tmp_path):
    model = tiny_qwen2(num_layers=1)
    names = lambda: sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    for step in range(5):
        save_checkpoint(tmp_path, step, model=model, trainer_state={"step": step}, keep_last=2)
    assert names() == ["latest", "step-000003", "step-000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000004"
    # A run restarted from an older step: the checkpoint just written is kept, and `latest` names it.
    save_checkpoint(tmp_path, 1, model=model, trainer_state={"step": 1}, keep_last=2)
    assert names() == ["latest", "step-000001", "step-000003", "step-000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000001"
    # Saving an existing step again replaces it.
    save_checkpoint(tmp_path, 4, model=model, trainer_state={"step": 4, "again": True}, keep_last=2)
    assert names() == ["latest", "step-000003", "step-000004"]
    assert load_checkpoint(latest_checkpoint(tmp_path), model=model) == {"step": 4, "again": True}


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, and save_checkpoint's `except Exception` cleanup does not either."""


def _die(*args, **kwargs):
    raise _Killed


def _inject_crash(stage: str, monkeypatch, model) -> None:
    if stage == "writing_weights":  # half of model.safetensors on disk
        save = model.save_pretrained

        def save_half(directory, **kwargs):
            save(directory, **kwargs)
            weights = Path(directory) / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            raise _Killed

        monkeypatch.setattr(model, "save_pretrained", save_half)
    elif stage == "before_marker":  # every file written, COMPLETE not yet
        monkeypatch.setattr(checkpoint, "_fsync_tree", _die)
    elif stage == "before_rename":  # a complete tmp directory that was never renamed into place
        replace = os.replace

        def replace_or_die(src, dst):
            if re.fullmatch(r"step-\d+", Path(dst).name):
                raise _Killed
            replace(src, dst)

        monkeypatch.setattr(checkpoint.os, "replace", replace_or_die)
    elif stage == "writing_latest":  # the new checkpoint in place, `latest` still names the old one

        def write_tmp_only(root, name):
            (root / f"latest.tmp-{os.getpid()}").write_text(name[:4])
            raise _Killed

        monkeypatch.setattr(checkpoint, "_write_latest", write_tmp_only)
    elif stage == "pruning":  # the old checkpoint renamed away for deletion, then killed
        monkeypatch.setattr(checkpoint.shutil, "rmtree", _die)


@pytest.mark.parametrize("stage", ["writing_weights", "before_marker", "before_rename", "writing_latest", "pruning"])
def test_a_crash_never_exposes_an_incomplete_checkpoint(tmp_path, monkeypatch, stage):
    model = tiny_qwen2(num_layers=1)
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 1, model=model, trainer_state={"step": 1}, keep_last=1)
    with monkeypatch.context() as patch:
        _inject_crash(stage, patch, model)
        with pytest.raises(_Killed):
            save_checkpoint(tmp_path, 2, model=model, trainer_state={"step": 2}, keep_last=1)

    survivor = 2 if stage == "pruning" else 1  # pruning happens after `latest` names the new checkpoint
    # `latest` itself names a complete checkpoint (latest_checkpoint's fallback would hide it if it did not).
    assert (root / "latest").read_text() == f"step-{survivor:06d}\n"
    assert checkpoint._problem(root / f"step-{survivor:06d}") is None
    assert latest_checkpoint(tmp_path) == root / f"step-{survivor:06d}"
    assert load_checkpoint(latest_checkpoint(tmp_path), model=tiny_qwen2(num_layers=1)) == {"step": survivor}
    assert [p.name for p in root.iterdir() if ".tmp-" in p.name], "the crash should have left something behind"

    save_checkpoint(tmp_path, 3, model=model, trainer_state={"step": 3}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000003"]


def test_sigkill_mid_write_keeps_the_previous_checkpoint(tmp_path):
    """A real SIGKILL in a child process, from the test hook, between writing the weights and the trainer state (a
    stand-in model keeps the child to a torch import)."""
    save_checkpoint(tmp_path, 1, model=tiny_qwen2(num_layers=1), trainer_state={"step": 1})
    child = textwrap.dedent("""
        import sys
        import torch
        from safetensors.torch import save_file
        from caprl_core.checkpoint import save_checkpoint

        class StandIn:
            def save_pretrained(self, directory):
                save_file({"w": torch.zeros(4)}, f"{directory}/model.safetensors")

        save_checkpoint(sys.argv[1], 2, model=StandIn(), trainer_state={"step": 2})
    """)
    result = subprocess.run([sys.executable, "-c", child, str(tmp_path)], cwd=ROOT, capture_output=True, timeout=60,
                            env={**os.environ, checkpoint.KILL_ENV: "2"})  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    root = tmp_path / "checkpoints"
    (tmp_dir,) = [p for p in root.iterdir() if ".tmp-" in p.name]
    assert (tmp_dir / "model.safetensors").is_file() and not (tmp_dir / "COMPLETE").exists()
    assert (root / "latest").read_text() == "step-000001\n"
    assert latest_checkpoint(tmp_path) == root / "step-000001"
    save_checkpoint(tmp_path, 3, model=tiny_qwen2(num_layers=1), trainer_state={"step": 3})
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    model = tiny_qwen2(num_layers=1)
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model=model, trainer_state={"step": step})
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step-000009\n")
    with pytest.warns(UserWarning, match="step-000009.*does not exist.*using step-000002"):
        assert latest_checkpoint(tmp_path) == root / "step-000002"
    (root / "step-000002" / "COMPLETE").unlink()
    (root / "latest").write_text("step-000002\n")
    with pytest.warns(UserWarning, match="no COMPLETE marker.*using step-000001"):
        assert latest_checkpoint(tmp_path) == root / "step-000001"


def test_missing_or_corrupt_checkpoints_are_named(tmp_path):
    model = tiny_qwen2(num_layers=1)
    missing = tmp_path / "checkpoints" / "step-000042"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_checkpoint(missing, model=model)

    path = save_checkpoint(tmp_path, 0, model=model, trainer_state={})
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100])  # truncated
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*model.safetensors is 100 bytes"):
        load_checkpoint(path, model=model)
    with pytest.warns(UserWarning):
        assert latest_checkpoint(tmp_path) is None

    weights.write_bytes((1 << 60).to_bytes(8, "little") + data[8:])  # same size, header length nonsense
    with pytest.raises(ValueError, match=re.escape(str(weights)) + ": unreadable safetensors"):
        load_checkpoint(path, model=model)

    weights.write_bytes(data)
    (path / "trainer_state" / "state.json").write_text("{not json")
    (path / "COMPLETE").write_text(
        (path / "COMPLETE").read_text().replace('"trainer_state/state.json": 3', '"trainer_state/state.json": 9')
    )
    with pytest.raises(ValueError, match="state.json: corrupt JSON"):
        load_checkpoint(path, model=model)


def test_load_refuses_what_does_not_fit_and_changes_nothing(tmp_path):
    _, optimizer, scheduler = _setup(0)
    path = save_checkpoint(tmp_path, 0, model=tiny_qwen2(), optimizer=optimizer, trainer_state={})
    deeper = tiny_qwen2(num_layers=3, seed=5)
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing \['model.layers.2"):
        load_checkpoint(path, model=deeper)
    assert all(torch.equal(before[k], v) for k, v in deeper.state_dict().items())
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.1"):
        load_checkpoint(path, model=tiny_qwen2(num_layers=1))
    with pytest.raises(ValueError, match=r"shape mismatches \['lm_head.weight"):
        load_checkpoint(path, model=tiny_qwen2(vocab_size=256))

    other = tiny_qwen2(num_layers=1)
    with pytest.raises(ValueError, match="saved optimizer state does not fit"):
        load_checkpoint(path, model=tiny_qwen2(), optimizer=torch.optim.AdamW(other.parameters()))
    with pytest.raises(ValueError, match="has no scheduler state"):
        load_checkpoint(path, model=tiny_qwen2(), scheduler=scheduler)


def test_trainer_state_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 0, model=tiny_qwen2(num_layers=1), trainer_state={"step": object()})
    assert not (tmp_path / "checkpoints").exists()
