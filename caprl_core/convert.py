"""Convert the official CapRL QA files (verl-style rows, parquet or JSONL) to this project's dataset JSONL.

A released row looks like (the fields used here; others are ignored):

    {"prompt": [{"role": "user", "content": "<image>Please describe the image in detail."}],
     "images": ["imgs/0001.jpg"],                 # or [{"path": "imgs/0001.jpg", ...}]
     "data_source": "caprl",
     "reward_model": {"ground_truth": [           # or the same list as a JSON string
         {"question": "What colour is the bus?", "choices": ["A. Red", "B. Blue", "C. Green"], "answer": "B"}]}}

Each row becomes one line of the format in `caprl_core.data` (`image`, `questions` with `options` and an answer
index, `id`, plus `data_source`). Questions go through the strict parser the TRL reward and the verl adapter share
(`caprl_core.qa_rows`): the choices' letter labels ("A. ", "B) ", "(C) ") are removed only when every choice carries
one in order ("U.S." stays a choice); a "Can not answer based on the caption" choice is dropped, since the reward
appends its own; an answer is one letter, optionally with ")" / "." and its option's text. Images are resolved
relative to `image_root` (default: the input file's directory) and written relative to the output file's
directory, so `load_jsonl` finds them.

A bad question (an answer such as "", "BC" or "B text", an answer that is not one of the choices, fewer than 2 or
more than 8 options, ...) is reported as "file:row:question: what is wrong" and left out; the row keeps its good
questions. A row that cannot be converted (a missing field, not exactly one image or one `<image>` per image in the
prompt, no good question, a missing image) is reported as "file:row: what is wrong", as `python -m caprl_core.data
validate` does, and left out. Rows and questions are numbered from 1 (JSONL rows: the line number). Parquet needs
pyarrow (`pip install caprl-core[parquet]`).

    python -m caprl_core.data convert IN OUT [--image-root DIR] [--strict] [--no-check-images]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from caprl_core.data import DataError, _image_problem, _json_type
from caprl_core.qa_rows import parse_question


@dataclass(slots=True)
class ConvertResult:
    """How many rows were read and written, and one "file:row: ..." message per row left out."""

    num_rows: int = 0
    num_written: int = 0
    errors: list[str] = field(default_factory=list)


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(row number from 1, row) of a parquet or JSONL file; a JSONL line that is not JSON is yielded as a
    ValueError for the caller to report. DataError naming the file when it cannot be read."""
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        yield from enumerate(_parquet_rows(path), start=1)
        return
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    for lineno, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            yield lineno, ValueError(f"invalid JSON: {e}")


def _parquet_rows(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow, which is not installed "
                        "(pip install 'caprl-core[parquet]', or pip install pyarrow)") from None  # fmt: skip
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: cannot read parquet: {e}") from e


def convert_row(row: object, image_root: Path) -> tuple[dict | None, list[str], list[str]]:
    """One released row -> (this project's line as a dict, with an absolute image path, or None; the row's problems;
    its bad questions as "question: what is wrong", left out of the line while its good questions stay)."""
    if not isinstance(row, dict):
        return None, [f"expected an object, got {_json_type(row)}"], []
    problems: list[str] = []
    bad: list[str] = []
    images = _images(row, problems)
    if images is not None:
        _check_prompt(row, len(images), problems)
    questions = _questions(row, problems, bad)
    source = row.get("data_source")
    if source is not None and not isinstance(source, str):
        problems.append(f'"data_source": expected a string, got {_json_type(source)}')
    if problems:
        return None, problems, bad
    image = Path(images[0])
    out = {"image": str(image if image.is_absolute() else image_root / image), "questions": questions}
    if source is not None:
        out["data_source"] = source
    return out, [], bad


def _images(row: dict, problems: list[str]) -> list[str] | None:
    """The row's image paths (str, or dicts with a "path"); one image per row is what the format holds."""
    images = row.get("images")
    if not isinstance(images, list):
        problems.append(f'"images": expected a list of paths, got {_json_type(images)}' if "images" in row
                        else 'missing key "images"')  # fmt: skip
        return None
    paths = []
    for i, item in enumerate(images):
        path = item.get("path") if isinstance(item, dict) else item
        if not isinstance(path, str) or not path.strip():
            what = "an object without a path (embedded bytes are not supported)" if isinstance(item, dict) else None
            problems.append(f'"images"[{i}]: expected a path or an object with a "path", got '
                            f"{what or _json_type(item)}")  # fmt: skip
            return None
        paths.append(path)
    if len(paths) != 1:
        problems.append(f'"images": expected exactly one image per row, got {len(paths)}')
        return None
    return paths


def _check_prompt(row: dict, num_images: int, problems: list[str]) -> None:
    """The prompt must be chat messages whose contents hold one <image> per image."""
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "content" in m for m in prompt):
        problems.append('"prompt": expected a list of chat messages ({"role", "content"})')
        return
    count = sum(str(m["content"]).count("<image>") for m in prompt)
    if count != num_images:
        problems.append(f'"prompt": {count} <image> placeholders for {num_images} image(s)')


def _questions(row: dict, problems: list[str], bad: list[str]) -> list[dict]:
    """The ground truth's good questions in this format (options without their labels, answer as an index); each
    bad question's problem goes to `bad` as "question: what is wrong" (`caprl_core.qa_rows.parse_question`)."""
    reward_model = row.get("reward_model")
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if isinstance(truth, str):
        try:
            truth = json.loads(truth)
        except ValueError as e:
            problems.append(f'"reward_model.ground_truth": a string that is not JSON: {e}')
            return []
    if not isinstance(truth, list) or not truth:
        problems.append(f'"reward_model.ground_truth": expected a non-empty list of questions, got {_json_type(truth)}')
        return []
    questions = []
    for q, item in enumerate(truth, start=1):
        if not isinstance(item, dict):
            bad.append(f"{q}: expected an object, got {_json_type(item)}")
            continue
        try:
            mcq = parse_question(item)
        except ValueError as e:
            bad.append(f"{q}: {e}")
            continue
        questions.append({"question": mcq.question, "options": list(mcq.options), "answer": mcq.answer})
    if not questions:
        problems.append(f"no good question among {len(truth)}")
    return questions


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 check_images: bool = True) -> ConvertResult:  # fmt: skip
    """Convert the released rows in `src` (parquet or JSONL) to this project's JSONL at `dst`, leaving out the
    rows that cannot be converted (listed in the result's `errors`). image_root: where the rows' relative image
    paths start (default: src's directory). check_images: each image must exist and open with PIL. DataError when
    the file cannot be read or no row converts (no output is written then)."""
    src, dst = Path(src), Path(dst)
    root = Path(image_root).absolute() if image_root is not None else src.parent.absolute()
    result, lines, seen = ConvertResult(), [], set()
    checked: dict[str, str | None] = {}  # many rows may share one image
    for rownum, row in read_rows(src):
        result.num_rows += 1
        out, problems, bad = (None, [str(row)], []) if isinstance(row, ValueError) else convert_row(row, root)
        result.errors += [f"{src}:{rownum}:{problem}" for problem in bad]  # file:row:question: what is wrong
        if out is not None and check_images:
            if out["image"] not in checked:
                checked[out["image"]] = _image_problem(Path(out["image"]))
            problems = [checked[out["image"]]] if checked[out["image"]] else []
        if problems:
            result.errors.append(f"{src}:{rownum}: " + "; ".join(problems))
            continue
        out["id"] = _row_id(row, src, rownum, seen)
        out["image"] = os.path.relpath(out["image"], dst.parent.absolute())
        lines.append(json.dumps(out, ensure_ascii=False))
    if not lines:
        raise DataError(f"{src}: no row converts ({result.num_rows} rows)\n" + "\n".join(result.errors), result.errors)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result.num_written = len(lines)
    return result


def _row_id(row: dict, src: Path, rownum: int, seen: set[str]) -> str:
    """verl's extra_info.index when the row has one and it is new, else "<file stem>:<row>"."""
    extra = row.get("extra_info")
    index = extra.get("index") if isinstance(extra, dict) else None
    row_id = str(index) if isinstance(index, (str, int)) and not isinstance(index, bool) else f"{src.stem}:{rownum}"
    if row_id in seen:
        row_id = f"{src.stem}:{rownum}"
    seen.add(row_id)
    return row_id
