"""The two curation runs over files: `run_generate` (images -> candidate questions) and `run_filter` (candidates ->
kept questions), with their progress bars (tqdm on stderr, as the trainer's), per-stage counts and output files.

Files of a run writing OUT = name.jsonl (see `output_paths`):
    name.jsonl          this project's dataset format (what `train --data` reads)
    name.verl.jsonl     the same rows in the verl-style format (filter only)
    name.scores.jsonl   every candidate question with its accuracies, kept or not and why (filter only)
    name.summary.json   the counts and settings of the run
    name.jsonl.progress the per-image progress log while a filter runs (renamed to name.scores.jsonl at the end)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from caprl_core.curate.extract import REASONS
from caprl_core.curate.filter import DROP_REASONS, QuestionFilter
from caprl_core.curate.generate import QuestionGenerator
from caprl_core.curate.store import (
    ImageItem,
    ProgressLog,
    dataset_row,
    question_dict,
    verl_row,
    write_json_atomic,
    write_jsonl_atomic,
)
from caprl_core.data import MCQ, load_image, load_jsonl

# Tests only: after logging this many images, write half of the next record and SIGKILL the process (a crash in the
# middle of a log write), to check that a resumed run writes what an uninterrupted one does (tests/test_curate.py).
KILL_ENV = "CAPRL_TEST_KILL_IN_FILTER"


def output_paths(out: str | Path) -> dict[str, Path]:
    """The files of a run writing `out` (module docstring)."""
    out = Path(out)
    stem = out.name.removesuffix(".jsonl")
    return {"data": out, "verl": out.with_name(f"{stem}.verl.jsonl"),
            "scores": out.with_name(f"{stem}.scores.jsonl"), "summary": out.with_name(f"{stem}.summary.json"),
            "progress": out.with_name(f"{out.name}.progress")}  # fmt: skip


def _bar(total: int, desc: str, progress: bool, initial: int = 0):
    from tqdm import tqdm  # a dependency of transformers

    return tqdm(total=total, initial=initial, desc=desc, unit="img", file=sys.stderr, disable=not progress,
                dynamic_ncols=True)  # fmt: skip


def run_generate(generator: QuestionGenerator, items: list[ImageItem], out: str | Path, *,
                 progress: bool = True) -> dict:  # fmt: skip
    """Write the questions `generator` parses for `items` to `out` (images with none are left out: the format needs
    one) and the summary beside it; returns the summary."""
    paths, started = output_paths(out), time.perf_counter()
    paths["data"].parent.mkdir(parents=True, exist_ok=True)
    rows, dropped, blocks, truncated = [], Counter(), 0, 0
    size = generator.config.batch_size
    with _bar(len(items), "generate", progress) as bar:
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            results = generator.generate([it.id for it in batch], [it.image for it in batch], start)
            for item, res in zip(batch, results, strict=True):
                dropped += res.dropped
                blocks += len(res.questions) + sum(res.dropped.values())
                truncated += res.finish_reason == "length"
                if res.questions:
                    questions = [question_dict(q) for q in res.questions]
                    rows.append(dataset_row(item.id, item.image, questions, paths["data"].parent))
            bar.update(len(batch))
            bar.set_postfix(questions=sum(len(r["questions"]) for r in rows))
    write_jsonl_atomic(paths["data"], rows)
    parsed = sum(len(r["questions"]) for r in rows)
    c = generator.config
    summary = {
        "stage": "generate", "images": len(items), "images_with_questions": len(rows), "generated_blocks": blocks,
        "parsed": parsed, "kept": parsed, "dropped": {r: dropped[r] for r in REASONS if dropped[r]},
        "truncated_outputs": truncated, "num_questions": c.num_questions, "temperature": c.temperature,
        "top_p": c.top_p, "max_new_tokens": c.max_new_tokens, "repetition_penalty": c.repetition_penalty,
        "seed": c.seed,
        "engine": generator.engine.stats.as_dict(), "seconds": round(time.perf_counter() - started, 2),
        "out": str(paths["data"]),
    }  # fmt: skip
    write_json_atomic(paths["summary"], summary)
    return summary


def generate_line(summary: dict) -> str:
    """The one line `generate` prints at the end."""
    drops = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    line = (f"generate: {summary['parsed']} questions kept for {summary['images_with_questions']} of "
            f"{summary['images']} images ({summary['generated_blocks']} blocks generated, "
            f"dropped: {drops})")  # fmt: skip
    if summary["parsed"] == 0:
        line += f"; nothing parseable, {summary['out']} is empty"
    return line


def run_filter(qfilter: QuestionFilter, in_path: str | Path, out: str | Path, *, resume: bool = True,
               progress: bool = True) -> dict:  # fmt: skip
    """Filter the questions of the dataset file `in_path` into `out` (and its verl, scores and summary files),
    resuming from the progress log of an earlier run on the same input unless resume=False; returns the summary.
    DataError when the input cannot be used."""
    paths, started = output_paths(out), time.perf_counter()
    examples = load_jsonl(in_path, on_error="skip").examples
    paths["data"].parent.mkdir(parents=True, exist_ok=True)
    log = ProgressLog(paths["progress"], resume=resume)
    try:
        log.check_order([ex.id for ex in examples])
        log.check_settings(qfilter.config.settings())
        resumed = len(log.done)
        qfilter.engine.reset_stats()
        with _bar(len(examples), "filter", progress, initial=resumed) as bar:
            for ex in examples[resumed:]:
                log.append(_score_image(qfilter, ex))
                if os.environ.get(KILL_ENV) == str(len(log.done)):
                    _die_mid_write(log)
                bar.update(1)
                bar.set_postfix(kept=sum(q["kept"] for r in log.done for q in r["questions"]), refresh=False)
    except BaseException:
        log.close()
        raise
    kept_rows = [(r, [q for q in r["questions"] if q["kept"]]) for r in log.done]
    kept_rows = [(r, qs) for r, qs in kept_rows if qs]
    out_dir = paths["data"].parent
    write_jsonl_atomic(paths["data"], [dataset_row(r["id"], Path(r["image"]), qs, out_dir) for r, qs in kept_rows])
    write_jsonl_atomic(paths["verl"], [verl_row(r["id"], Path(r["image"]), qs, out_dir) for r, qs in kept_rows])
    summary = _filter_summary(qfilter, log.done, len(kept_rows), resumed, in_path, paths)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    write_json_atomic(paths["summary"], summary)
    log.finish(paths["scores"])
    return summary


def _die_mid_write(log: ProgressLog) -> None:
    half = json.dumps(log.done[-1])[: len(json.dumps(log.done[-1])) // 2]
    log._file.write(half)
    log._file.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _score_image(qfilter: QuestionFilter, ex) -> dict:
    questions: list[MCQ] = list(ex.questions)
    accuracies = qfilter.accuracies(load_image(ex.image), questions)
    scored = []
    for mcq, (visual, text) in zip(questions, accuracies, strict=True):
        reason = qfilter.config.drop_reason(visual, text)
        scored.append(question_dict(mcq, visual_accuracy=visual, text_accuracy=text, kept=reason is None,
                                    reason=reason))  # fmt: skip
    return {"id": ex.id, "image": str(ex.image), "questions": scored, "settings": qfilter.config.settings()}


def _filter_summary(qfilter: QuestionFilter, records: list[dict], images_kept: int, resumed: int, in_path,
                    paths: dict) -> dict:  # fmt: skip
    questions = [q for r in records for q in r["questions"]]
    reasons = Counter(q["reason"] for q in questions if q["reason"] is not None)
    c = qfilter.config
    summary = {
        "stage": "filter", "images": len(records), "images_kept": images_kept, "candidates": len(questions),
        "kept": sum(q["kept"] for q in questions), "dropped": {r: reasons[r] for r in DROP_REASONS if reasons[r]},
        "mode": c.mode, "score": c.score if c.mode == "logits" else None, "rotations": c.rotations,
        "min_visual": c.min_visual, "max_text": c.max_text,
        "resumed_images": resumed, "engine": qfilter.engine.stats.as_dict(),
        "in": str(in_path), "out": str(paths["data"]), "verl_out": str(paths["verl"]), "scores": str(paths["scores"]),
    }  # fmt: skip
    previous = output_paths(in_path)["summary"]  # the generate run that wrote the input, when it did
    if previous.is_file():
        try:
            before = json.loads(previous.read_text(encoding="utf-8"))
        except ValueError:
            before = None
        if isinstance(before, dict) and before.get("stage") == "generate":
            summary["generate"] = {k: before.get(k) for k in ("images", "generated_blocks", "parsed", "dropped")}
    return summary


def filter_line(summary: dict) -> str:
    """The one line `filter` prints at the end."""
    drops = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    line = (f"filter: {summary['kept']} of {summary['candidates']} questions kept ({summary['images_kept']} of "
            f"{summary['images']} images; dropped: {drops})")  # fmt: skip
    if "generate" in summary:
        g = summary["generate"]
        line += f"; generated {g['generated_blocks']} blocks, parsed {g['parsed']}"
    return line + f" -> {summary['out']}"
