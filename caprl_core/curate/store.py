"""What curation reads and writes: the image list of `generate`, the rows of this project's dataset format
(`caprl_core.data`, what `train --data` reads) and of the verl-style format (`caprl_core.convert` reads them back),
whole-file writes that a crash never leaves half done, and the append-only progress log that makes a run resumable.

Resuming: each finished image is one line of `OUT.progress.jsonl`, written, flushed and fsynced before the next image
starts. A run killed at any instant leaves whole lines plus at most one partial last line; the next run drops the
partial line, skips the images the log holds (checked by id, in order) and appends. When every image is done the
outputs are written from the log (temporary file, then rename) and the log is renamed to its final name, so nothing
is lost or written twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from caprl_core.data import LETTERS, MCQ, DataError, _image_problem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The prompt of the released CapRL rows (caprl_core.convert checks one <image> per image).
VERL_PROMPT = [{"role": "user", "content": "<image>Please describe the image in detail."}]


@dataclass(frozen=True, slots=True)
class ImageItem:
    """One image to write questions for: its id and absolute path."""

    id: str
    image: Path


def list_images(source: str | os.PathLike) -> list[ImageItem]:
    """The images of `source`: a directory (its image files, recursively, sorted; the id is the path relative to it)
    or a JSONL file of {"image": path relative to the file or absolute, "id": optional} lines (a dataset file of
    this project's format is one). ValueError naming the source and the line when an entry is unusable."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        items = [ImageItem(str(p.relative_to(source)), p.absolute()) for p in files]
    elif source.is_file():
        items = list(_image_lines(source))
    else:
        raise ValueError(f"{source} does not exist")
    if not items:
        raise ValueError(f"{source}: no images")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ValueError(f"{source}: duplicate id {item.id!r}")
        seen.add(item.id)
        problem = _image_problem(item.image)
        if problem is not None:
            raise ValueError(f"{source}: {item.id}: {problem}")
    return items


def _image_lines(path: Path) -> Iterator[ImageItem]:
    base = path.parent.absolute()
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None
        image = obj.get("image") if isinstance(obj, dict) else None
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f'{path}:{lineno}: expected an object with an "image" path')
        yield ImageItem(str(obj.get("id", f"{path.stem}:{lineno}")), base / image)


def question_dict(mcq: MCQ, **extra) -> dict:
    """One question in the dataset format (answer as an index), with `extra` keys alongside (ignored by the loader)."""
    return {"question": mcq.question, "options": list(mcq.options), "answer": mcq.answer, **extra}


def dataset_row(example_id: str, image: Path, questions: list[dict], out_dir: Path) -> dict:
    """One line of this project's dataset format, its image path relative to `out_dir` (the output file's
    directory) so that `caprl_core.data.load_jsonl` finds it wherever the pair of them is moved."""
    return {"id": example_id, "image": os.path.relpath(image, out_dir.absolute()), "questions": questions}


def verl_row(example_id: str, image: Path, questions: list[dict], out_dir: Path) -> dict:
    """One verl-style row as the released CapRL QA files hold them (the fields `caprl_core.convert` reads): choices
    labelled "A. ...", the answer as a letter, the id as extra_info.index."""
    truth = [{"question": q["question"], "choices": [f"{LETTERS[i]}. {o}" for i, o in enumerate(q["options"])],
              "answer": LETTERS[q["answer"]]} for q in questions]  # fmt: skip
    return {"data_source": "caprl_curate", "prompt": VERL_PROMPT,
            "images": [os.path.relpath(image, out_dir.absolute())], "ability": "captioning",
            "reward_model": {"style": "rule", "ground_truth": truth}, "extra_info": {"index": example_id}}  # fmt: skip


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    """Write `rows` as JSONL to a temporary file beside `path`, fsync it, then rename it over `path`: readers see the
    old file or the whole new one, never a part."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: dict) -> None:
    """`obj` as indented JSON, written like `write_jsonl_atomic`."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ProgressLog:
    """The append-only per-image log of a run (see the module docstring). `done` holds the records already there."""

    def __init__(self, path: Path, *, resume: bool = True) -> None:
        self.path = path
        self.done: list[dict] = []
        if resume and path.exists():
            self.done = self._read_whole_lines()
        elif path.exists():
            path.unlink()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run, closed by close()

    def _read_whole_lines(self) -> list[dict]:
        """The records of the complete lines; a partial last line (a write cut by the crash) is cut off the file."""
        raw = self.path.read_bytes()
        whole = raw[: raw.rfind(b"\n") + 1]
        if len(whole) != len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
        try:
            return [json.loads(line) for line in whole.decode("utf-8").splitlines() if line.strip()]
        except ValueError as e:
            raise DataError(f"{self.path}: unreadable progress log ({e}); delete it to start over") from None

    def check_order(self, ids: list[str]) -> None:
        """The logged images must be the first ones of this run's input, in order: otherwise the log is another
        input's, and resuming from it would mix two runs."""
        logged = [r["id"] for r in self.done]
        if logged != ids[: len(logged)]:
            raise DataError(f"{self.path}: the progress log is not of this input (its images are not the input's "
                            f"first {len(logged)}); delete it or pass --no-resume")  # fmt: skip

    def check_settings(self, settings: dict) -> None:
        """Every logged image must have been scored with `settings` (flag -> value): otherwise resuming would mix
        two runs' decisions. The error names the flags that differ."""
        for record in self.done:
            if record.get("settings") != settings:
                logged = record.get("settings") or {}
                differ = [f"{k} {logged.get(k)} (logged) vs {v}" for k, v in settings.items() if logged.get(k) != v]
                raise DataError(f"{self.path}: the progress log was written with other settings ("
                                f"{'; '.join(differ) or 'none recorded'}); rerun with the logged ones, or pass "
                                f"--no-resume to start over")  # fmt: skip

    def append(self, record: dict) -> None:
        """Log one finished image durably: written, flushed and fsynced before this returns."""
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.append(record)

    def close(self) -> None:
        self._file.close()

    def finish(self, final: Path) -> None:
        """Close the log and rename it to `final` (the run's complete per-image record)."""
        self.close()
        os.replace(self.path, final)
