"""The miniature world's caption grammar: rendering captions, parsing them back into claims, and scoring them.

A scene (`caprl_core.world.scenes.Scene`) has four cells (top, left, right, bottom: the edges of a 3x3 grid), each
empty or holding one shape (a colour and a kind). Its
facts are the four cells' contents. A caption in the grammar is a sequence of statements, one per cell it describes:

    statement:  "<cell>: <colour> <kind>."  or  "<cell>: none."      e.g. "top: red circle. left: none."

`caprl_core.world.scenes.describe` writes the reference caption (every cell, in reading order); `terse_caption` the
start policy's style (the first k cells only). Every fact is said in so many words, empty cells included, so a caption
answers a question about a cell exactly when it has that cell's statement: a terse caption answers fewer questions,
and the reward has something to teach. `parse_caption` reads any text back: each phrase between full stops is a
statement or unparsable. `implied_answer` is what a caption says about a question: the rule the shipped reader is
trained to follow. `fact_scores` compares a caption's claims with the scene (precision: claims that are true;
recall: cells stated correctly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from caprl_core.data import MCQ
from caprl_core.world.scenes import COLOURS, EMPTY, POSITIONS, SHAPES, Scene, Shape, cell_contents, statement

__all__ = [
    "Claims",
    "caption_fact_counts",
    "fact_scores",
    "implied_answer",
    "implied_text",
    "parse_caption",
    "question_kind",
    "reference_scene",
    "terse_caption",
]

_CELL = "|".join(POSITIONS)
_STATEMENT = re.compile(rf"^({_CELL}): (?:({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})|({EMPTY}))$")
# Question texts of `caprl_core.world.scenes.scene_questions`, one pattern per kind; each asks about one cell.
_QUESTIONS = (
    ("content", re.compile(rf"^What is at the ({_CELL})\?$")),
    ("colour", re.compile(rf"^What colour is the shape at the ({_CELL})\?$")),
    ("kind", re.compile(rf"^What shape is at the ({_CELL})\?$")),
)


@dataclass(frozen=True, slots=True)
class Claims:
    """What a caption states: (cell, content) in caption order, content "<colour> <kind>" or "none", and the phrases
    it could not read."""

    statements: tuple[tuple[str, str], ...]
    unparsable: tuple[str, ...]

    @property
    def num_claims(self) -> int:
        return len(self.statements) + len(self.unparsable)

    def content(self, cell: str) -> str | None:
        """What the caption says is in `cell`; None when it says nothing of it, or contradicts itself."""
        said = {content for c, content in self.statements if c == cell}
        return said.pop() if len(said) == 1 else None


def terse_caption(scene: Scene, k: int) -> str:
    """The first `k` cells of `scene` in reading order: "top: red circle. left: none."."""
    if not 1 <= k <= len(POSITIONS):
        raise ValueError(f"k: expected 1 to {len(POSITIONS)}, got {k}")
    contents = cell_contents(scene)
    return " ".join(statement(cell, contents[cell]) for cell in POSITIONS[:k])


def parse_caption(caption: str) -> Claims:
    """The claims of any text. Phrases are split at full stops, lower-cased, spaces collapsed; empty ones ignored."""
    statements, unparsable = [], []
    for phrase in caption.lower().split("."):
        phrase = " ".join(phrase.split())
        if not phrase:
            continue
        if (m := _STATEMENT.match(phrase)) is not None:
            statements.append((m.group(1), m.group(4) or f"{m.group(2)} {m.group(3)}"))
        else:
            unparsable.append(phrase)
    return Claims(tuple(statements), tuple(unparsable))


def fact_scores(claims: Claims, scene: Scene) -> tuple[int, int, int, int]:
    """(true claims, claims, facts stated, facts) of a caption about `scene`. A repeated statement counts once as
    true and again as unsupported; unparsable phrases are unsupported claims. Precision = true / claims, recall =
    stated / facts (micro-average them over many captions: a caption with no claims has no precision)."""
    truth = cell_contents(scene)
    stated = {cell for cell, content in claims.statements if truth[cell] == content}  # cells stated truly, once each
    return len(stated), claims.num_claims, len(stated), len(POSITIONS)


def reference_scene(reference: str | None) -> Scene | None:
    """The scene a reference caption describes when it states every cell once and nothing else, else None: the
    world's datasets carry their facts this way."""
    if reference is None:
        return None
    claims = parse_caption(reference)
    cells = [cell for cell, _ in claims.statements]
    if claims.unparsable or sorted(cells, key=POSITIONS.index) != list(POSITIONS):
        return None
    shapes = []
    for cell in POSITIONS:
        content = claims.content(cell)
        if content != EMPTY:
            colour, kind = content.split()
            shapes.append(Shape(kind, colour, cell))
    try:
        return Scene(tuple(shapes))
    except ValueError:  # no shape at all: not a scene of the world
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


def question_kind(question: str) -> tuple[str, str]:
    """(kind, cell) of a question text of `caprl_core.world.scenes.scene_questions`; ValueError for any other text."""
    for kind, pattern in _QUESTIONS:
        if (m := pattern.match(question)) is not None:
            return kind, m.group(1)
    raise ValueError(f"question: not one of the world's question forms: {question!r}")


def implied_answer(claims: Claims, mcq: MCQ) -> int | None:
    """The option `claims` imply for `mcq` (its index), or None when the caption does not answer it (the reader's
    "cannot be answered"). The caption is taken at its word, right or wrong: an answer the caption implies that is
    not among the options is None too."""
    answer = implied_text(claims, mcq.question)
    return mcq.options.index(answer) if answer in mcq.options else None


def implied_text(claims: Claims, question: str) -> str | None:
    """What `claims` answer to `question`, as an option text, or None when they do not answer it."""
    kind, cell = question_kind(question)
    content = claims.content(cell)
    if content is None or kind == "content":
        return content
    if content == EMPTY:  # a colour or kind question about a cell the caption says is empty: no such option
        return None
    colour, shape = content.split()
    return colour if kind == "colour" else shape
