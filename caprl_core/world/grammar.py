"""The miniature world's caption grammar: rendering captions, parsing them back into claims, and scoring them.

A scene (`caprl_core.data.Scene`) holds 1 to 4 shapes on a 2x2 grid. Its facts are each shape (colour, kind, cell)
and the number of shapes. A caption in the grammar is

    [count clause] item ("," item | " and" item)* "."
    count clause:  "A white image with N shape(s): "
    item:          "a(n) <colour> <kind> in the <cell>"        e.g. "a red circle in the top-left"

`caprl_core.data.describe` writes the reference caption (count clause, every shape); `terse_caption` writes the
start policy's style (the first k shapes in reading order, no count clause). `parse_caption` reads any text back:
every phrase between separators is an item claim, a count claim, or unparsable. `implied_answer` is what a caption
says about a question: the rule the shipped reader is trained to follow. `fact_scores` compares a caption's claims
with the scene's facts (precision: claims that are true; recall: facts that are claimed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from caprl_core.data import COLOURS, MCQ, POSITIONS, SHAPES, Scene, Shape, _noun

__all__ = [
    "Claims",
    "caption_fact_counts",
    "fact_scores",
    "reference_scene",
    "implied_answer",
    "implied_text",
    "parse_caption",
    "question_kind",
    "terse_caption",
]

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_POSITION = "|".join(POSITIONS)
_ITEM = re.compile(rf"^an? ({_COLOUR}) ({_SHAPE}) in the ({_POSITION})$")
_COUNT = re.compile(r"^a white image with (\d+) shapes?$")
# Question texts of `caprl_core.data.scene_questions`, one pattern per kind.
_QUESTIONS = (
    ("count", re.compile(r"^How many shapes are in the image\?$")),
    ("exists", re.compile(rf"^Is there a ({_SHAPE}) in the image\?$")),
    ("cell", re.compile(rf"^What is in the ({_POSITION}) of the image\?$")),
    ("colour_of", re.compile(rf"^What colour is the ({_SHAPE})\?$")),
    ("shape_of", re.compile(rf"^What shape is the ({_COLOUR}) object\?$")),
    ("where", re.compile(rf"^Where is the ({_COLOUR}) ({_SHAPE})\?$")),
)


@dataclass(frozen=True, slots=True)
class Claims:
    """What a caption states: count (None: not stated), items in caption order, and the phrases it could not read."""

    count: int | None
    items: tuple[Shape, ...]
    unparsable: tuple[str, ...]

    @property
    def num_claims(self) -> int:
        return len(self.items) + (self.count is not None) + len(self.unparsable)

    @property
    def complete(self) -> bool:
        """The caption says it lists every shape: a count clause and exactly that many items in distinct cells."""
        cells = [s.position for s in self.items]
        return self.count is not None and len(cells) == self.count and len(set(cells)) == len(cells)


def terse_caption(scene: Scene, k: int) -> str:
    """The first `k` shapes of `scene` in reading order, no count clause: "A red circle in the top-left, a ..."."""
    if not 1 <= k <= len(scene.shapes):
        raise ValueError(f"k: expected 1 to {len(scene.shapes)}, got {k}")
    items = [f"{_noun(s.colour, s.kind)} in the {s.position}" for s in scene.shapes[:k]]
    text = items[0] if k == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return text[0].upper() + text[1:] + "."


def parse_caption(caption: str) -> Claims:
    """The claims of any text. Phrases are split at ":", ",", " and " and ".", lower-cased; empty ones are ignored."""
    count, items, unparsable = None, [], []
    for phrase in re.split(r":|,|\.| and ", caption.lower()):
        phrase = " ".join(phrase.split())
        if not phrase:
            continue
        if (m := _ITEM.match(phrase)) is not None:
            items.append(Shape(m.group(2), m.group(1), m.group(3)))
        elif (m := _COUNT.match(phrase)) is not None and count is None:
            count = int(m.group(1))
        else:
            unparsable.append(phrase)
    return Claims(count, tuple(items), tuple(unparsable))


def fact_scores(claims: Claims, scene: Scene) -> tuple[int, int, int, int]:
    """(true claims, claims, facts stated, facts) of a caption about `scene`. A repeated item counts once as true
    and again as unsupported; unparsable phrases are unsupported claims. Precision = true / claims, recall =
    stated / facts (micro-average them over many captions: a caption with no claims has no precision)."""
    true_items = set(scene.shapes)
    seen: set[Shape] = set()
    true = 0
    for item in claims.items:
        if item in true_items and item not in seen:
            true += 1
            seen.add(item)
    count_right = claims.count == len(scene.shapes)
    true += int(count_right)
    facts = len(scene.shapes) + 1
    return true, claims.num_claims, len(seen) + int(count_right), facts


def reference_scene(reference: str | None) -> Scene | None:
    """The scene a reference caption describes, when it is complete in the grammar (a count clause, that many items in
    distinct cells, nothing unreadable), else None: the world's datasets carry their facts this way."""
    if reference is None:
        return None
    claims = parse_caption(reference)
    if not claims.complete or claims.unparsable:
        return None
    order = sorted(claims.items, key=lambda s: POSITIONS.index(s.position))
    try:
        return Scene(tuple(order))
    except ValueError:
        return None


def caption_fact_counts(captions: list[str], references: list[str | None]) -> tuple[int, int, int, int] | None:
    """Summed `fact_scores` (true claims, claims, facts stated, facts) of captions against their images' reference
    captions; None when some reference is not a complete caption of the grammar (facts unknown)."""
    scenes = [reference_scene(r) for r in references]
    if any(s is None for s in scenes):
        return None
    totals = [0, 0, 0, 0]
    for caption, scene in zip(captions, scenes, strict=True):
        for i, value in enumerate(fact_scores(parse_caption(caption), scene)):
            totals[i] += value
    return tuple(totals)


def question_kind(question: str) -> tuple[str, tuple[str, ...]]:
    """(kind, arguments) of a question text of `caprl_core.data.scene_questions`; ValueError for any other text."""
    for kind, pattern in _QUESTIONS:
        if (m := pattern.match(question)) is not None:
            return kind, m.groups()
    raise ValueError(f"question: not one of the world's question forms: {question!r}")


def implied_answer(claims: Claims, mcq: MCQ) -> int | None:
    """The option `claims` imply for `mcq` (its index), or None when the caption does not answer it (the reader's
    "cannot be answered"). The caption is taken at its word, right or wrong: an answer the caption implies that is
    not among the options is None too."""
    answer = implied_text(claims, mcq.question)
    return mcq.options.index(answer) if answer in mcq.options else None


def implied_text(claims: Claims, question: str) -> str | None:
    """What `claims` answer to `question`, as an option text, or None when they do not answer it. "nothing" and
    "no" need a complete caption (`Claims.complete`)."""
    kind, args = question_kind(question)
    items = claims.items
    answer: str | None = None
    if kind == "count":
        answer = None if claims.count is None else str(claims.count)
    elif kind == "exists":
        answer = "yes" if any(s.kind == args[0] for s in items) else ("no" if claims.complete else None)
    elif kind == "cell":
        here = [s for s in items if s.position == args[0]]
        if len(here) == 1:
            answer = _noun(here[0].colour, here[0].kind)
        elif not here and claims.complete:
            answer = "nothing"
    elif kind == "colour_of":
        answer = _unique([s.colour for s in items if s.kind == args[0]])
    elif kind == "shape_of":
        answer = _unique([s.kind for s in items if s.colour == args[0]])
    else:  # where
        answer = _unique([s.position for s in items if (s.colour, s.kind) == args])
    return answer


def _unique(values: list[str]) -> str | None:
    return values[0] if len(set(values)) == 1 else None
