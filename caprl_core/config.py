"""Training configuration: small dataclasses, set from defaults < a TOML/JSON file < command-line flags.

Every field is a flag of `python -m caprl_core.train` with dashes (`group_size` -> `--group-size`). A config file
holds the same names, flat or under their section (`[rollout] group_size = 8`). Defaults follow the CapRL recipe
for real models (G = 8 captions per image, N = 8 questions drawn per caption, lr 1e-6 with warm-up, temperature
1.0, no KL). Without --policy the run trains the shipped miniature-world start policy (`caprl_core.world`) on the
world's data, and the fields in `WORLD_DEFAULTS` that the user did not set take the values measured best there, so
the whole run takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caprl_core.grpo import AGGREGATIONS, CORRECTION_LEVELS, ROLLOUT_CORRECTIONS
from caprl_core.policy import DEFAULT_INSTRUCTION, DTYPES, TINY_RANDOM
from caprl_core.reward_recipe import RECIPE_LENGTH_L1, RECIPE_LENGTH_L2, RECIPE_LENGTH_WEIGHT, RECIPE_READER_TEMPERATURE


@dataclass
class ModelConfig:
    policy: str | None = None  # local Hugging Face directory (e.g. Qwen2.5-VL-3B-Instruct); None = the shipped one
    reader: str | None = None  # local directory of the reader LLM (e.g. Qwen2.5-3B-Instruct); None = the shipped one
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto = cuda when available
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    data: str | None = None  # JSONL (see caprl_core.data); None = the miniature world's train split
    on_error: str = "skip"  # bad dataset lines: skip (with one warning) or raise
    synthetic_images: int = 256


@dataclass
class RolloutConfig:
    images_per_step: int = 16
    group_size: int = 8  # G: captions sampled per image
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    kv_cache_tokens: int | None = None  # the policy's sampler; None = the engine's default
    reader_kv_cache_tokens: int | None = None  # the reward reader's prefill cache; None = the engine's default
    instruction: str = DEFAULT_INSTRUCTION


@dataclass
class RewardSection:
    # "recipe" = the published CapRL reward server (caprl_core.reward_config.RewardConfig.recipe): its prompt, the
    # reader at T = 0.6, soft mode over the whole vocabulary, and accuracy + 0.2 x (1 up to 2,048 caption tokens, 0
    # from 3,072) as one score; explicit options win.
    reward_preset: str = "default"
    num_draws: int = 8  # N: questions drawn per caption
    mode: str = "hard"  # hard | soft
    reader_temperature: float = 1.0  # the reader's softmax temperature (soft mode)
    advantage: str = "grpo"  # grpo | rloo
    scale: str = "group"  # group | batch | none (Dr.GRPO: none)
    length_weight: float = 0.0  # weight of the caption-length term (0 = off): 1 up to length_l1, 0 from length_l2
    length_l1: int = 400
    length_l2: int = 600
    # How the length term enters the advantage: decoupled = each column normalised in its group, then weighted
    # (GDPO-style); sum = accuracy + length_weight x R_len as one score, normalised in the group (the recipe's server).
    length_combine: str = "decoupled"
    # The same question draws and option shuffles for all G captions of an image (their rewards then differ by the
    # captions only), instead of draws of their own.
    shared_draws: bool = False
    # A control, not for training: rewards shuffled across the batch's captions before the advantages, so that any
    # gain of such a run is not the reward's doing.
    shuffle_rewards: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-6
    warmup_steps: int = 10
    schedule: str = "constant"  # constant | cosine (after warm-up)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_skipped_steps: int = 3  # optimizer steps in a row skipped for a non-finite gradient norm that stop the run
    micro_batch_size: int = 8
    # The update's forward packs each image's prompt once with its captions (caprl_core.shared_prefix); False runs
    # one padded prompt + caption row per caption (the reference). A micro-batch holds the same captions either way.
    shared_prefix: bool = True
    num_iterations: int = 1  # policy updates per rollout batch
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None = epsilon; DAPO's clip-higher: 0.28
    aggregation: str = "token-mean"
    beta: float = 0.0  # KL to the initial policy (k3); 0 loads no reference model
    mask_truncated: bool = False
    # Sampler/trainer mismatch correction (caprl_core.grpo.rollout_correction_weights): none | tis | mis, per token or
    # per sequence, weights capped (tis) or masked (mis) above the cap.
    rollout_correction: str = "tis"
    rollout_correction_level: str = "token"
    rollout_correction_cap: float = 2.0


@dataclass
class LogConfig:
    output_dir: str | None = None  # None = runs/<date-time>
    sample_every: int = 5
    checkpoint_every: int = 10
    keep_last: int = 3
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardSection = field(default_factory=RewardSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    steps: int = 200
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "rollout", "reward", "optim", "log")
# The miniature world's run (no --policy: the shipped start policy, reader and train split): batches and captions
# sized to the world (a full caption is 19 tokens), and the reward mode, learning rate and steps measured best there
# (docs/world.md, "How the defaults were chosen": the soft reward kept precision within 0.02 of the start on all three
# seeds, the hard one on one of three; lr 1e-4 as fast as 2e-4 with less drift, 5e-4 lost precision; 40 steps reach
# the plateau).
WORLD_DEFAULTS = {
    "images_per_step": 8, "max_new_tokens": 32, "num_draws": 4, "mode": "soft", "lr": 1e-4, "warmup_steps": 2,
    "micro_batch_size": 64, "synthetic_images": 256, "steps": 40, "sample_every": 5, "checkpoint_every": 10,
}  # fmt: skip


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
    "progress": "show the progress bar",
    "steps": "training steps",
    "seed": "seed of data order, sampling, question draws and the tiny models",
}  # fmt: skip
# What --reward-preset recipe sets (caprl_core.reward_recipe's RECIPE_* constants), under the options given explicitly.
RECIPE_PRESET = {
    "num_draws": 8, "mode": "soft", "reader_temperature": RECIPE_READER_TEMPERATURE,
    "length_weight": RECIPE_LENGTH_WEIGHT, "length_l1": RECIPE_LENGTH_L1, "length_l2": RECIPE_LENGTH_L2,
    "length_combine": "sum",
}  # fmt: skip
REWARD_PRESETS = ("default", "recipe")
LENGTH_COMBINES = ("decoupled", "sum")
CHOICES = {
    "reward_preset": REWARD_PRESETS,
    "dtype": tuple(DTYPES), "on_error": ("skip", "raise"), "mode": ("hard", "soft"), "advantage": ("grpo", "rloo"),
    "scale": ("group", "batch", "none"), "schedule": ("constant", "cosine"), "aggregation": AGGREGATIONS,
    "rollout_correction": ROLLOUT_CORRECTIONS, "rollout_correction_level": CORRECTION_LEVELS,
    "length_combine": LENGTH_COMBINES,
}  # fmt: skip


def _fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every settable name -> (its section or None for top level, its field)."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            for sub in dataclasses.fields(f.default_factory()):
                out[sub.name] = (f.name, sub)
        else:
            out[f.name] = (None, f)
    return out


FIELDS = _fields()


def _set(config: TrainConfig, name: str, value: Any) -> None:
    section, _ = FIELDS[name]
    setattr(getattr(config, section) if section else config, name, value)


def _get(config: TrainConfig, name: str) -> Any:
    section, _ = FIELDS[name]
    return getattr(getattr(config, section) if section else config, name)


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_value(name: str, text: str) -> Any:
    default = _get(TrainConfig(), name)
    kind = type(default) if default is not None else (int if name.endswith("kv_cache_tokens") else float)
    if name in ("policy", "reader", "data", "output_dir"):
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
    if name in ("policy", "reader", "data", "output_dir"):
        return "DIR" if name != "data" else "FILE"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}[kinds[0]]


def _default_text(name: str) -> str:
    """The help's "(default: ...)": the recipe's default, and the tiny run's when it differs; empty for options whose
    description says what happens when they are not given (default None)."""
    value = _get(TrainConfig(), name)
    if value is None:
        return ""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if name in WORLD_DEFAULTS:
        text += f"; without --policy {WORLD_DEFAULTS[name]}"
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
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in "
                        "--output-dir")  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON "
                        "and exit")  # fmt: skip
    groups = {section: parser.add_argument_group(section or "run") for section in (*SECTIONS, None)}
    for name, (section, _) in FIELDS.items():
        groups[section].add_argument(_flag(name), dest=name, default=None, metavar=_metavar(name),
                                     help=HELP[name] + _default_text(name))  # fmt: skip
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """(config, resume) from the command line; ValueError naming the option on a bad value. With --print-config,
    prints the resolved configuration as JSON and exits (SystemExit 0)."""
    args = build_parser().parse_args(argv)
    values = _read_file(args.config) if args.config is not None else {}
    for name in FIELDS:
        text = getattr(args, name)
        if text is not None:
            values[name] = _parse_value(name, text)
    config = TrainConfig()
    if values.get("policy") is None:
        for name, value in WORLD_DEFAULTS.items():
            _set(config, name, value)
    if values.get("reward_preset") == "recipe":
        for name, value in RECIPE_PRESET.items():
            _set(config, name, value)
    for name, value in values.items():
        _set(config, name, value)
    validate(config)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        raise SystemExit(0)
    if args.resume and config.log.output_dir is None:
        raise ValueError("--resume: needs --output-dir (the run directory to continue); without it a fresh run would "
                         "start in a new runs/<date-time>")  # fmt: skip
    return config, args.resume


def _is_world_policy(policy: str | None) -> bool:
    """Whether `policy` is the miniature world's own (not given, or its shipped directory) or the tiny random one."""
    from caprl_core.world import SHIPPED

    return policy is None or policy == TINY_RANDOM or Path(policy).resolve() == (SHIPPED / "policy").resolve()


def _check_world_defaults(config: TrainConfig) -> None:
    """The shipped reader and the world's data are defaults for the world's own policy only: a real policy trained
    against a 64-wide reader on the world's shapes would run without a word, and learn nothing it should."""
    if _is_world_policy(config.model.policy):
        return
    for name in ("reader", "data"):
        if _get(config, name) is None:
            raise ValueError(f"{_flag(name)}: required with --policy {config.model.policy} (the shipped miniature "
                             f"world's {name} is the default for its own policy and tiny-random only)")  # fmt: skip


def validate(config: TrainConfig) -> None:
    """ValueError naming the first bad option."""

    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{_flag(name)}: {what}, got {_get(config, name)!r}")

    for name in ("policy", "reader", "data"):
        value = _get(config, name)
        tiny = name != "data" and value == TINY_RANDOM  # the random pair: no directory
        need(value is None or tiny or Path(value).exists(), name, "path does not exist")
    _check_world_defaults(config)
    r, o, g, lg = config.rollout, config.optim, config.reward, config.log
    need(r.group_size >= 2, "group_size", "must be >= 2 (advantages compare captions of one image)")
    need(r.images_per_step >= 1, "images_per_step", "must be >= 1")
    need(r.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    need(r.temperature > 0, "temperature", "must be > 0 (sampling)")
    need(0 < r.top_p <= 1, "top_p", "must be in (0, 1]")
    need(r.top_k >= 0, "top_k", "must be >= 0 (0 = off)")
    need(r.kv_cache_tokens is None or r.kv_cache_tokens >= 1, "kv_cache_tokens", "must be >= 1")
    need(r.reader_kv_cache_tokens is None or r.reader_kv_cache_tokens >= 1, "reader_kv_cache_tokens", "must be >= 1")
    need(g.reward_preset in REWARD_PRESETS, "reward_preset", f"one of {'|'.join(REWARD_PRESETS)}")
    need(g.num_draws >= 1, "num_draws", "must be >= 1")
    need(g.reader_temperature > 0, "reader_temperature", "must be > 0")
    need(g.mode in ("hard", "soft"), "mode", "must be hard or soft")
    need(g.advantage in ("grpo", "rloo"), "advantage", "must be grpo or rloo")
    need(g.scale in ("group", "batch", "none"), "scale", "must be group, batch or none")
    need(g.length_weight >= 0, "length_weight", "must be >= 0")
    need(0 < g.length_l1 < g.length_l2, "length_l2", "length_l1 < length_l2 (both > 0)")
    need(g.length_combine in LENGTH_COMBINES, "length_combine", f"one of {'|'.join(LENGTH_COMBINES)}")
    need(o.lr > 0, "lr", "must be > 0")
    need(o.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(o.schedule in ("constant", "cosine"), "schedule", "must be constant or cosine")
    need(o.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(o.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    need(o.max_skipped_steps >= 1, "max_skipped_steps", "must be >= 1")
    need(o.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
    need(o.num_iterations >= 1, "num_iterations", "must be >= 1")
    need(o.epsilon > 0, "epsilon", "must be > 0")
    need(o.epsilon_high is None or o.epsilon_high >= o.epsilon, "epsilon_high", "must be >= epsilon")
    need(o.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}")
    need(o.beta >= 0, "beta", "must be >= 0")
    need(o.rollout_correction in ROLLOUT_CORRECTIONS, "rollout_correction", f"one of {'|'.join(ROLLOUT_CORRECTIONS)}")
    need(o.rollout_correction_level in CORRECTION_LEVELS, "rollout_correction_level",
         f"one of {'|'.join(CORRECTION_LEVELS)}")  # fmt: skip
    need(o.rollout_correction_cap > 0, "rollout_correction_cap", "must be > 0")
    need(config.data.on_error in ("skip", "raise"), "on_error", "must be skip or raise")
    need(config.data.synthetic_images >= 1, "synthetic_images", "must be >= 1")
    need(config.steps >= 1, "steps", "must be >= 1")
    need(lg.sample_every >= 1, "sample_every", "must be >= 1")
    need(lg.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
    need(lg.keep_last >= 1, "keep_last", "must be >= 1")
    need(config.model.dtype in DTYPES, "dtype", f"one of {'|'.join(DTYPES)}")
    # fp16 would need dynamic loss scaling: 51.6% of a tiny Qwen2's non-zero fp32 gradients underflowed to 0 at the
    # recipe's per-token weights (issue 22). bf16 has fp32's range and runs wherever fp16 training is worth doing.
    need(config.model.dtype != "float16", "dtype", "float16 trains without loss scaling; use bfloat16")
