"""`python -m caprl_core.caption`: captions from a policy directory (the shipped start policy, a checkpoint, or a
run's checkpoints/latest), n per image, greedy at T = 0; each bad argument a one-line error with exit status 2.

Run: pytest tests/test_caption.py
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest

from caprl_core import caption
from caprl_core.policy import shipped_dir
from caprl_core.world.scenes import draw_scene, synthetic_scene


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(2):
        path = tmp_path / f"scene-{i}.png"
        draw_scene(synthetic_scene(random.Random(i))).save(path)
        paths.append(str(path))
    return paths


def test_captions_from_the_shipped_policy_as_json_lines(images, capsys):
    assert caption.main([*images, "--n", "2", "--json", "--max-new-tokens", "24"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == images
    assert all(len(r["captions"]) == 2 and all(c.strip() for c in r["captions"]) for r in rows)


def test_checkpoints_latest_is_a_policy_and_greedy_is_deterministic(images, tmp_path, capsys):
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(shipped_dir("policy"), checkpoints / "step-000003")
    (checkpoints / "latest").write_text("step-000003\n")
    args = [images[0], "--temperature", "0", "--max-new-tokens", "24"]
    assert caption.main([*args, "--policy", str(checkpoints / "latest")]) == 0
    from_latest = capsys.readouterr().out
    assert caption.main([*args, "--policy", str(checkpoints / "step-000003")]) == 0
    assert capsys.readouterr().out == from_latest and from_latest.splitlines()[1].strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0"], "--n: expected an integer >= 1, got 0"),
        (["--temperature", "-1"], "--temperature: expected >= 0"),
        (["--top-p", "0"], "--top-p: expected a number in (0, 1]"),
        (["--policy", "no/such/dir"], "policy no/such/dir: no such directory"),
    ],
)
def test_bad_arguments_are_one_line_errors(images, args, message, capsys):
    assert caption.main([images[0], *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_bad_images_are_one_line_errors(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert caption.main([str(tmp_path / "missing.png")]) == 2
    assert "IMAGE " in capsys.readouterr().err
    assert caption.main([str(text)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"IMAGE {text}: cannot read it as an image" in err


def test_the_command_runs_as_a_module(images):
    result = subprocess.run([sys.executable, "-m", "caprl_core.caption", images[0], "--max-new-tokens", "16"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == images[0] and result.stdout.splitlines()[1].strip()
