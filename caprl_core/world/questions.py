"""Candidate questions for QA curation in the miniature world, with known ground truth: visual ones, which only the
image answers, and leaky ones, which the question and its options answer alone (issue 26). The curation filter
(`python -m caprl_core.curate filter`) should keep the first and drop the second; the world measures it against this
ground truth, and the filtered-against-unfiltered ablation trains on this generator's output.

Every question has 5 to 8 options. A reader that cannot see the image picks the right one of k options with
probability 1/k at best when nothing in the text tells them apart, and the filter drops a question whose text-only
accuracy is 0.25 or more: with 2 to 4 options (`scenes.scene_questions`) even a blind guess would fail the filter.
So the visual kinds are the two of `scene_questions` that have that many answers:

- visual "content": "What is at the top?"; options the right content ("red circle", or "none" for an empty cell)
  and 4 to 7 other contents of the world, drawn uniformly from all the others, so the text says nothing of which.
- visual "colour": "What colour is the shape at the left?" (a cell with a shape); options the 6 colours, or 5.
  (The kind question has 3 answers only: a blind guess gets a third of them, and it is not written.)

Leaky kinds, answerable from the text alone, each in two forms:

- leaky "stated": the answer is said in the question: "The top shows: red circle. What is at the top?" (or "The
  shape at the left is blue. What colour is the shape at the left?"), options as the visual question's.
- leaky "typed": only one option is of the asked type in the world's grammar: "What colour is the shape at the
  right?" with options one colour and 4 to 7 words that are no colour (the kinds, "none", the cells), or "What shape
  is at the bottom?" with one kind and 4 to 7 non-kinds (the colours, "none", the cells). The question text is a
  visual question's; only the options give it away, as impossible distractors do in generated data.

Each question row carries "leaky": true or false (its ground truth) and "kind" (e.g. "visual-content",
"leaky-typed"); the data reader ignores keys it does not know, so `train --data` reads the file as it is.

    python -m caprl_core.world questions --split heldout --out DIR [--num 64] [--leaky-fraction 0.5]
"""

from __future__ import annotations

import random
from pathlib import Path

from caprl_core.data import MAX_OPTIONS, MCQ
from caprl_core.world.scenes import COLOURS, EMPTY, POSITIONS, SHAPES, Scene, cell_contents

MIN_OPTIONS = 5  # fewer and a blind guess passes the filter's text-only bar 0.25 (module docstring)
CONTENTS = [EMPTY, *(f"{c} {k}" for c in COLOURS for k in SHAPES)]
QUESTIONS_PER_IMAGE = 6
DEFAULT_LEAKY_FRACTION = 0.5
# The question-file seeds, one per split, apart from the splits' dataset seeds (`world.SPLIT_SEEDS`) so that the
# candidate files never repeat a dataset file's images by accident (the parts already keep them apart from training).
QUESTION_SEEDS = {"train": 11_000, "heldout": 12_000}


def _options(rng: random.Random, right: str, others: list[str]) -> tuple[tuple[str, ...], int]:
    """`right` and 4 to 7 of `others` (uniformly, at most all of them), shuffled; (options, index of right)."""
    k = rng.randint(MIN_OPTIONS, min(MAX_OPTIONS, 1 + len(others)))
    options = [right, *rng.sample(others, k - 1)]
    rng.shuffle(options)
    return tuple(options), options.index(right)


def visual_question(scene: Scene, rng: random.Random) -> tuple[MCQ, str]:
    """A question only the image answers (module docstring) and its kind ("visual-content" or "visual-colour")."""
    contents = cell_contents(scene)
    cell = rng.choice(POSITIONS)
    content = contents[cell]
    if content != EMPTY and rng.random() < 0.5:
        colour = content.split()[0]
        options, answer = _options(rng, colour, [c for c in COLOURS if c != colour])
        return MCQ(f"What colour is the shape at the {cell}?", options, answer), "visual-colour"
    options, answer = _options(rng, content, [c for c in CONTENTS if c != content])
    return MCQ(f"What is at the {cell}?", options, answer), "visual-content"


def leaky_question(scene: Scene, rng: random.Random) -> tuple[MCQ, str]:
    """A question its own text answers (module docstring) and its kind ("leaky-stated" or "leaky-typed")."""
    contents = cell_contents(scene)
    cell = rng.choice(POSITIONS)
    content = contents[cell]
    shape = content != EMPTY
    if rng.random() < 0.5:  # stated
        if shape and rng.random() < 0.5:
            colour = content.split()[0]
            options, answer = _options(rng, colour, [c for c in COLOURS if c != colour])
            text = f"The shape at the {cell} is {colour}. What colour is the shape at the {cell}?"
        else:
            options, answer = _options(rng, content, [c for c in CONTENTS if c != content])
            text = f"The {cell} shows: {content}. What is at the {cell}?"
        return MCQ(text, options, answer), "leaky-stated"
    # typed: ask about a cell with a shape (a colour or kind question about an empty cell has no right answer)
    cell = rng.choice([s.position for s in scene.shapes])
    colour, kind = contents[cell].split()
    if rng.random() < 0.5:
        options, answer = _options(rng, colour, [*SHAPES, EMPTY, *POSITIONS])
        return MCQ(f"What colour is the shape at the {cell}?", options, answer), "leaky-typed"
    options, answer = _options(rng, kind, [*COLOURS, EMPTY, *POSITIONS])
    return MCQ(f"What shape is at the {cell}?", options, answer), "leaky-typed"


def candidate_questions(
    scene: Scene, rng: random.Random, n: int = QUESTIONS_PER_IMAGE, leaky_fraction: float = DEFAULT_LEAKY_FRACTION
) -> list[dict]:
    """Up to `n` candidate questions about `scene`, no two with the same text, as data rows ({"question", "options",
    "answer", "leaky", "kind"}); each is leaky with probability `leaky_fraction`. (A scene may have fewer than `n`
    question texts of a kind: one shape and no leaky ones gives 5 visual texts.)"""
    if not 0.0 <= leaky_fraction <= 1.0:
        raise ValueError(f"leaky_fraction: expected a number in [0, 1], got {leaky_fraction!r}")
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(50 * n):  # enough draws to find every question text a scene has, in practice
        if len(rows) == n:
            break
        leaky = rng.random() < leaky_fraction
        mcq, kind = (leaky_question if leaky else visual_question)(scene, rng)
        if mcq.question in seen:
            continue
        seen.add(mcq.question)
        rows.append({"question": mcq.question, "options": list(mcq.options), "answer": mcq.answer, "leaky": leaky,
                     "kind": kind})  # fmt: skip
    return rows


def make_question_data(
    out_dir: str | Path, split: str, num_images: int | None = None, *, leaky_fraction: float = DEFAULT_LEAKY_FRACTION,
    questions_per_image: int = QUESTIONS_PER_IMAGE, faint: float = 0.0,
) -> Path:  # fmt: skip
    """Write candidate questions for `split`'s images ("train" or "heldout": scenes of that part of the scene space)
    under out_dir (PNGs + data.jsonl, the project's dataset format, questions with their "leaky" ground truth);
    returns the JSONL path. Deterministic for given arguments; faint fades the shapes (`scenes.draw_scene`) and
    changes nothing else."""
    from caprl_core.world import DEFAULT_SIZES, IMAGE_SIZE
    from caprl_core.world.scenes import make_synthetic_dataset
    from caprl_core.world.splits import sample_scene

    if split not in QUESTION_SEEDS:
        raise ValueError(f"split: expected one of {sorted(QUESTION_SEEDS)}, got {split!r}")
    if not 0.0 <= leaky_fraction <= 1.0:
        raise ValueError(f"leaky_fraction: expected a number in [0, 1], got {leaky_fraction!r}")
    num = DEFAULT_SIZES[split] if num_images is None else num_images
    return make_synthetic_dataset(
        out_dir, num, seed=QUESTION_SEEDS[split], image_size=IMAGE_SIZE, questions_per_image=questions_per_image,
        sample=lambda rng: sample_scene(rng, split),
        questions=lambda scene, rng, n: candidate_questions(scene, rng, n, leaky_fraction), faint=faint,
    )  # fmt: skip


def filter_truth(candidates: str | Path, scores: str | Path) -> dict:
    """How a curation filter's decisions (its NAME.scores.jsonl: every candidate with "kept" and its accuracies, in
    the candidates' order) match the candidates' ground truth ("leaky"): the share of visual questions kept and of
    leaky ones dropped, with the counts and mean accuracies of each group. ValueError naming the file when the two
    files do not list the same questions."""
    import json

    truth = {}
    for line in Path(candidates).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            truth[row["id"]] = [(q["question"], tuple(q["options"]), q["leaky"]) for q in row["questions"]]
    groups: dict[str, list[dict]] = {"visual": [], "leaky": []}
    for line in Path(scores).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        expected = truth.pop(row.get("id"), None)
        if expected is None or len(expected) != len(row["questions"]):
            raise ValueError(
                f"scores: {scores}: image {row.get('id')!r} is not in {candidates} with the same questions"
            )
        for (question, options, leaky), q in zip(expected, row["questions"], strict=True):
            if (q["question"], tuple(q["options"])) != (question, options):
                raise ValueError(f"scores: {scores}: image {row['id']!r} has another question than {candidates}")
            groups["leaky" if leaky else "visual"].append(q)
    if truth:
        raise ValueError(f"scores: {scores} lacks {len(truth)} images of {candidates} (an unfinished filter run?)")
    out: dict = {}
    for name, rows in groups.items():
        n = max(len(rows), 1)
        kept = sum(q["kept"] for q in rows)
        out[name] = {"questions": len(rows), "kept": kept, "dropped": len(rows) - kept,
                     "visual_accuracy": round(sum(q["visual_accuracy"] for q in rows) / n, 4),
                     "text_accuracy": round(sum(q["text_accuracy"] for q in rows) / n, 4)}  # fmt: skip
    out["visual_kept"] = round(out["visual"]["kept"] / max(out["visual"]["questions"], 1), 4)
    out["leaky_dropped"] = round(out["leaky"]["dropped"] / max(out["leaky"]["questions"], 1), 4)
    return out
