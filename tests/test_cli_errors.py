"""Issue 23, cases 7 and 8: what a user gets wrong is one line naming the flag or file, never a traceback or a usage
block, and a run that cannot start leaves no run directory behind. Each test failed on the commit before the fix
(2643b64); the failure is quoted in the issue's closing note."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from caprl_core import eval as eval_cli
from caprl_core import train
from caprl_core.data import load_jsonl

TINY = ["--policy", "tiny-random", "--reader", "tiny-random", "--steps", "1", "--progress", "false"]


def _one_line_error(capsys, flag_or_file: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "usage:" not in err
    assert err.startswith("python -m caprl_core.") and f"error: {flag_or_file}" in err, err
    return err


def test_an_output_dir_that_is_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a run\n")
    assert train.main([*TINY, "--output-dir", str(afile)]) == 2
    assert "exists and is not a directory" in _one_line_error(capsys, "--output-dir")


def test_data_with_no_valid_line_leaves_no_run_directory(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"bad": 1}\n')
    out = tmp_path / "run"
    assert train.main([*TINY, "--data", str(bad), "--output-dir", str(out)]) == 2
    err = _one_line_error(capsys, str(bad))
    assert f"{bad}:1: missing key" in err
    assert not out.exists()


def test_an_unknown_device_names_the_flag(tmp_path, capsys):
    assert train.main([*TINY, "--device", "gpu", "--output-dir", str(tmp_path / "run")]) == 2
    assert "one of auto, cpu, cuda, cuda:N, got 'gpu'" in _one_line_error(capsys, "--device")


def test_cuda_without_a_gpu_blames_the_device_not_the_policy(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main([*TINY, "--device", "cuda", "--output-dir", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys, "--device cuda")
    assert "no CUDA device here" in err and "--policy" not in err
    assert not (tmp_path / "run").exists()


def test_skipped_lines_print_as_a_warning_without_python_source(tmp_path):
    """The skip summary came as `.../data/__init__.py:165: UserWarning: ...` plus the echoed `warnings.warn(...)`
    line; the commands now print `warning: ...`. (Called the way the trainer calls it, from inside caprl_core.)"""
    from caprl_core._cli import plain_warnings
    from caprl_core.config import TrainConfig
    from caprl_core.rl.setup import _load_user_data
    from caprl_core.world.scenes import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", 2, seed=1, questions_per_image=2)
    mixed = data.parent / "mixed.jsonl"  # beside it: image paths are relative to the file
    mixed.write_text(data.read_text() + "not json\n")
    config = TrainConfig()
    config.data.data = str(mixed)
    before = warnings.formatwarning
    try:
        plain_warnings()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert len(_load_user_data(config)) == 2
        (w,) = caught
        text = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, None)
    finally:
        warnings.formatwarning = before
    assert text.startswith(f"warning: {mixed}: 1 of 3 lines skipped\n{mixed}:3: invalid JSON"), text
    assert "UserWarning" not in text and "warnings.warn" not in text
    assert load_jsonl(data).examples  # the API is unchanged: a warning to the caller's code, Python's format


@pytest.mark.parametrize("argv, message", [
    (["--policy", "/no/such/dir"], "--policy: /no/such/dir does not exist"),
    (["--device", "gpu"], "--device: one of cpu, cuda, cuda:N, got 'gpu'"),
])  # fmt: skip
def test_eval_errors_are_one_line_without_the_usage_block(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in _one_line_error(capsys, message.split(":")[0])


def test_eval_details_point_at_images_that_exist(tmp_path):
    """Without --data the world's held-out split was written to a temporary directory, deleted at the end, so
    details.jsonl named images that no longer existed; it now lives in OUT/data."""
    out = tmp_path / "out"
    eval_cli.main(["--policy", "tiny-random", "--reader", "tiny-random", "--out", str(out), "--limit", "2", "--k", "1",
                   "--num-draws", "2", "--max-new-tokens", "4"])  # fmt: skip
    rows = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert Path(row["image"]).is_file() and Path(row["image"]).resolve().is_relative_to(out.resolve()), row
