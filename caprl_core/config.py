"""Training configuration: small dataclasses, one per section, their defaults and their validation.

Every field is a flag of `python -m caprl_core.train` with dashes (`group_size` -> `--group-size`); the command line
and the --config file that set them are `caprl_core.config_cli` (defaults < a TOML/JSON file < command-line flags).
Defaults follow the CapRL recipe for real models (G = 8 captions per image, N = 8 questions drawn per caption, lr 1e-6
with warm-up, temperature 1.0, no KL). Without --policy the run trains the shipped miniature-world start policy
(`caprl_core.world`) on the world's data, and the fields in `WORLD_DEFAULTS` that the user did not set take the values
measured best there, so the whole run takes a few minutes on a CPU; `RECIPE_PRESET` is what --reward-preset recipe
sets. `FIELDS` maps every settable name to its section and field; `validate` rejects a bad configuration.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caprl_core.grpo import AGGREGATIONS, CORRECTION_LEVELS, ROLLOUT_CORRECTIONS
from caprl_core.policy import DEFAULT_INSTRUCTION, DTYPES, TINY_RANDOM, resolve_latest
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
    # An ablation, not for training: "length" trains on a judge that prefers long captions (caption tokens over
    # --max-new-tokens) instead of the reader's accuracy, which is still measured and logged. The CapRL paper's
    # judge-model rewards were hacked this way (Fig. 1, Table 3); caprl_core.world.ablations compares the two.
    judge: str = "none"


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
    plot_every: int | None = None  # redraw plot.png every this many steps; None = at each checkpoint (and at exit)
    progress: bool = True
    # Held-out evaluation (caprl_core.rl.heldout) every eval_every steps, at step 0 and at the last step; 0 = off.
    eval_every: int = 0
    eval_data: str | None = None  # JSONL; None = the miniature world's held-out split (the world's own data only)
    report_to: str = "none"  # also log each step's numbers to: none | tensorboard | wandb, or a comma list
    wandb_project: str | None = None  # None = caprl-core


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


# What --reward-preset recipe sets (caprl_core.reward_recipe's RECIPE_* constants), under the options given explicitly.
RECIPE_PRESET = {
    "num_draws": 8, "mode": "soft", "reader_temperature": RECIPE_READER_TEMPERATURE,
    "length_weight": RECIPE_LENGTH_WEIGHT, "length_l1": RECIPE_LENGTH_L1, "length_l2": RECIPE_LENGTH_L2,
    "length_combine": "sum",
}  # fmt: skip
REWARD_PRESETS = ("default", "recipe")
REPORT_TARGETS = ("none", "tensorboard", "wandb")
LENGTH_COMBINES = ("decoupled", "sum")
JUDGES = ("none", "length")


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def policy_defaults(policy: str | None) -> tuple[str, str]:
    """Which defaults a run of `policy` takes, "world" or "recipe", and why (--print-config says it).

    The world's defaults (`WORLD_DEFAULTS`, the shipped reader and data) belong to the miniature world's policies: none
    given, the shipped start policy, or a checkpoint of a run that trained one. A checkpoint carries its run's
    configuration in trainer_state/state.json, the marker followed here (through checkpoints of checkpoints); any other
    model, tiny-random included, gets the real-model recipe's defaults.
    """
    from caprl_core.checkpoint import STATE_DIR
    from caprl_core.world import SHIPPED

    start = policy
    for _ in range(16):  # a chain of resumed-from checkpoints; a longer one is not a world run anyone made
        if policy is None:
            why = "no --policy" if start is None else f"--policy {start} is a checkpoint of a miniature-world run"
            return "world", f"{why}: the miniature world's batch sizes, reward and learning rate"
        if policy == TINY_RANDOM:
            break
        path = resolve_latest(policy)  # a run's checkpoints/latest: the checkpoint it names
        if path.resolve() == (SHIPPED / "policy").resolve():
            policy = None
            continue
        state = path / STATE_DIR / "state.json"
        if not state.is_file():
            break
        try:
            saved = json.loads(state.read_text())
            if saved.get("policy_defaults") in ("world", "recipe"):  # written by rl/state.py since issue 23
                return _checkpoint_defaults(saved["policy_defaults"], start)
            policy = saved["config"]["model"]["policy"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            break
    return "recipe", f"--policy {start} is not a miniature-world policy: the CapRL recipe's defaults for real models"


def _checkpoint_defaults(kind: str, policy: str | None) -> tuple[str, str]:
    if kind == "world":
        return "world", (f"--policy {policy} is a checkpoint of a miniature-world run: the miniature world's batch "
                         "sizes, reward and learning rate")  # fmt: skip
    return "recipe", f"--policy {policy} is a checkpoint of a real-model run: the CapRL recipe's defaults"


def _is_world_policy(policy: str | None) -> bool:
    """Whether `policy` is the miniature world's own (`policy_defaults`) or the tiny random one."""
    return policy == TINY_RANDOM or policy_defaults(policy)[0] == "world"


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

    for name in ("policy", "reader", "data", "eval_data"):
        value = _get(config, name)
        tiny = name != "data" and value == TINY_RANDOM  # the random pair: no directory
        need(value is None or tiny or Path(value).exists(), name, "path does not exist")
    _check_world_defaults(config)
    device, out = config.model.device, config.log.output_dir
    need(device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device) is not None, "device",
         "one of auto, cpu, cuda, cuda:N")  # fmt: skip
    need(out is None or not Path(out).exists() or Path(out).is_dir(), "output_dir", "exists and is not a directory")
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
    need(g.judge in JUDGES, "judge", f"must be one of {', '.join(JUDGES)}")
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
    need(lg.plot_every is None or lg.plot_every >= 1, "plot_every", "must be >= 1")
    need(lg.eval_every >= 0, "eval_every", "must be >= 0 (0 = no held-out evaluation)")
    need(lg.eval_data is None or lg.eval_every > 0, "eval_data", "has no use without --eval-every N")
    need(lg.eval_every == 0 or lg.eval_data is not None or config.data.data is None, "eval_data",
         "required with --eval-every and --data (the world's held-out split fits the world's data only)")  # fmt: skip
    targets = lg.report_to.split(",")
    need(all(t in REPORT_TARGETS for t in targets) and ("none" not in targets or targets == ["none"]), "report_to",
         f"one of {'|'.join(REPORT_TARGETS)} or a comma list of {'|'.join(REPORT_TARGETS[1:])}")  # fmt: skip
    need(config.model.dtype in DTYPES, "dtype", f"one of {'|'.join(DTYPES)}")
    # fp16 would need dynamic loss scaling: 51.6% of a tiny Qwen2's non-zero fp32 gradients underflowed to 0 at the
    # recipe's per-token weights (issue 22). bf16 has fp32's range and runs wherever fp16 training is worth doing.
    need(config.model.dtype != "float16", "dtype", "float16 trains without loss scaling; use bfloat16")
