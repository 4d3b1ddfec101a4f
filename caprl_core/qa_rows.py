"""One strict parser for the questions of the released CapRL QA rows, shared by `caprl_core.convert`, the TRL reward
(`CapRLReward.as_trl_reward`) and the verl adapter (`caprl_core.integrations.verl`).

A released question is {"question", "choices": ["A. ...", ...], "answer": "B"}; this project's is {"question",
"options": [...], "answer": index or letter}. The rules, so that nothing is relabelled silently:
- The answer is exactly one capital letter, optionally followed by ")" or "." and the option's text ("B", "B)",
  "B.", "B) Blue"); the text, when given, must be that option's. Anything else ("", "BC", "B text", "b") is a bad
  question, not a guess.
- Choices count as labelled only when every one carries a label ("A. ", "A) ", "A: ", "(A) ", followed by a space)
  and the labels run A, B, C, ... in order; then the labels are removed. Otherwise the choices are kept as they are
  ("U.S." stays "U.S.").
- A "can not answer" choice is dropped (the reward appends its own); an answer pointing at it is a bad question.
A bad question is a ValueError saying what is wrong; callers report it as file:row:question (convert) or
row:question (the adapters) and keep the row's good questions.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from caprl_core.data import LETTERS, MCQ

__all__ = ["parse_question", "good_questions"]

# The reward appends this option itself (the recipe's wording, and variants seen in QA files).
CANNOT_ANSWER = re.compile(r"^\s*can\s*not\s+answer\b|^\s*cannot\s+answer\b", re.IGNORECASE)
# "A. text", "A) text", "A: text", "(A) text": a label, then whitespace, then the text.
_LABEL = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):])\s+(\S.*)$", re.DOTALL)
# "B", "B)", "B.", "B) text", "B. text"
_ANSWER = re.compile(r"^\s*([A-Z])(?:[.)](?:\s+(\S.*?))?)?\s*$", re.DOTALL)


def parse_question(item: object) -> MCQ:
    """One released ({"question", "choices", "answer"}) or project ({"question", "options", "answer"}) question as an
    MCQ, its "can not answer" choice dropped; ValueError saying what is wrong (see the module docstring)."""
    if isinstance(item, MCQ):
        return item
    if not isinstance(item, dict):
        raise ValueError(f"expected an object, got {type(item).__name__}")
    key = "choices" if "choices" in item and "options" not in item else "options"
    choices = item.get(key)
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f'"{key}": expected a list of strings, got {type(choices).__name__}')
    released = key == "choices"
    texts = unlabelled(list(choices)) if released else [c.strip() for c in choices]
    index = answer_index(item.get("answer"), texts, allow_index=not released)
    if CANNOT_ANSWER.match(texts[index]):
        raise ValueError(f'"answer": {item.get("answer")!r} is the "can not answer" choice')
    keep = [i for i, text in enumerate(texts) if not CANNOT_ANSWER.match(text)]
    return MCQ(item.get("question"), tuple(texts[i] for i in keep), keep.index(index))  # checks question and count


def unlabelled(choices: list[str]) -> list[str]:
    """The choices' texts: labels removed when every choice carries one and they run A, B, C, ...; as given when some
    choice carries none ("U.S."); ValueError when every choice is labelled but out of order (the answer's letter
    would then name another choice than its label says)."""
    matches = [_LABEL.match(c) for c in choices]
    if not choices or not all(matches):
        return [c.strip() for c in choices]
    for i, m in enumerate(matches):
        label = m.group(1) or m.group(2)
        if label != LETTERS[i]:
            raise ValueError(f'"choices"[{i}]: labelled {label!r}, expected {LETTERS[i]!r}: {choices[i]!r}')
    return [m.group(3).strip() for m in matches]


def answer_index(answer: object, texts: list[str], *, allow_index: bool = False) -> int:
    """The index an answer names: one letter optionally followed by ")" / "." and that option's text, or (project
    rows, allow_index) an int index."""
    if allow_index and isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(texts):
            raise ValueError(f'"answer": index {answer} is outside the {len(texts)} choices')
        return answer
    match = _ANSWER.match(answer) if isinstance(answer, str) else None
    if match is None:
        raise ValueError(f'"answer": expected one letter, optionally followed by ")" or "." and the option text, '
                         f"got {answer!r}")  # fmt: skip
    index = LETTERS.index(match.group(1))
    if index >= len(texts):
        raise ValueError(f'"answer": {answer!r} is not one of the {len(texts)} choices')
    text = match.group(2)
    if text is not None and _norm(text) != _norm(texts[index]):
        raise ValueError(f'"answer": {answer!r} names option {match.group(1)}, whose text is {texts[index]!r}')
    return index


def _norm(text: str) -> str:
    return " ".join(text.split()).rstrip(".").casefold()


def good_questions(items: Iterable[object], where: str) -> list[MCQ]:
    """The good questions of one row; one warning naming `where`:question (from 1) for each bad one. ValueError when
    none is good."""
    good, bad = [], []
    for q, item in enumerate(items, start=1):
        try:
            good.append(parse_question(item))
        except ValueError as e:
            bad.append(f"{where}:{q}: {e}")
    if not good:
        raise ValueError(f"{where}: no good question: " + "; ".join(bad))
    if bad:
        warnings.warn("bad questions left out: " + "; ".join(bad), stacklevel=3)
    return good
