"""The miniature world's splits are disjoint by construction (issue 25): no scene of the held-out images is in the
trainer's images, the reader's or the policy's training streams or the build's checks, over every split and stream
at the sizes the project uses (DEFAULT_SIZES, BuildConfig's defaults); and the partition behind it
(`caprl_core.world.splits`) gives every part its share of the one-shape scenes.

Run: pytest tests/test_world_splits.py
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from caprl_core.data import load_jsonl
from caprl_core.world import DEFAULT_SIZES, SPLIT_SEEDS, make_world_data
from caprl_core.world.build import BuildConfig, check_draws
from caprl_core.world.grammar import reference_scene
from caprl_core.world.policy import REFERENCE_SHARE, policy_draws
from caprl_core.world.reader import reader_draws
from caprl_core.world.scenes import Scene, describe
from caprl_core.world.splits import PARTS, part_sizes, sample_scene, scene_part

CHUNK = 50  # batches per reader draw (train_reader's default chunk)


def dataset_scenes(tmp_path, split: str) -> list[Scene]:
    jsonl = make_world_data(tmp_path / split, split)
    return [reference_scene(ex.caption) for ex in load_jsonl(jsonl).examples]


def reader_scenes(config: BuildConfig) -> list[Scene]:
    rng, scenes = random.Random(SPLIT_SEEDS["reader"] + config.seed), []
    total = config.reader_steps * config.reader_batch
    while len(scenes) < total:
        scenes += reader_draws(rng, config.reader_batch * CHUNK)[0]
    return scenes


def policy_scenes(config: BuildConfig) -> list[Scene]:
    rng, scenes = random.Random(SPLIT_SEEDS["policy"] + config.seed), []
    for step in range(config.policy_steps):
        scenes += policy_draws(rng, config.policy_batch, terse=step >= REFERENCE_SHARE * config.policy_steps)[0]
    return scenes


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, list[Scene]]:
    """Every split and stream's scenes at the project's sizes, by the part it should draw from."""
    tmp = tmp_path_factory.mktemp("splits")
    config = BuildConfig()
    checks = check_draws("reader_eval", config.eval_pairs)[1] + check_draws("policy_eval", config.eval_images)[1]
    return {"train": dataset_scenes(tmp, "train"), "heldout": dataset_scenes(tmp, "heldout"),
            "reader": reader_scenes(config), "policy": policy_scenes(config), "check": checks}  # fmt: skip


def test_project_sizes_are_the_ones_measured(streams):
    assert len(streams["train"]) == DEFAULT_SIZES["train"] == 256
    assert len(streams["heldout"]) == DEFAULT_SIZES["heldout"] == 64
    assert len(streams["reader"]) >= 2500 * 32 and len(streams["policy"]) == 450 * 32


def test_no_scene_crosses_a_boundary(streams):
    seen = {name: {describe(s) for s in scenes} for name, scenes in streams.items()}
    shared = {f"{a} & {b}": len(seen[a] & seen[b]) for a in seen for b in seen if a < b and seen[a] & seen[b]}
    assert shared == {}, f"scenes in two splits or streams: {shared}"


def test_every_stream_draws_from_its_own_part(streams):
    for name, scenes in streams.items():
        assert Counter(scene_part(s) for s in scenes).keys() == {name}, name


def test_one_shape_scenes_are_dealt_exactly_by_weight():
    sizes = part_sizes(1)
    assert sizes == {part: round(72 * weight) for part, weight in PARTS.items()} == {
        "train": 24, "heldout": 12, "reader": 12, "policy": 12, "check": 12}  # fmt: skip
    for part, count in part_sizes(2).items():  # 1,944 scenes: by hash, near the weights
        assert abs(count / 1944 - PARTS[part]) < 0.03, part


@pytest.mark.parametrize("part", list(PARTS))
def test_a_part_keeps_the_scene_distribution(part):
    """Rejection sampling keeps synthetic_scene's mix: 1 to 4 shapes, a quarter each."""
    rng = random.Random(0)
    counts = Counter(len(sample_scene(rng, part).shapes) for _ in range(4000))
    assert all(abs(counts[k] / 4000 - 0.25) < 0.03 for k in (1, 2, 3, 4)), counts


def test_sample_scene_names_an_unknown_part():
    with pytest.raises(ValueError, match="part"):
        sample_scene(random.Random(0), "test")
