"""Dataset format, validation and a synthetic default dataset for CapRL.

A dataset is a JSONL file, one image per line:

    {"image": "images/0001.png",                  # relative to the JSONL file's directory, or absolute
     "questions": [{"question": "What colour is the circle?",
                    "options": ["red", "blue", "green"],
                    "answer": 0},                 # index into options, or a letter "A".."Z" (case-insensitive)
                   ...],
     "caption": "A red circle ...",               # optional: a reference description (demos and tests only)
     "id": "0001"}                                # optional: a string or an int; default "<file stem>:<line>"

Each question has 2 to 8 (`MAX_OPTIONS`) distinct, non-empty options; the reward adds a ninth, "cannot answer".
Blank lines are ignored, other keys are ignored.

`load_jsonl` checks every line before anything trains on it, so a long run never dies halfway on line 90,000.
A bad line (invalid JSON or UTF-8, not an object, a missing or wrong-typed key, no questions, fewer than 2
options, an answer outside the options, a missing or unreadable image, a duplicate id) is reported as
"file:line: what is wrong". With `on_error="skip"` it is dropped and one warning summarises the skipped lines;
with `on_error="raise"` the whole file is scanned first and `DataError` lists every problem at once. A file
with no valid example raises `DataError` either way.

The miniature world's synthetic dataset is written by `caprl_core.world.scenes.make_synthetic_dataset`; the command
line (`python -m caprl_core.data make-synthetic | validate | convert`) is caprl_core/data/__main__.py.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # how an answer may be given in a dataset line ("B")
# The letters the reward gives options: the official CapRL reward server parses the first letter A-I of the reader's
# reply, and the reward appends "cannot be answered from the caption" as the last option, so a question brings at
# most 8 options of its own. The validator and `reward_config.RewardConfig.max_options` both derive from this: every
# dataset that validates can be scored.
REWARD_LETTERS = "ABCDEFGHI"
MAX_OPTIONS = len(REWARD_LETTERS) - 1
NUM_WARNED_ERRORS = 5  # how many messages the skip warning quotes


class DataError(ValueError):
    """A dataset file that cannot be used; `errors` holds every "file:line: ..." message found."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = list(errors or [])


@dataclass(frozen=True, slots=True)
class MCQ:
    """One multiple-choice question: `answer` indexes `options` (0 <= answer < len(options) <= MAX_OPTIONS)."""

    question: str
    options: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"question: expected a non-empty string, got {self.question!r}")
        if not isinstance(self.options, (list, tuple)):
            raise ValueError(f"options: expected a list of strings, got {type(self.options).__name__}")
        object.__setattr__(self, "options", tuple(self.options))
        if not 2 <= len(self.options) <= MAX_OPTIONS:
            raise ValueError(f"options: expected 2 to {MAX_OPTIONS} options, got {len(self.options)}")
        for i, option in enumerate(self.options):
            if not isinstance(option, str) or not option.strip():
                raise ValueError(f"options[{i}]: expected a non-empty string, got {option!r}")
        if len(set(self.options)) != len(self.options):
            raise ValueError(f"options: expected distinct options, got {list(self.options)}")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise ValueError(f"answer: expected an int index, got {type(self.answer).__name__}")
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"answer: index {self.answer} is outside the {len(self.options)} options")


@dataclass(frozen=True, slots=True)
class Example:
    """One image with its question pool. `image` is absolute; `source` is "file:line" for error messages."""

    id: str
    image: Path
    questions: tuple[MCQ, ...]
    caption: str | None
    source: str


@dataclass(slots=True)
class LoadResult:
    """The valid examples of a file, and one "file:line: ..." message per skipped line."""

    examples: list[Example]
    errors: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.errors)


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as RGB, turned upright by its EXIF orientation (phone photos)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def load_jsonl(path: str | os.PathLike, *, on_error: str = "skip", check_images: bool = True) -> LoadResult:
    """Load and validate a dataset file (format in the module docstring).

    on_error: "skip" drops bad lines (listed in `errors`, summarised in one warning); "raise" raises `DataError`
    listing every bad line, after scanning the whole file. check_images: each image must exist and PIL must be
    able to open and verify it (each distinct file is checked once).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error: expected 'skip' or 'raise', got {on_error!r}")
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read dataset file: {e.strerror or e}") from e
    base_dir = path.parent.absolute()
    examples: list[Example] = []
    errors: list[str] = []
    line_of_id: dict[str, int] = {}  # ids of the examples kept so far
    image_problems: dict[Path, str | None] = {}  # cache: many lines may share one image
    num_lines = 0
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
        if not line.strip():
            continue
        num_lines += 1
        example, problems = _parse_line(line, path, lineno, base_dir)
        if example is not None and check_images:
            if example.image not in image_problems:
                image_problems[example.image] = _image_problem(example.image)
            if image_problems[example.image] is not None:
                problems.append(image_problems[example.image])
        if example is not None and example.id in line_of_id:
            problems.append(f"duplicate id {example.id!r} (first on line {line_of_id[example.id]})")
        if problems:
            errors.append(f"{path}:{lineno}: " + "; ".join(problems))
        else:
            examples.append(example)
            line_of_id[example.id] = lineno
    return _finish(path, examples, errors, num_lines, on_error)


def _finish(path: Path, examples: list[Example], errors: list[str], num_lines: int, on_error: str) -> LoadResult:
    if not examples:  # one line: the first problem says what is wrong, `errors` holds them all
        first = f"; {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "") if errors else ""
        raise DataError(f"{path}: no valid examples ({num_lines} non-blank lines){first}", errors)
    if errors and on_error == "raise":
        raise DataError(f"{path}: {len(errors)} of {num_lines} lines are invalid\n" + "\n".join(errors), errors)
    if errors:
        shown = errors[:NUM_WARNED_ERRORS]
        more = len(errors) - len(shown)
        summary = f"{path}: {len(errors)} of {num_lines} lines skipped"
        warnings.warn("\n".join([summary, *shown] + ([f"... and {more} more"] if more else [])), stacklevel=3)
    return LoadResult(examples, errors)


def _parse_line(line: bytes, path: Path, lineno: int, base_dir: Path) -> tuple[Example | None, list[str]]:
    """Parse one non-blank line; returns (example or None, problems found). Images are checked by the caller."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, [f"invalid UTF-8 at byte {e.start}"]
    except (ValueError, RecursionError) as e:
        return None, [f"invalid JSON: {e}"]
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {_json_type(obj)}"]
    problems: list[str] = []
    image = _get(obj, "image", str, problems)
    if isinstance(image, str) and not image.strip():
        problems.append('"image": expected a non-empty path')
    questions = _parse_questions(obj, problems)
    caption = obj.get("caption")
    if caption is not None and not isinstance(caption, str):
        problems.append(f'"caption": expected a string or null, got {_json_type(caption)}')
    example_id = obj.get("id", f"{path.stem}:{lineno}")
    if isinstance(example_id, bool) or not isinstance(example_id, (str, int)):
        problems.append(f'"id": expected a string or an int, got {_json_type(example_id)}')
    if problems:
        return None, problems
    return Example(str(example_id), base_dir / image, tuple(questions), caption, f"{path}:{lineno}"), []


def _parse_questions(obj: dict, problems: list[str]) -> list[MCQ]:
    items = _get(obj, "questions", list, problems)
    if items is None:
        return []
    if not items:
        problems.append('"questions": empty list, expected at least one question')
    questions = []
    for i, item in enumerate(items):
        where = f"questions[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a JSON object, got {_json_type(item)}")
            continue
        item_problems: list[str] = []
        question = _get(item, "question", str, item_problems)
        options = _get(item, "options", list, item_problems)
        answer = _get(item, "answer", (int, str), item_problems)
        if not item_problems:
            try:
                questions.append(MCQ(question, tuple(options), _answer_index(answer, len(options))))
            except ValueError as e:
                item_problems.append(str(e))
        problems.extend(f"{where}: {p}" for p in item_problems)
    return questions


def _answer_index(answer: int | str, num_options: int) -> int:
    """An int index as is; a letter "A".."Z" (any case) as its index. Raises ValueError naming `answer`."""
    if isinstance(answer, int):
        return answer
    letter = answer.strip().upper()
    if len(letter) != 1 or letter not in LETTERS:
        raise ValueError(f'answer: expected an option index or a letter "A".."Z", got {answer!r}')
    index = LETTERS.index(letter)
    if index >= num_options:
        raise ValueError(
            f"answer: letter {letter!r} is beyond the {num_options} options (A-{LETTERS[num_options - 1]})"
        )
    return index


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an int", float: "a number"}


def _get(obj: dict, key: str, types: type | tuple[type, ...], problems: list[str]):
    """obj[key] when present with one of `types` (bool is never an int here); else None and a problem."""
    if key not in obj:
        problems.append(f'missing key "{key}"')
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, types):
        names = " or ".join(_JSON_NAMES[t] for t in (types if isinstance(types, tuple) else (types,)))
        problems.append(f'"{key}": expected {names}, got {_json_type(value)}')
        return None
    return value


def _json_type(value: object) -> str:
    return "null" if value is None else _JSON_NAMES.get(type(value), type(value).__name__)


def _image_problem(image: Path) -> str | None:
    """None when PIL can open and verify `image`, else what is wrong with it."""
    try:
        if not image.is_file():
            return f"image file not found: {image}"
        with Image.open(image) as opened:
            opened.verify()
    # PIL signals broken files with many exception types (UnidentifiedImageError, SyntaxError, struct.error, ...).
    except Exception as e:
        return f"unreadable image {image}: {type(e).__name__}: {e}"
    return None
