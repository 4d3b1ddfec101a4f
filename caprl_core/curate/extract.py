"""Parsing the question generator's output: multiple-choice questions in the official CapRL markdown format.

    #### 1. **What colour is the bus?**
    - A) Red
    - B) Blue
    - C) Green
    - D) Yellow
    **Answer:** B) Blue

A block starts at a `#### N.` heading and runs to the next heading (or the end of the text). Text outside the blocks
(an introduction, a closing remark) is tolerated and ignored. A malformed block is skipped and counted by reason,
never repaired by guessing:

- missing_answer: a block (not the last one) without an `**Answer:**` line.
- truncated: the last block ends before its answer line (the generator stopped mid-block: max tokens).
- no_question: a heading without question text.
- option_labels: the options' letters do not run A, B, C, ... in order, or an option is empty.
- option_count: fewer than MIN_OPTIONS or more than MAX_OPTIONS options (the prompt asks for four; five or six are
  tolerated, since a model sometimes adds one and the question is still sound; three or seven are dropped).
- duplicate_options: two options with the same text (case and spacing ignored).
- answer_outside_options: the answer's letter names no option (E for four options), or is not one letter.
- answer_mismatch: the answer line repeats an option text that is not its letter's option ("B) Red" when B is Blue).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from caprl_core.data import LETTERS, MCQ

MIN_OPTIONS, MAX_OPTIONS = 4, 6
REASONS = ("missing_answer", "truncated", "no_question", "option_labels", "option_count", "duplicate_options",
           "answer_outside_options", "answer_mismatch")  # fmt: skip

_HEADING = re.compile(r"^\s*#{2,6}\s*(\d+)[.)]?\s*(.*)$")
_OPTION = re.compile(r"^\s*[-*]\s*\(?([A-Za-z])[).:]\s*(.*)$")
_ANSWER = re.compile(r"^\s*\**\s*Answer\s*:?\s*\**\s*:?\s*(.*)$", re.IGNORECASE)
_ANSWER_LETTER = re.compile(r"^\(?([A-Za-z])(?:[).:](?:\s*(.*))?)?\s*$")


@dataclass(slots=True)
class Extraction:
    """The well-formed questions of one output, and the blocks dropped, counted by reason."""

    questions: list[MCQ] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    @property
    def num_blocks(self) -> int:
        return len(self.questions) + sum(self.dropped.values())


def extract_questions(text: str) -> Extraction:
    """Parse `text` (format and reasons in the module docstring)."""
    out = Extraction()
    blocks = _blocks(text)
    for i, block in enumerate(blocks):
        parsed = _parse_block(block, last=i == len(blocks) - 1)
        if isinstance(parsed, MCQ):
            out.questions.append(parsed)
        else:
            out.dropped[parsed] += 1
    return out


def _blocks(text: str) -> list[list[str]]:
    """The lines of each block, its heading first; lines before the first heading are prose, ignored."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if _HEADING.match(line):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    return blocks


def _parse_block(lines: list[str], *, last: bool) -> MCQ | str:
    """The block's question, or the reason it is dropped."""
    question = _strip_emphasis(_HEADING.match(lines[0]).group(2))
    options: list[tuple[str, str]] = []
    answer = None
    for line in lines[1:]:
        if answer is None and (m := _ANSWER.match(line)):
            answer = m.group(1).strip()
        elif answer is None and (m := _OPTION.match(line)):
            options.append((m.group(1), m.group(2).strip()))
    if answer is None:
        return "truncated" if last else "missing_answer"
    if not question:
        return "no_question"
    texts = [_strip_emphasis(t) for _, t in options]
    if [letter for letter, _ in options] != list(LETTERS[: len(options)]) or not all(texts):
        return "option_labels"
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        return "option_count"
    if len({_norm(t) for t in texts}) != len(texts):
        return "duplicate_options"
    return _with_answer(question, texts, answer)


def _with_answer(question: str, texts: list[str], answer: str) -> MCQ | str:
    m = _ANSWER_LETTER.match(_strip_emphasis(answer))
    if m is None or m.group(1).upper() not in LETTERS[: len(texts)] or not m.group(1).isupper():
        return "answer_outside_options"
    index = LETTERS.index(m.group(1))
    said = m.group(2)
    if said and _norm(_strip_emphasis(said)) != _norm(texts[index]):
        return "answer_mismatch"
    return MCQ(question, tuple(texts), index)


def _strip_emphasis(text: str) -> str:
    return text.strip().strip("*_").strip()


def _norm(text: str) -> str:
    return " ".join(text.split()).rstrip(".").casefold()
