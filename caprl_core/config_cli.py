"""The training command line: `build_parser` (the flags of `python -m caprl_core.train`, with their --help) and
`parse_command` (`parse_config`: its config and --resume), which resolves a `caprl_core.config.TrainConfig` from
defaults < a TOML/JSON --config file < flags, and remembers which options the user set.

A config file holds the same names as the flags (with underscores), flat or under their section
(`[rollout] group_size = 8`); each value must have its field's type. Flags are parsed as text into the field's type.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caprl_core.config import (
    FIELDS,
    JUDGES,
    LENGTH_COMBINES,
    RECIPE_PRESET,
    REWARD_PRESETS,
    SECTIONS,
    WORLD_DEFAULTS,
    TrainConfig,
    _flag,
    _get,
    _set,
    policy_defaults,
    validate,
)
from caprl_core.grpo import AGGREGATIONS, CORRECTION_LEVELS, ROLLOUT_CORRECTIONS
from caprl_core.policy import DTYPES

# One line per option for --help: what it does. Allowed values are listed where they are a fixed set (CHOICES).
HELP = {
    "policy": "local Hugging Face directory of the vision-language policy (e.g. Qwen2.5-VL-3B-Instruct); not given: "
              "the shipped miniature-world start policy; tiny-random (with --reader tiny-random): random weights",
    "reader": "local Hugging Face directory of the reader LLM (e.g. Qwen2.5-3B-Instruct); not given: the shipped "
              "miniature-world reader",
    "dtype": "compute dtype of both models; auto = bfloat16 on CUDA, float32 on CPU",
    "device": "torch device; auto = cuda when available, else cpu",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory, slower)",
    "data": "dataset JSONL (format: python -m caprl_core.data --help); not given: the miniature world's train split",
    "on_error": "bad dataset lines: skip them with one warning, or raise listing every one",
    "synthetic_images": "images of the world's train split (when --data is not given)",
    "images_per_step": "images per training step (B)",
    "group_size": "captions sampled per image (G); advantages compare the captions of one image",
    "max_new_tokens": "caption length cap, in tokens",
    "temperature": "sampling temperature of the rollout (also used for the trained log-probs)",
    "top_p": "nucleus sampling threshold of the rollout (1 = off)",
    "top_k": "top-k sampling of the rollout (0 = off)",
    "kv_cache_tokens": "the policy sampler's KV cache size in tokens; not given: sized by each rollout's need",
    "reader_kv_cache_tokens": "the reader's KV cache size in tokens; not given: sized by each step's need",
    "instruction": "the text after the image in the policy's prompt",
    "reward_preset": "recipe = the published CapRL reward server: its prompt layout (cannot-answer always F), reader "
                     "temperature 0.6, soft mode (its expected reward, read over the whole vocabulary), 8 draws, "
                     "accuracy + 0.2 x length term (1 up to 2,048 tokens, 0 from 3,072) as one score; options given "
                     "explicitly override the preset",
    "num_draws": "questions drawn per caption (N) for its reward",
    "mode": "reward per draw: hard = 1 if the reader's best option is right, soft = the probability it gives it",
    "reader_temperature": "the reader's softmax temperature in soft mode (the recipe's answerer samples at 0.6)",
    "advantage": "group advantage: grpo = reward minus the group mean, rloo = minus the mean of the others",
    "scale": "divide advantages by the group's std, the batch's std, or not at all (Dr.GRPO: none)",
    "length_weight": "weight of the caption-length reward term (0 = off)",
    "length_l1": "length term: full reward up to this many tokens",
    "length_l2": "length term: no reward from this many tokens (linear in between)",
    "length_combine": "how the length term enters the advantage: decoupled = each reward normalised in its group, "
                      "then weighted; sum = accuracy + weight x length reward as one score, normalised in the group "
                      "(the recipe's server)",
    "shared_draws": "the same question draws and option shuffles for all G captions of an image",
    "shuffle_rewards": "a control run: train each caption on another caption's reward (logged rewards stay true)",
    "judge": "an ablation: length = train on a judge that prefers long captions (tokens / --max-new-tokens) instead "
             "of the reader's accuracy, which is still logged; none = the CapRL reward",
    "lr": "AdamW learning rate (on fp32 master weights)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "schedule": "learning rate after warm-up: constant, or cosine down to 0 at the last step",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping threshold (L2 norm over all parameters)",
    "max_skipped_steps": "stop the run after this many optimizer steps in a row were skipped for a non-finite "
                         "gradient norm (the last checkpoint stays the last good one)",
    "micro_batch_size": "captions per forward/backward pass of the update; with --shared-prefix a multiple of G "
                        "computes each prompt once (a group split between micro-batches computes it in each part)",
    "shared_prefix": "update forward: each image's prompt and image once, followed by its captions (each caption "
                     "attends to the prompt and itself); false = one padded prompt + caption row per caption",
    "num_iterations": "policy updates per rollout batch (GRPO's mu)",
    "epsilon": "lower clip range of the probability ratio",
    "epsilon_high": "upper clip range (DAPO's clip-higher: 0.28); not given: epsilon",
    "aggregation": "how token losses are averaged: over all tokens, per caption then over captions, or by a "
                   "constant (Dr.GRPO)",
    "beta": "weight of the k3 KL to the initial policy (0 = none, and no reference model is loaded)",
    "mask_truncated": "drop captions cut at max_new_tokens from the loss",
    "rollout_correction": "sampler/trainer mismatch correction: tis = truncated importance weights, mis = mask "
                          "tokens above the cap, none = ratio against the sampler's log-probs",
    "rollout_correction_level": "correction weights per token or per caption",
    "rollout_correction_cap": "the correction's cap on the importance weight",
    "output_dir": "run directory; not given: runs/<date-time>",
    "sample_every": "write sample captions to samples.jsonl every this many steps",
    "checkpoint_every": "save a checkpoint every this many steps (and at the last step)",
    "keep_last": "checkpoints kept",
    "plot_every": "redraw plot.png every this many steps (and at exit); not given: at each checkpoint",
    "progress": "show the progress bar",
    "eval_every": "held-out evaluation every this many steps, at step 0 and at the last step, after the step's "
                  "update (the policy its checkpoint would hold): mean reader accuracy over every question, fact "
                  "precision and recall where the data knows them, as heldout_* keys of metrics.jsonl (0 = off)",
    "eval_data": "held-out dataset JSONL for --eval-every; not given: the miniature world's 64 held-out images",
    "report_to": "also log every numeric metric of each step to tensorboard (RUN_DIR/tensorboard) or wandb "
                 "(WANDB_MODE=offline honoured; RUN_DIR/wandb unless WANDB_DIR is set), or a comma list of both; "
                 "metrics.jsonl is written either way",
    "wandb_project": "W&B project for --report-to wandb; not given: caprl-core (the run is named after RUN_DIR)",
    "steps": "training steps",
    "seed": "seed of data order, sampling, question draws and the tiny models",
}  # fmt: skip
CHOICES = {
    "reward_preset": REWARD_PRESETS,
    "dtype": tuple(DTYPES), "on_error": ("skip", "raise"), "mode": ("hard", "soft"), "advantage": ("grpo", "rloo"),
    "scale": ("group", "batch", "none"), "schedule": ("constant", "cosine"), "aggregation": AGGREGATIONS,
    "rollout_correction": ROLLOUT_CORRECTIONS, "rollout_correction_level": CORRECTION_LEVELS,
    "length_combine": LENGTH_COMBINES, "judge": JUDGES,
}  # fmt: skip


def _read_file(path: Path) -> dict[str, Any]:
    """Flat {name: value} from a TOML or JSON file whose names are flat or grouped by section."""
    if not path.is_file():
        raise ValueError(f"--config: {path} does not exist")
    try:
        if path.suffix == ".toml":
            import tomllib  # Python >= 3.11

            raw = tomllib.loads(path.read_text())
        else:
            raw = json.loads(path.read_text())
    except ValueError as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"--config: {path}: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            for name, v in value.items():
                if name not in FIELDS or FIELDS[name][0] != key:
                    raise ValueError(f"--config: {path}: unknown option {key}.{name}")
                flat[name] = _checked(name, v, f"--config: {path}: {key}.{name}")
        elif key in FIELDS:
            flat[key] = _checked(key, value, f"--config: {path}: {key}")
        else:
            raise ValueError(f"--config: {path}: unknown option {key!r}")
    return flat


# Options whose default is None and whose value is text: a path or a name.
TEXT_OPTIONS = ("policy", "reader", "data", "output_dir", "eval_data", "wandb_project")
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _field_types(name: str) -> tuple[type, ...]:
    """The types a field's annotation allows (`float | None` -> (float, NoneType)); annotations are strings here."""
    annotation = FIELDS[name][1].type
    return tuple(_TYPES[part.strip()] for part in str(annotation).split("|"))


FIELD_TYPES = {name: _field_types(name) for name in FIELDS}  # at import: a field of another type must extend _TYPES


def _checked(name: str, value: Any, where: str) -> Any:
    """`value` from a config file if its type fits field `name` (an int is fine for a float: TOML's `lr = 1`), else a
    ValueError starting with `where`. bool is never taken for int or float (`steps = true` is a mistake)."""
    types = FIELD_TYPES[name]
    if isinstance(value, bool):
        ok = bool in types
    elif isinstance(value, int):
        ok = int in types or float in types
        value = value if int in types or not ok else float(value)
    else:
        ok = isinstance(value, tuple(t for t in types if t is not bool))
    if not ok:
        expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ValueError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
    return value


def _parse_value(name: str, text: str) -> Any:
    default = _get(TrainConfig(), name)
    kind = type(default) if default is not None else next(t for t in FIELD_TYPES[name] if t is not type(None))
    if name in TEXT_OPTIONS:
        kind = str
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{_flag(name)}: expected true/false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{_flag(name)}: expected {kind.__name__}, got {text!r}") from None


def _metavar(name: str) -> str:
    if name in CHOICES:
        return "{" + ",".join(CHOICES[name]) + "}"
    kinds = [t for t in FIELD_TYPES[name] if t is not type(None)]
    if name in TEXT_OPTIONS:
        return "FILE" if name.endswith("data") else "TEXT" if name == "wandb_project" else "DIR"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}[kinds[0]]


def _default_text(name: str) -> str:
    """The help's "(default: ...)": the recipe's default, and the tiny run's when it differs; empty for options whose
    description says what happens when they are not given (default None)."""
    value = _get(TrainConfig(), name)
    if value is None:
        return ""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if name in WORLD_DEFAULTS:
        text += f"; a miniature-world policy: {WORLD_DEFAULTS[name]}"
    return f" (default: {text})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m caprl_core.train",
        description="CapRL: GRPO training of an image captioner with a reader-LLM reward. With no arguments: the "
        "shipped miniature world (a trained reader, a terse start policy, its train images; a few minutes on a "
        "CPU). Options are also read from --config (TOML or JSON, the same names, flat or by section); flags "
        "override the file.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML or JSON file of options")
    parser.add_argument("--resume", nargs="?", const="always", default=None, metavar="if-exists",
                        help="continue the run in --output-dir from its last complete checkpoint, with the run's saved "
                        "configuration (flags may change only what does not change the run: --steps, logging, "
                        "checkpoint and plot cadence); no checkpoint there is an error, unless `--resume if-exists`, "
                        "which then starts a fresh run")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="delete the run already in --output-dir (its logs, "
                        "plot, config.json and checkpoints; nothing else) and start a fresh one")  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON "
                        "and exit")  # fmt: skip
    groups = {section: parser.add_argument_group(section or "run") for section in (*SECTIONS, None)}
    for name, (section, _) in FIELDS.items():
        groups[section].add_argument(_flag(name), dest=name, default=None, metavar=_metavar(name),
                                     help=HELP[name] + _default_text(name))  # fmt: skip
    return parser


@dataclass
class Command:
    """What the command line asks for. resume: None, "always" (--resume) or "if-exists"; given: the options the
    user set (flags and --config file), parsed; a resumed run may change only some (`caprl_core.rl.lifecycle`)."""

    config: TrainConfig
    resume: str | None
    overwrite: bool
    given: dict[str, Any]
    print_config: bool = False  # with --resume: print the configuration the resume would run with, and exit


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """(config, resume) from the command line (see `parse_command`)."""
    command = parse_command(argv)
    return command.config, command.resume


def parse_command(argv: list[str] | None = None) -> Command:
    """The resolved config and run options from the command line; ValueError naming the option on a bad value. With
    --print-config, prints the resolved configuration as JSON and exits (SystemExit 0); with --resume too, the
    caller prints the configuration the resume runs with (`Command.print_config`): the run's saved one, which only
    `caprl_core.rl.lifecycle.plan` knows."""
    args = build_parser().parse_args(argv)
    values = _read_file(args.config) if args.config is not None else {}
    for name in FIELDS:
        text = getattr(args, name)
        if text is not None:
            values[name] = _parse_value(name, text)
    config = TrainConfig()
    defaults, why = policy_defaults(values.get("policy"))
    if defaults == "world":
        for name, value in WORLD_DEFAULTS.items():
            _set(config, name, value)
    if values.get("reward_preset") == "recipe":
        for name, value in RECIPE_PRESET.items():
            _set(config, name, value)
    for name, value in values.items():
        _set(config, name, value)
    validate(config)
    if args.print_config and args.resume is None:
        print_config(config, f"defaults: {defaults} ({why})")
        raise SystemExit(0)
    if args.resume not in (None, "always", "if-exists"):
        raise ValueError(f"--resume: expected no value or if-exists, got {args.resume!r}")
    if args.resume and config.log.output_dir is None:
        raise ValueError("--resume: needs --output-dir (the run directory to continue); without it a fresh run would "
                         "start in a new runs/<date-time>")  # fmt: skip
    if args.resume and args.overwrite:
        raise ValueError("--overwrite: cannot be combined with --resume (one deletes the run the other continues)")
    return Command(config, args.resume, args.overwrite, values, print_config=args.print_config)


def print_config(config: TrainConfig, origin: str) -> None:
    """--print-config: the configuration as JSON on stdout (what --config reads back), where it came from on stderr."""
    print(f"# {origin}", file=sys.stderr)
    print(json.dumps(config.to_dict(), indent=2))
