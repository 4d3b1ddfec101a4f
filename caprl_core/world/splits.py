"""The miniature world's scene space, partitioned: every scene belongs to exactly one part (`PARTS`: the trainer's
images, the held-out images, the reader's training stream, the start policy's training stream, the build's checks),
and each split or stream draws only scenes of its part (`sample_scene`), so a held-out scene never appears in
training, in the reader's or in the policy's streams, by construction. Splits used to be disjoint "by seed" only,
which is no guarantee: with one-shape scenes (72 of them) a quarter of all draws, 10 of the 64 held-out images were
byte-identical to training images (8 scenes), 23 held-out images (21 scenes) were in the policy's training stream and
36 (34 scenes) in the reader's (issue 25; tests/test_world_splits.py).

A scene's part is fixed by a stable hash of its canonical form, its reference caption (`scenes.describe`): SHA-256,
not Python's `hash()`, which is salted per process. The key, a number in [0, 1), picks the part by the cumulative
`PARTS` weights. Within a part the scene distribution is `synthetic_scene`'s, conditioned on the part (rejection
sampling), so each part keeps the same mix of 1, 2, 3 and 4 shapes.

The one-shape scenes are few (72: 4 cells x 6 colours x 3 kinds), and hashing them straight would share them out
unevenly (with these weights the policy's part would get 16 where its share is 12, two parts 10). So their key is
their rank by hash among the 72, over 72: they are dealt exactly by weight, 24 to train and 12 to each other part,
and every part keeps one-shape scenes in its quarter of draws. The larger strata (1,944 two-shape scenes and up)
follow the weights to within a few percent by hash alone.

    python -c "from caprl_core.world.splits import part_sizes; print(part_sizes(1))"   # {'train': 24, ...}
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random

from caprl_core.world.scenes import COLOURS, POSITIONS, SHAPES, Scene, Shape, describe, synthetic_scene

# The parts and their shares of the scene space. Train gets the most (its 256 images should see the most variety);
# the others a sixth each, which the 72 one-shape scenes divide exactly (24 / 12 / 12 / 12 / 12). "check" holds the
# scenes the build measures the reader and the policy on (card.json).
PARTS = {"train": 1 / 3, "heldout": 1 / 6, "reader": 1 / 6, "policy": 1 / 6, "check": 1 / 6}


def scene_hash(scene: Scene) -> float:
    """A stable number in [0, 1) for `scene`: the first 8 bytes of the SHA-256 of its reference caption."""
    digest = hashlib.sha256(describe(scene).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def all_scenes(num_shapes: int) -> list[Scene]:
    """Every scene with `num_shapes` shapes, in a fixed order."""
    scenes = []
    for cells in itertools.combinations(POSITIONS, num_shapes):
        for looks in itertools.product(itertools.product(SHAPES, COLOURS), repeat=num_shapes):
            shapes = (Shape(kind, colour, cell) for cell, (kind, colour) in zip(cells, looks, strict=True))
            scenes.append(Scene(tuple(shapes)))
    return scenes


@functools.cache
def _one_shape_keys() -> dict[Scene, float]:
    ranked = sorted(all_scenes(1), key=lambda s: (scene_hash(s), describe(s)))
    return {scene: rank / len(ranked) for rank, scene in enumerate(ranked)}


def scene_key(scene: Scene) -> float:
    """The number in [0, 1) that places `scene` in a part: its rank among the one-shape scenes for those (so that
    they divide exactly by weight), else `scene_hash`."""
    if len(scene.shapes) == 1:
        return _one_shape_keys()[scene]
    return scene_hash(scene)


def scene_part(scene: Scene) -> str:
    """The part `scene` belongs to (a key of PARTS)."""
    key, upper = scene_key(scene), 0.0
    for part, weight in PARTS.items():
        upper += weight
        if key < upper:
            return part
    return part  # key within float rounding of 1.0: the last part


def sample_scene(rng: random.Random, part: str) -> Scene:
    """A scene of `part` from `synthetic_scene`'s distribution conditioned on the part (rejection sampling)."""
    if part not in PARTS:
        raise ValueError(f"part: expected one of {list(PARTS)}, got {part!r}")
    while True:
        scene = synthetic_scene(rng)
        if scene_part(scene) == part:
            return scene


def part_sizes(num_shapes: int) -> dict[str, int]:
    """How many scenes with `num_shapes` shapes each part holds."""
    sizes = dict.fromkeys(PARTS, 0)
    for scene in all_scenes(num_shapes):
        sizes[scene_part(scene)] += 1
    return sizes
