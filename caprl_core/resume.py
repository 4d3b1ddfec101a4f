"""Reading training checkpoints back (the layout, and how they are written: `caprl_core.checkpoint`).

`latest_checkpoint` finds a run's newest complete checkpoint; `load_checkpoint` restores one into existing model,
optimizer and scheduler objects, RNG states last, so training continues exactly; `load_weights` copies the weights of a
checkpoint (or any safetensors model directory) into a model in place; `saved_masters` / `saved_parameters` give the
fp32 tensors a low-precision or torchrun run rebuilds its masters from. A checkpoint that does not fit the run raises
a one-line `ResumeError` (`resume_errors`).

`LambdaLR.state_dict()` stores plain-function lambdas as None (the code is not state): the scheduler must be rebuilt
with the same function before `load_checkpoint`, as the trainer does.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from caprl_core.checkpoint import (
    _STEP_RE,
    CHECKPOINTS_DIR,
    LATEST,
    STATE_DIR,
    _problem,
    _read_json,
    _step_dirs,
    _unwrap,
    _weight_files_or_none,
)

# --- public API ------------------------------------------------------------------------------------------------------


class ResumeError(ValueError):
    """A checkpoint that cannot continue in this run (weights or optimizer state that do not fit); one line."""


@contextmanager
def resume_errors(path: Path) -> Iterator[None]:
    """A ValueError while resuming from checkpoint `path` becomes a one-line ResumeError naming --resume."""
    try:
        yield
    except ResumeError:
        raise
    except ValueError as e:
        raise ResumeError(f"--resume: {path}: {' '.join(str(e).split())}") from e


def saved_parameters(path: str | Path, model, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors checkpoint `path` holds for `params` (parameters of `model`, in that order), in their saved dtype:
    a torchrun run's fp32 weights, from which a low-precision process rebuilds its fp32 masters."""
    path, model = Path(path), _unwrap(model)
    files, key_map = _weight_files_or_none(path), _checkpoint_key_map(model)
    if files is None or key_map is None:
        raise ValueError(f"{path}: its weights cannot be read by parameter name")
    saved = {key_map[k]: v for file in files for k, v in _read_tensors(file).items() if k in key_map}
    names: dict[int, list[str]] = {}  # a tied parameter has several names; any saved one will do
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out = []
    for p in params:
        found = [saved[n] for n in names.get(id(p), []) if n in saved]
        if not found:
            raise ValueError(f"{path}: holds no weight for parameter {names.get(id(p), ['?'])[0]}")
        out.append(found[0])
    return out


def saved_masters(path: str | Path) -> list[torch.Tensor | None]:
    """The fp32 master copies in checkpoint `path`'s optimizer state (`MasterWeightOptimizer.state_dict()`), one per
    trainable parameter, None where the parameter was its own master."""
    return list(_load_tree(Path(path) / STATE_DIR, "optimizer").get("masters", []))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint that `latest` names; else (with a warning) the complete one with the highest step;
    None when there is none."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    named = _read_latest(root)
    if named is not None:
        problem = _problem(root / named)
        if problem is None:
            return root / named
    complete = [d for d in _step_dirs(root) if _problem(d) is None]
    if named is not None:
        fallback = complete[-1].name if complete else "none"
        warnings.warn(f"{root / LATEST} names {named}, which is not usable ({problem}); using {fallback}", stacklevel=2)
    return complete[-1] if complete else None


def load_checkpoint(
    path: str | Path, *, model, optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict:  # fmt: skip
    """Restore a checkpoint into existing objects; returns the trainer_state dict given to `save_checkpoint`.
    model None: the weights are not loaded here (a sharded run loads them with `load_weights` before sharding).

    Weights are copied into `model` in place (it must already be on its device: the optimizer's state follows the
    parameters' devices). The optimizer and scheduler must be built as when saving (same parameter order, same LR
    function). RNG states (torch CPU/CUDA, Python, numpy) are restored last, so training continues exactly."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    problem = _problem(path)
    if problem is not None:
        raise ValueError(f"{path}: not a complete checkpoint: {problem}")
    if model is not None:
        load_weights(path, model)
    state_dir = path / STATE_DIR
    for what, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if not (state_dir / f"{what}.json").is_file():
            raise ValueError(f"{path}: has no {what} state (it was saved without one)")
        try:
            obj.load_state_dict(_load_tree(state_dir, what))
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"{path}: the saved {what} state does not fit this {what}: {e}") from e
    trainer_state = _read_json(state_dir / "state.json")
    _set_rng_state(_load_tree(state_dir, "rng"))
    return trainer_state


def load_weights(path: str | Path, model) -> None:
    """Copy the weights of checkpoint (or model directory) `path` into `model` in place, after checking names and
    shapes (nothing is changed when they do not fit); tensors of another dtype are cast to the model's."""
    path, model = Path(path), _unwrap(model)
    files = _weight_files_or_none(path)
    if files is None:
        raise ValueError(f"{path}: no safetensors weights (model.safetensors or model.safetensors.index.json)")
    key_map = _checkpoint_key_map(model)
    if key_map is None:
        _load_weights_via_from_pretrained(path, model)
        return
    state = model.state_dict()
    loaded, unexpected, mismatched = set(), [], []
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for saved_key in f.keys():
                    key = key_map.get(saved_key)
                    if key is None:
                        unexpected.append(saved_key)
                        continue
                    if tuple(f.get_slice(saved_key).get_shape()) != tuple(state[key].shape):
                        mismatched.append(f"{key}: {f.get_slice(saved_key).get_shape()} vs {list(state[key].shape)}")
                    loaded.add(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: unreadable safetensors file: {e}") from e
    aliases = _tied_aliases(model)
    missing = sorted(k for k in set(state) - loaded if not aliases.get(k, set()) & loaded)
    if unexpected or missing or mismatched:
        raise ValueError(f"{path}: weights do not fit {type(model).__name__}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, shape mismatches {mismatched[:8]}")  # fmt: skip
    for file in files:
        part = _read_tensors(file)
        model.load_state_dict({key_map[k]: v for k, v in part.items()}, strict=False)


# --- reading ---------------------------------------------------------------------------------------------------------


def _read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return name if _STEP_RE.match(name) else None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable safetensors file: {e}") from e


def _load_tree(directory: Path, name: str) -> Any:
    tensors = _read_tensors(directory / f"{name}.safetensors")
    return _decode(_read_json(directory / f"{name}.json"), tensors)


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        (marker, value), = tree.items()  # fmt: skip
        if marker == "__tensor__":
            if value not in tensors:
                raise ValueError(f"tensor {value!r} is missing from the safetensors file")
            return tensors[value]
        if marker == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if marker == "__int_keys__":
            return {int(k): _decode(v, tensors) for k, v in value.items()}
        if marker == "__dict__":
            return {k: _decode(v, tensors) for k, v in value.items()}
    return {k: _decode(v, tensors) for k, v in tree.items()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    # Devices beyond those present now are skipped: resuming on other hardware cannot be bit-exact anyway.
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device=index)


# --- model weights ---------------------------------------------------------------------------------------------------


def _checkpoint_key_map(model) -> dict[str, str] | None:
    """{key in the saved files: key in model.state_dict()}, or None when they are not a renaming of each other.

    transformers 5 saves some models (Qwen2.5-VL: `model.language_model.*` -> `model.*`) in their original hub layout;
    its own reverse conversion tells the names. Real conversions (e.g. merged MoE experts) give None."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: its layout rules differ; let from_pretrained read the files
        return None
    by_id = {id(tensor): key for key, tensor in state.items()}
    reverted = revert_weight_conversion(model, state)
    key_map = {saved: by_id.get(id(tensor)) for saved, tensor in reverted.items()}
    return None if None in key_map.values() else key_map


def _tied_aliases(model) -> dict[str, set[str]]:
    """{parameter name: the other names of the same tensor} (e.g. lm_head.weight <-> model.embed_tokens.weight)."""
    names: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), set()).add(name)
    return {name: group - {name} for group in names.values() for name in group}


def _load_weights_via_from_pretrained(path: Path, model) -> None:
    """Fallback for layouts that are not a renaming: transformers' own loader builds a second copy (memory: twice the
    model for a moment), which is then copied in place."""
    dtype = next(model.parameters()).dtype
    other, info = type(model).from_pretrained(path, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"{path}: weights do not fit {type(model).__name__}: {problems}")
    model.load_state_dict(other.state_dict())
