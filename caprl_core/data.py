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

`make_synthetic_dataset` writes coloured shapes at the four edge cells of a 3x3 grid with MCQs that need the image to
answer and an exact reference caption (the miniature world's, `caprl_core.world`): the default data of
`python -m caprl_core.train` and `eval`, and the tests' fixture.

Command line:

    python -m caprl_core.data make-synthetic --out DIR [--num 32] [--seed 0]
    python -m caprl_core.data validate FILE [--strict] [--no-check-images]
    python -m caprl_core.data convert IN OUT [--image-root DIR] [--strict] [--no-check-images]

`convert` turns the official CapRL QA files (verl-style parquet or JSONL rows) into this format
(`caprl_core.convert`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # how an answer may be given in a dataset line ("B")
# The letters the reward gives options: the official CapRL reward server parses the first letter A-I of the reader's
# reply, and the reward appends "cannot be answered from the caption" as the last option, so a question brings at
# most 8 options of its own. The validator and `reward.RewardConfig.max_options` both derive from this: every
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
    if not examples:
        detail = "\n".join(errors)
        raise DataError(
            f"{path}: no valid examples ({num_lines} non-blank lines)" + (f"\n{detail}" if detail else ""), errors
        )
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


# ---------------------------------------------------------------------------------------------------------------
# Synthetic dataset: coloured shapes at the edge cells of a 3x3 grid, with questions only the image (or an exact
# caption) answers.

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


def draw_scene(scene: Scene, image_size: int = 84) -> Image.Image:
    """The scene as an RGB image [image_size, image_size] on white; each of the four cells of the 3x3 grid is shaded
    its CELL_SHADES grey, and each shape fills its cell less a margin."""
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
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle, apex up
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def make_synthetic_dataset(
    out_dir: str | os.PathLike, num_images: int = 32, *, seed: int = 0, image_size: int = 84,
    questions_per_image: int = 6,
) -> Path:  # fmt: skip
    """Write `num_images` PNGs under out_dir/images and out_dir/data.jsonl (relative paths); return the JSONL path.

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
        scene = synthetic_scene(rng)
        questions = scene_questions(scene, rng, questions_per_image)
        image = f"images/{i:05d}.png"
        draw_scene(scene, image_size).save(out_dir / image)
        record = {
            "id": f"synthetic-{seed}-{i:05d}",
            "image": image,
            "caption": describe(scene),
            "questions": [{"question": q.question, "options": list(q.options), "answer": q.answer} for q in questions],
        }
        lines.append(json.dumps(record) + "\n")
    jsonl = out_dir / "data.jsonl"
    jsonl.write_text("".join(lines), encoding="utf-8")
    return jsonl


# ---------------------------------------------------------------------------------------------------------------
# Command line.


def _validate(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # every message is printed below
            result = load_jsonl(args.file, check_images=not args.no_check_images)
    except DataError as e:
        print(e, file=sys.stderr)
        return 1
    num_questions = sum(len(ex.questions) for ex in result.examples)
    print(
        f"{args.file}: {len(result.examples)} examples, {num_questions} questions, {result.num_skipped} lines skipped"
    )
    for error in result.errors:
        print(f"  {error}")
    return 1 if args.strict and result.errors else 0


def _add_convert_parser(commands) -> None:
    convert = commands.add_parser("convert", help="convert the official CapRL QA rows (parquet or JSONL) to this "
                                  "format", description="Convert verl-style rows (prompt, images, data_source, "
                                  "reward_model.ground_truth) to this module's JSONL; every row left out is listed "
                                  "as file:row: what is wrong.")  # fmt: skip
    convert.add_argument("src", type=Path, metavar="IN", help="the released file: .parquet (needs pyarrow) or JSONL")
    convert.add_argument("dst", type=Path, metavar="OUT", help="the JSONL file to write")
    convert.add_argument("--image-root", type=Path, metavar="DIR", help="where the rows' relative image paths "
                         "start (default: IN's directory)")  # fmt: skip
    convert.add_argument("--strict", action="store_true", help="exit with status 1 if any row is left out")
    convert.add_argument("--no-check-images", action="store_true", help="do not open the image files")


def _convert(args: argparse.Namespace) -> int:
    from caprl_core.convert import convert_file  # convert imports this module

    try:
        result = convert_file(args.src, args.dst, image_root=args.image_root, check_images=not args.no_check_images)
    except DataError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{args.src}: {result.num_rows} rows, {result.num_written} written to {args.dst}, "
          f"{len(result.errors)} left out")  # fmt: skip
    for error in result.errors:
        print(f"  {error}")
    return 1 if args.strict and result.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m caprl_core.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-synthetic", help="write a synthetic shapes dataset (PNGs + data.jsonl)",
                               description="Coloured shapes at the edge cells of a 3x3 grid, with questions only the "
                               "image (or the exact reference caption) answers; deterministic for a seed.")  # fmt: skip
    make.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (created)")
    make.add_argument("--num", type=int, default=32, metavar="INT", help="number of images (default: 32)")
    make.add_argument("--seed", type=int, default=0, metavar="INT", help="random seed (default: 0)")
    make.add_argument("--image-size", type=int, default=84, metavar="PX", help="image side in pixels, >= 16 "
                      "(default: 84)")  # fmt: skip
    make.add_argument("--questions", type=int, default=6, metavar="INT", help="questions per image (default: 6)")
    check = commands.add_parser("validate", help="check a dataset file and list every bad line",
                                description="Check every line of a dataset file (format: this module's docstring) "
                                "and list each bad one as file:line: what is wrong.")  # fmt: skip
    check.add_argument("file", type=Path, metavar="FILE", help="the JSONL dataset file")
    check.add_argument("--strict", action="store_true", help="exit with status 1 if any line is bad")
    check.add_argument("--no-check-images", action="store_true", help="do not open the image files")
    _add_convert_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "validate":
        return _validate(args)
    if args.command == "convert":
        return _convert(args)
    try:
        path = make_synthetic_dataset(
            args.out, args.num, seed=args.seed, image_size=args.image_size, questions_per_image=args.questions
        )
    except ValueError as e:
        parser.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
