"""The miniature world's scenes: coloured shapes at the edge cells of a 3x3 grid, their exact reference caption, the
questions only the image (or that caption) answers, their images, and `make_synthetic_dataset`, which writes them in
the dataset format of caprl_core.data: the default data of `python -m caprl_core.train` and `eval`, and the tests'
fixture.

    python -m caprl_core.data make-synthetic --out DIR [--num 32] [--seed 0]
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from caprl_core.data import MCQ

COLOURS = {
    "red": (220, 40, 40), "green": (40, 160, 70), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (130, 60, 170), "orange": (245, 135, 25),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
# The cells a shape may fill: the middles of the edges of a 3x3 grid ("plus" layout), in reading order. One word each,
# so that a cell is one token of the world's tokenizer; with 84-px images each cell is one 28-px merged patch group,
# one image token of the policy (`caprl_core.world`).
POSITIONS = ("top", "left", "right", "bottom")
GRID_CELLS = {"top": (0, 1), "left": (1, 0), "right": (1, 2), "bottom": (2, 1)}  # (row, column) in the 3x3 grid
EMPTY = "none"  # what the grammar says of an empty cell
# Each cell's background, a grey of its own: the policy's vision tower (Qwen2.5-VL) has no absolute position embedding,
# only rotary attention, so without it an image token knows what its cell holds but not which cell it is, and the
# language model would have to find "the token at row 0, column 1" through M-RoPE offsets that shift with the caption.
# With it, the caption's "top" can look up its token by content, as a reader looks up a statement.
CELL_SHADES = {"top": (238, 238, 238), "left": (212, 212, 212), "right": (186, 186, 186), "bottom": (160, 160, 160)}


@dataclass(frozen=True, slots=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS
    position: str  # one of POSITIONS: the grid cell it fills


@dataclass(frozen=True, slots=True)
class Scene:
    """1 to 4 shapes, each in its own cell, listed in POSITIONS order."""

    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.shapes) <= len(POSITIONS):
            raise ValueError(f"shapes: expected 1 to {len(POSITIONS)} shapes, got {len(self.shapes)}")
        positions = [s.position for s in self.shapes]
        if positions != [p for p in POSITIONS if p in positions]:
            raise ValueError(f"shapes: expected distinct positions in {POSITIONS} order, got {positions}")
        for s in self.shapes:
            if s.kind not in SHAPES or s.colour not in COLOURS:
                raise ValueError(f"shapes: unknown kind or colour in {s}")


def synthetic_scene(rng: random.Random) -> Scene:
    """A random scene: 1-4 shapes of random kind and colour in distinct cells."""
    positions = sorted(rng.sample(POSITIONS, rng.randint(1, len(POSITIONS))), key=POSITIONS.index)
    return Scene(tuple(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), p) for p in positions))


def cell_contents(scene: Scene) -> dict[str, str]:
    """Each cell's content in POSITIONS order: "<colour> <kind>", or EMPTY."""
    by_cell = {s.position: f"{s.colour} {s.kind}" for s in scene.shapes}
    return {cell: by_cell.get(cell, EMPTY) for cell in POSITIONS}


def statement(cell: str, content: str) -> str:
    """One statement of the caption grammar: "top: red circle." (`caprl_core.world.grammar`)."""
    return f"{cell}: {content}."


def describe(scene: Scene) -> str:
    """The exact reference caption: every cell's content in reading order, empty cells included, so every question
    is answerable: "top: red circle. left: none. right: blue square. bottom: none."."""
    return " ".join(statement(cell, content) for cell, content in cell_contents(scene).items())


def scene_questions(scene: Scene, rng: random.Random, n: int) -> list[MCQ]:
    """Up to `n` distinct MCQs about `scene` (every scene has at least 6), each with 2-4 options in random order.

    Kinds, each about one cell: what is in it ("none" for an empty one), and for a cell with a shape its colour and
    its kind.
    """
    candidates = _question_candidates(scene)  # (question, right option, wrong options) in a fixed order
    rng.shuffle(candidates)
    questions = []
    for question, right, wrong in candidates[:n]:
        num_options = rng.randint(2, min(4, 1 + len(wrong)))
        options = [right, *rng.sample(wrong, num_options - 1)]
        rng.shuffle(options)
        questions.append(MCQ(question, tuple(options), options.index(right)))
    return questions


def _question_candidates(scene: Scene) -> list[tuple[str, str, list[str]]]:
    # Lists and dicts only (no sets): iteration order must not depend on the string hash seed.
    contents = cell_contents(scene)
    # Distractors for "what is in the <cell>": the scene's other contents first (the hard ones), then any shape.
    names = [*contents.values(), EMPTY, *(f"{c} {k}" for c in COLOURS for k in SHAPES)]
    names = list(dict.fromkeys(names))
    candidates = []
    for cell, content in contents.items():
        candidates.append((f"What is at the {cell}?", content, [x for x in names if x != content][:6]))
        if content != EMPTY:
            colour, kind = content.split()
            candidates.append((f"What colour is the shape at the {cell}?", colour, [c for c in COLOURS if c != colour]))
            candidates.append((f"What shape is at the {cell}?", kind, [k for k in SHAPES if k != kind]))
    return candidates


def draw_scene(scene: Scene, image_size: int = 84, faint: float = 0.0) -> Image.Image:
    """The scene as an RGB image [image_size, image_size] on white; each of the four cells of the 3x3 grid is shaded
    its CELL_SHADES grey, and each shape fills its cell less a margin. faint in [0, 1): each shape's colour moved that
    far towards its cell's grey (0: as always; near 1: barely there), for facts that are hard to see."""
    if not 0 <= faint < 1:
        raise ValueError(f"faint: expected a fraction in [0, 1), got {faint}")
    image = Image.new("RGB", (image_size, image_size), "white")
    draw = ImageDraw.Draw(image)
    cell = image_size // 3
    margin = max(2, cell // 8)
    for position, (row, col) in GRID_CELLS.items():
        draw.rectangle((col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1), fill=CELL_SHADES[position])
    for s in scene.shapes:
        row, col = GRID_CELLS[s.position]
        x0, y0 = col * cell + margin, row * cell + margin
        x1, y1 = (col + 1) * cell - 1 - margin, (row + 1) * cell - 1 - margin
        fill = tuple(
            round(c + faint * (g - c)) for c, g in zip(COLOURS[s.colour], CELL_SHADES[s.position], strict=True)
        )
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle, apex up
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def make_synthetic_dataset(
    out_dir: str | os.PathLike, num_images: int = 32, *, seed: int = 0, image_size: int = 84,
    questions_per_image: int = 6, sample: Callable[[random.Random], Scene] = synthetic_scene,
    questions: Callable[[Scene, random.Random, int], list[dict]] | None = None, faint: float = 0.0,
) -> Path:  # fmt: skip
    """Write `num_images` PNGs under out_dir/images and out_dir/data.jsonl (relative paths); return the JSONL path.
    `sample` draws each scene (the world's splits pass one that keeps to their part: `world.splits.sample_scene`);
    `questions(scene, rng, n)` writes each image's question rows (default: `scene_questions`; the curation candidates
    of `world.questions` pass theirs, with extra keys); faint: `draw_scene`'s.

    Deterministic: the same arguments give the same JSONL text and the same PNG bytes.
    """
    if num_images < 1:
        raise ValueError(f"num_images: expected >= 1, got {num_images}")
    if image_size < 16:
        raise ValueError(f"image_size: expected >= 16 pixels, got {image_size}")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image: expected >= 1, got {questions_per_image}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(num_images):
        scene = sample(rng)
        if questions is None:
            rows = [{"question": q.question, "options": list(q.options), "answer": q.answer}
                    for q in scene_questions(scene, rng, questions_per_image)]  # fmt: skip
        else:
            rows = questions(scene, rng, questions_per_image)
        image = f"images/{i:05d}.png"
        draw_scene(scene, image_size, faint).save(out_dir / image)
        record = {
            "id": f"synthetic-{seed}-{i:05d}",
            "image": image,
            "caption": describe(scene),
            "questions": rows,
        }
        lines.append(json.dumps(record) + "\n")
    jsonl = out_dir / "data.jsonl"
    jsonl.write_text("".join(lines), encoding="utf-8")
    return jsonl
