"""Issue 23, case 4: the defaults follow the model. A checkpoint of a miniature-world run keeps the world's defaults
(batch sizes, reward, lr 1e-4, 40 steps) and its reader and data; any other model gets the recipe's; --print-config
says which and why. Before the fix any --policy switched to the recipe: "keep training my world checkpoint" ran 200
steps at lr 1e-6 and needed --reader and --data."""

from __future__ import annotations

import json

import pytest

from caprl_core import train
from caprl_core.config import WORLD_DEFAULTS, TrainConfig, policy_defaults
from caprl_core.config_cli import parse_config


def _checkpoint(path, trainer_state: dict):
    (path / "trainer_state").mkdir(parents=True)
    (path / "trainer_state" / "state.json").write_text(json.dumps(trainer_state))
    (path / "config.json").write_text("{}\n")
    return path


def _is_world(config: TrainConfig) -> bool:
    return config.optim.lr == WORLD_DEFAULTS["lr"] and config.steps == WORLD_DEFAULTS["steps"]


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """One real step of the default world run, checkpointed: what a user trains on from."""
    out = tmp_path_factory.mktemp("world-run")
    assert train.main(["--output-dir", str(out), "--steps", "1", "--images-per-step", "2", "--group-size", "2",
                       "--max-new-tokens", "8", "--progress", "false"]) == 0  # fmt: skip
    return out


def test_a_world_checkpoint_keeps_the_worlds_defaults(world_run):
    state = json.loads((world_run / "checkpoints" / "step-000000" / "trainer_state" / "state.json").read_text())
    assert state["policy_defaults"] == "world"
    for policy in (world_run / "checkpoints" / "step-000000", world_run / "checkpoints" / "latest"):
        config, _ = parse_config(["--policy", str(policy)])  # no --reader or --data needed: the world's
        assert _is_world(config) and config.model.reader is None and config.data.data is None


def test_a_checkpoint_written_before_the_marker_is_followed_to_its_policy(tmp_path):
    old = _checkpoint(tmp_path / "old", {"step": 3, "config": {"model": {"policy": None}}})
    assert policy_defaults(str(old))[0] == "world"
    chained = _checkpoint(tmp_path / "chained", {"step": 1, "config": {"model": {"policy": str(old)}}})
    assert policy_defaults(str(chained))[0] == "world"


@pytest.mark.parametrize("state", [
    {"step": 3, "policy_defaults": "recipe", "config": {"model": {"policy": None}}},
    {"step": 3, "config": {"model": {"policy": "tiny-random"}}},
    "no state",
])  # fmt: skip
def test_other_models_get_the_recipes_defaults(state, tmp_path):
    path = tmp_path / "model"
    if state == "no state":
        path.mkdir()
        (path / "config.json").write_text("{}\n")
    else:
        _checkpoint(path, state)
    kind, why = policy_defaults(str(path))
    assert kind == "recipe" and str(path) in why
    config, _ = parse_config(["--policy", str(path), "--reader", str(path), "--data", str(path / "config.json")])
    assert config.optim.lr == TrainConfig().optim.lr and config.steps == TrainConfig().steps


def test_print_config_says_which_defaults_and_why(world_run, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--policy", str(world_run / "checkpoints" / "latest"), "--print-config"])
    out, err = capsys.readouterr()
    assert json.loads(out)["optim"]["lr"] == WORLD_DEFAULTS["lr"]
    assert err.startswith("# defaults: world (--policy ") and "checkpoint of a miniature-world run" in err
    with pytest.raises(SystemExit):
        parse_config(["--print-config"])
    assert capsys.readouterr().err.startswith("# defaults: world (no --policy")
