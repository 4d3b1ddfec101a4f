"""Training checkpoints that a multi-day run can trust: atomic, pickle-free, and exact on resume.

On disk (`<output_dir>/checkpoints/`):

    latest                      the name of the newest complete checkpoint (one line, replaced atomically)
    step-000012/
      config.json, generation_config.json, model.safetensors (or shards + index)   Hugging Face format
      tokenizer, preprocessor_config.json, chat template files                     when `processors` are given
      trainer_state/
        optimizer.safetensors   every optimizer tensor, keys like `state.<param_index>.exp_avg`
        optimizer.json          the rest (param_groups: lr, betas, ...); tensors appear as {"__tensor__": key}
        scheduler.json (+ .safetensors)    the LR scheduler's state_dict()
        rng.safetensors, rng.json          torch CPU (and CUDA) generator states; Python's and numpy's as JSON
        state.json              what the trainer passes (step, data position, config, ...)
      COMPLETE                  written last: a manifest {file: size}; a directory without it is not a checkpoint

A checkpoint is written into `step-000012.tmp-<pid>`, flushed to disk (fsync), marked COMPLETE, renamed into place,
and only then named by `latest`. A crash at any point (even SIGKILL or a power cut) leaves `latest` naming a complete
checkpoint; the leftover `*.tmp-*` entry is deleted by the next save. The model directory loads with
`AutoModelForCausalLM` / `AutoModelForImageTextToText.from_pretrained` (and so with vLLM). The trainer passes the
policy's tokenizer, image processor and its start directory's chat-template files (`policy.Models.processors`), so a
checkpoint is a complete policy directory: `--policy <checkpoint>` works in train and eval, and `AutoTokenizer` /
`AutoImageProcessor.from_pretrained` load it.

Nothing is pickled: tensors go to safetensors, everything else to JSON (tuples and int-keyed dicts are tagged so they
come back as they were).

This module writes checkpoints (`save_checkpoint`: the atomic save, `latest`, keep-last pruning) and owns the
on-disk layout: its names, what makes a directory a complete checkpoint, and the JSON tagging of state dicts.
`caprl_core.resume` reads them back (`latest_checkpoint`, `load_checkpoint`, `load_weights`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
STATE_DIR = "trainer_state"
FORMAT_VERSION = 1

# Tests only: SIGKILL this process while it writes the checkpoint of this step (after the weights, before the rest),
# to check that a resumed run continues exactly (tests/test_train.py, tests/test_checkpoint.py).
KILL_ENV = "CAPRL_TEST_KILL_IN_CHECKPOINT"

_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_RE = re.compile(r"\.tmp-\d+$")  # in-progress or discarded entries: `step-000012.tmp-<pid>`, `latest.tmp-<pid>`
_MARKERS = ("__tensor__", "__tuple__", "__int_keys__", "__dict__")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


# --- public API ------------------------------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | Path, step: int, *, model, optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, trainer_state: dict,
    processors: Iterable = (), keep_last: int = 3, state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:  # fmt: skip
    """Write checkpoint `step` under `<output_dir>/checkpoints/` atomically; returns its directory.

    model: a transformers model (saved with `save_pretrained`, safetensors). processors: tokenizers / image processors
    saved beside it (None entries are skipped). state_dict: the weights to write instead of the model's own (a
    sharded model's full state dict, gathered on this rank); the model then gives only its config.
    trainer_state: a JSON-serialisable dict, returned by
    `load_checkpoint`. Keeps the newest `keep_last` complete checkpoints (by step; the one written now is always
    kept) and deletes leftovers of interrupted saves. Writing the same step again replaces that checkpoint."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if not isinstance(trainer_state, dict):
        raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    try:  # fail before writing anything
        state_json = json.dumps(trainer_state, indent=2)
    except (TypeError, ValueError) as e:
        raise TypeError(f"trainer_state must be JSON-serialisable: {e}") from e

    root = Path(output_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)  # free the disk an interrupted save used before writing a new one
    name = checkpoint_name(step)
    tmp, final = root / f"{name}.tmp-{os.getpid()}", root / name
    try:
        _write_checkpoint(tmp, step, _unwrap(model), optimizer, scheduler, state_json, processors, state_dict)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step (e.g. after resuming from an older one): move the old one aside first
        os.replace(final, root / f"{name}.replaced.tmp-{os.getpid()}")
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_latest(root, name)
    _prune(root, keep_last, keep=name)
    _remove_stale(root)
    return final


# --- writing ---------------------------------------------------------------------------------------------------------


def _write_checkpoint(tmp: Path, step: int, model, optimizer, scheduler, state_json: str, processors,
                      state_dict: dict | None = None) -> None:  # fmt: skip
    """Everything into `tmp`, durable on disk, COMPLETE last."""
    tmp.mkdir(parents=True)
    # transformers writes safetensors by default (4.57) or only (5.x, where `safe_serialization` is gone): check the
    # result instead of passing a flag.
    model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
    weights = sorted(p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if weights or not _weight_files_or_none(tmp):
        raise RuntimeError(f"{type(model).__name__}.save_pretrained did not write safetensors only (found {weights})")
    for processor in processors:
        if processor is not None:
            processor.save_pretrained(tmp)
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    state_dir = tmp / STATE_DIR
    state_dir.mkdir()
    if optimizer is not None:
        _save_tree(optimizer.state_dict(), state_dir, "optimizer")
    if scheduler is not None:
        _save_tree(scheduler.state_dict(), state_dir, "scheduler")
    _save_tree(_rng_state(), state_dir, "rng")
    _write_text(state_dir / "state.json", state_json + "\n")
    _fsync_tree(tmp)  # data before the marker: after a power cut COMPLETE must not exist without the files
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write_text(tmp / COMPLETE, json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1))
    _fsync_dir(tmp)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}.tmp-{os.getpid()}"
    _write_text(tmp, name + "\n")
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _prune(root: Path, keep_last: int, *, keep: str) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, never `keep`. Incomplete step-* directories are not
    ours to judge and are left alone."""
    complete = [d for d in _step_dirs(root) if _problem(d) is None]
    kept = {d.name for d in complete[-keep_last:]} | {keep}
    for d in complete:
        if d.name not in kept:
            trash = root / f"{d.name}.deleting.tmp-{os.getpid()}"
            os.replace(d, trash)  # atomic: a crash mid-delete leaves a tmp entry, never a half-deleted checkpoint
            shutil.rmtree(trash)


def _remove_stale(root: Path) -> None:
    """Delete `*.tmp-<pid>` leftovers of interrupted saves (one process saves into a run directory at a time)."""
    for entry in root.iterdir():
        if _TMP_RE.search(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """Make a rename or new entry in `path` durable (POSIX; Windows cannot open directories)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- what a complete checkpoint is (caprl_core.resume trusts the same) -----------------------------------------------


def _step_dirs(root: Path) -> list[Path]:
    """step-* directories, by step."""
    dirs = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(dirs)]


def _problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is (every file of the manifest, at its size)."""
    if not path.is_dir():
        return "it does not exist"
    try:
        manifest = json.loads((path / COMPLETE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {COMPLETE} marker (an interrupted save?)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE} marker ({e!r})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} were written"
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"{path}: missing") from e
    except ValueError as e:
        raise ValueError(f"{path}: corrupt JSON: {e}") from e


# --- pickle-free (de)serialisation of state dicts ---------------------------------------------------------------------


def _save_tree(obj: Any, directory: Path, name: str) -> None:
    """`obj` (nested dicts/lists/tuples of tensors and JSON scalars) as `<name>.safetensors` + `<name>.json`."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, "", tensors)
    save_file(tensors, directory / f"{name}.safetensors")
    _write_text(directory / f"{name}.json", json.dumps(tree) + "\n")


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON tree for `obj`; tensors move to `tensors` under their dotted path (`state.3.exp_avg`)."""
    join = lambda k: f"{key}.{k}" if key else str(k)
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors map to the key {key!r}")
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, join(i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, join(i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) and not isinstance(k, bool) for k in obj):  # optimizer state: {index: ...}
            return {"__int_keys__": {str(k): _encode(v, join(k), tensors) for k, v in obj.items()}}
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{key or 'state'}: dict keys must be all str or all int, got {list(obj)[:5]}")
        out = {k: _encode(v, join(k), tensors) for k, v in obj.items()}
        return {"__dict__": out} if len(out) == 1 and next(iter(out)) in _MARKERS else out
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key or 'state'}: cannot store a {type(obj).__name__} without pickle")


# --- RNG states ------------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# --- model weights ---------------------------------------------------------------------------------------------------


def _unwrap(model):
    """The transformers model inside DistributedDataParallel (`.module`) or torch.compile (`._orig_mod`)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _weight_files_or_none(path: Path) -> list[Path] | None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
    single = path / "model.safetensors"
    return [single] if single.is_file() else None
