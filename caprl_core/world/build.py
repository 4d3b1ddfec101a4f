"""Building the miniature world's models: `python -m caprl_core.world build --out DIR`.

Writes DIR/reader, DIR/policy and DIR/vqa as Hugging Face directories (model.safetensors, config.json, tokenizer
files with the chat template; the policy and the VQA model also preprocessor_config.json, the VQA model its question
template caprl_vqa_prompt.json), and DIR/card.json with what the build measured on scenes none of them was trained on:
the reader's accuracy from reference, terse and empty captions, the start policy's caption precision and recall (the
part "check" of `world.splits`), the VQA model's accuracies and the curation filter's decisions on held-out candidate
questions (the part "heldout"); and the time of each phase.
The VQA stage runs last, from DIR/policy as written, with its own random streams, so that it changes nothing of the
reader or the policy, and `build --only vqa --out DIR` reruns it alone on an existing build (`build_vqa`).
Deterministic for a given torch build and thread count: the same seed gives the same weights.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from caprl_core.models import TINY_CHAT_TEMPLATE, tiny_tokenizer
from caprl_core.policy import PolicyPrompter, tiny_image_processor
from caprl_core.reward_prompts import save_prompt_template
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import SamplingParams
from caprl_core.world import IMAGE_SIZE, SPLIT_SEEDS
from caprl_core.world.grammar import caption_fact_counts, terse_caption
from caprl_core.world.policy import make_policy, train_policy
from caprl_core.world.reader import WORLD_TEMPLATE, make_reader, reader_accuracy, train_reader
from caprl_core.world.scenes import describe, draw_scene, scene_questions
from caprl_core.world.splits import sample_scene


@dataclass
class BuildConfig:
    """Sizes and budgets of a build. The defaults made the shipped models."""

    reader_steps: int = 2500
    reader_batch: int = 32
    reader_lr: float = 3e-3
    reader_hidden: int = 64
    reader_layers: int = 4
    # Qwen2's default initializer_range 0.02 suits hidden sizes near 768; at 64 it leaves the query-key products so
    # small that the caption lookup sat on a plateau (reference accuracy 55% after 1,000 steps of batch 32); at 0.1
    # (about 1/sqrt(64)) the same run passed 95% at step 2,000.
    reader_init_std: float = 0.1
    policy_steps: int = 450
    policy_batch: int = 32
    policy_lr: float = 3e-3
    policy_hidden: int = 64
    policy_layers: int = 4
    eval_pairs: int = 400  # (caption, question) pairs of the reader's check
    eval_images: int = 64  # images of the policy's check
    # The VQA model (`world.vqa`): the policy's vision tower and the reader's language model, fine-tuned in two
    # stages (`vqa_train.train_vqa`: read, then see); measured on vqa_eval_images held-out images, two candidate
    # questions each (half of them leaky).
    vqa_read_steps: int = 3500
    vqa_read_lr: float = 3e-3
    vqa_see_steps: int = 1500
    vqa_see_lr: float = 1e-2
    vqa_batch: int = 16  # questions of a read step; a see step takes twice as many images
    vqa_eval_images: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name != "seed" and not value > 0:
                raise ValueError(f"{name}: expected > 0, got {value!r}")


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def build(out_dir: str | Path, config: BuildConfig | None = None, *, progress: bool = True) -> dict:
    """Train and write both models under out_dir (see the module docstring); returns the card."""
    config = config or BuildConfig()
    out_dir = Path(out_dir)
    card: dict = {"config": asdict(config), "seconds": {}}
    # The reader reads raw prompts (no chat turns: `world_reward`), so its directory's tokenizer has no chat template
    # and CapRLReward prompts it the same way; the policy's prompt is a chat turn.
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    reader = make_reader(tokenizer, hidden_size=config.reader_hidden, num_layers=config.reader_layers,
                         seed=config.seed, init_std=config.reader_init_std)  # fmt: skip
    with _bar(config.reader_steps, "reader", progress) as bar:

        def log(step, losses, accuracy):
            bar.update(1)
            bar.set_postfix(loss=f"{losses['answer']:.3f}", look=f"{losses['look']:.3f}", acc=f"{accuracy:.2f}")

        train_reader(reader, tokenizer, steps=config.reader_steps, batch_size=config.reader_batch,
                     lr=config.reader_lr, seed=SPLIT_SEEDS["reader"] + config.seed, log=log)  # fmt: skip
    card["seconds"]["reader"] = round(time.perf_counter() - started, 1)
    card["reader"] = check_reader(reader, tokenizer, config.eval_pairs)
    save_model_dir(reader, tokenizer, out_dir / "reader")
    save_prompt_template(WORLD_TEMPLATE, out_dir / "reader")

    started = time.perf_counter()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    prompter = PolicyPrompter(tokenizer, tiny_image_processor())
    policy = make_policy(tokenizer, hidden_size=config.policy_hidden, num_layers=config.policy_layers,
                         seed=config.seed)  # fmt: skip
    with _bar(config.policy_steps, "policy", progress) as bar:

        def log_policy(step, loss):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        train_policy(policy, prompter, steps=config.policy_steps, batch_size=config.policy_batch, lr=config.policy_lr,
                     seed=SPLIT_SEEDS["policy"] + config.seed, log=log_policy)  # fmt: skip
    card["seconds"]["policy"] = round(time.perf_counter() - started, 1)
    card["policy"] = check_policy(policy, prompter, config.eval_images)
    save_model_dir(policy, tokenizer, out_dir / "policy", image_processor=prompter.image_processor)
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return build_vqa(out_dir, config, progress=progress)


def build_vqa(out_dir: str | Path, config: BuildConfig | None = None, *, progress: bool = True) -> dict:
    """The VQA stage of a build (`world.vqa`): join DIR/policy's vision tower and DIR/reader's language model
    (`vqa.make_vqa`), fine-tune that into DIR/vqa, measure it on held-out candidate
    questions and record that in DIR/card.json (its "vqa" section, config and seconds); returns the card. Runs alone on
    any existing build (`python -m caprl_core.world build --only vqa --out DIR`): the reader and the policy are read,
    never retrained."""
    from caprl_core.curate.prompts import save_vqa_template
    from caprl_core.policy import load_policy, load_reader
    from caprl_core.world.vqa import WORLD_VQA_TEMPLATE, heldout_items, make_vqa, measure, world_prompter
    from caprl_core.world.vqa_train import Stage, train_vqa

    config = config or BuildConfig()
    out_dir = Path(out_dir)
    card_path = out_dir / "card.json"
    if not card_path.is_file() or not all((out_dir / role / "config.json").is_file() for role in ("reader", "policy")):
        raise ValueError(f"out: {out_dir} holds no build (card.json, reader/, policy/); run the full build first")
    card = json.loads(card_path.read_text())
    for name in [f for f in asdict(config) if f.startswith("vqa_")]:
        card["config"][name] = getattr(config, name)
    for gone in ("vqa_steps", "vqa_lr", "vqa_language_lr_scale", "vqa_cell_weight"):  # the one-stage recipe's
        card["config"].pop(gone, None)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    policy, tokenizer, image_processor = load_policy(out_dir / "policy", dtype=torch.float32)
    reader, _ = load_reader(out_dir / "reader", dtype=torch.float32)
    model = make_vqa(reader, policy)
    tokenizer.chat_template = None  # the reader's raw prompts (WORLD_VQA_TEMPLATE), not the policy's chat turn
    prompter = world_prompter(tokenizer, image_processor)
    stages = {name: Stage(name, getattr(config, f"vqa_{name}_steps"), config.vqa_batch * (2 if name == "see" else 1),
                          getattr(config, f"vqa_{name}_lr")) for name in ("read", "see")}  # fmt: skip
    with _bar(sum(x.steps for x in stages.values()), "vqa", progress) as bar:

        def log(stage, step, loss, parts):
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{loss:.3f}")

        train_vqa(model, prompter, **stages, seed=SPLIT_SEEDS["vqa"] + config.seed, log=log)
    card["seconds"]["vqa"] = round(time.perf_counter() - started, 1)
    card["vqa"] = measure(model, prompter, heldout_items(config.vqa_eval_images, SPLIT_SEEDS["vqa_eval"]))
    save_model_dir(model, tokenizer, out_dir / "vqa", image_processor=image_processor)
    save_vqa_template(WORLD_VQA_TEMPLATE, out_dir / "vqa")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card


def save_model_dir(model, tokenizer, directory: Path, image_processor=None) -> None:
    """Save a world model as a Hugging Face directory (weights, config, tokenizer without a separate chat-template
    file, the image processor if any), with its generation config's eos and pad ids set from the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory, save_jinja_files=False)
    if image_processor is not None:
        image_processor.save_pretrained(directory)


def check_draws(name: str, num: int) -> tuple[random.Random, list]:
    """The scenes of a check (`name` "reader_eval" or "policy_eval"), all of the part "check" of the scene space
    (`splits.PARTS`), and the random stream that drew them."""
    rng = random.Random(SPLIT_SEEDS[name])
    return rng, [sample_scene(rng, "check") for _ in range(num)]


def check_reader(reader, tokenizer, num_pairs: int) -> dict:
    """The reader's accuracy on (caption, question) pairs of scenes it was not trained on: from reference captions,
    from terse ones (the first cell only), from empty ones; and how often it agrees with what the caption implies."""
    rng, scenes = check_draws("reader_eval", num_pairs)
    questions = [scene_questions(s, rng, 1)[0] for s in scenes]
    out = {}
    for name, captions in (("reference", [describe(s) for s in scenes]),
                           ("terse", [terse_caption(s, 1) for s in scenes]), ("empty", [""] * num_pairs)):  # fmt: skip
        accuracy, agreement = reader_accuracy(reader, tokenizer, captions, questions)
        out[name] = {"accuracy": round(accuracy, 4), "agrees_with_caption": round(agreement, 4)}
    return out


@torch.no_grad()
def check_policy(policy, prompter: PolicyPrompter, num_images: int) -> dict:
    """The policy's captions of scenes it was not trained on (4 per image, temperature 1): fact precision and recall."""
    _, scenes = check_draws("policy_eval", num_images)
    tok = prompter.tokenizer
    engine = Engine(policy, kv_cache_tokens=1 << 14)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=64, stop_token_ids=(tok.eos_token_id,), seed=0)
    outs = engine.generate([prompter(draw_scene(s, IMAGE_SIZE)) for s in scenes], params)
    captions = [tok.decode(c.token_ids, skip_special_tokens=True).strip() for out in outs for c in out]
    references = [describe(s) for s in scenes for _ in range(4)]
    true, claims, stated, facts = caption_fact_counts(captions, references)
    return {"fact_precision": round(true / max(claims, 1), 4), "fact_recall": round(stated / facts, 4),
            "examples": captions[:8]}  # fmt: skip
