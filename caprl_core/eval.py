"""Prism-style caption evaluation: how many questions about an image a vision-free reader answers from a caption.

    python -m caprl_core.eval --policy DIR --reader DIR --data FILE [--k 4] [--num-draws 8] [--out DIR] ...
    python -m caprl_core.eval            # the shipped miniature-world models on its 64 held-out images
    python -m caprl_core.eval --policy runs/X/checkpoints/step-N   # a trained policy, the shipped reader
    python -m caprl_core.eval --policy DIR --reader DIR --data FILE --preset prism --reward-preset recipe
        # Prism's sampling (4 captions at T = 1.0, top-p 1.0, <= 2,048 tokens) read with the recipe's reader prompt

For every image the policy samples k captions (one `Engine.generate` call per batch of images, n=k). The reader then
answers *every* question of the image once from each caption, through `CapRLReward` with one question per reward
row: each (image, caption, question) becomes its own row whose question pool is that single MCQ, scored with
num_draws=1, so the draw "with replacement" can only pick it and the row's hard reward is exactly 1 (right) or 0.
Rows of one caption share the header and caption tokens, so the reader's prefix cache computes them once.
Options are shuffled (seeded) and a "cannot be answered from the caption" option is appended, as in training; the k
captions of an image see each question with the same option order.

Reported (summary.json, and printed):
- mean_accuracy: per caption, the fraction of its image's questions answered right; averaged over the k captions of
  an image, then over images (each image weighs the same, whatever its number of questions).
- best_of_k: per image, the best of its k captions' accuracies, averaged over images (>= mean_accuracy).
- mean_p_correct: the same average of the reader's probability of the right option (the soft score).
- mean_caption_tokens: generated tokens per caption, a final stop token not counted.
- train_reward: the training reward (num_draws random draws per caption, hard), for comparison; --num-draws 0 skips.
- fact_precision, fact_recall: when every image's reference caption is a complete caption of the miniature world's
  grammar (`caprl_core.world.grammar`), the share of the captions' claims that are true and of the images' facts
  that the captions state, micro-averaged over all captions (None otherwise).
details.jsonl holds one line per image: captions, per-caption accuracy and per-question correctness; plot.png the
distribution of per-image accuracy and accuracy against caption length.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from caprl_core.data import MAX_OPTIONS, DataError, Example, load_image, load_jsonl
from caprl_core.plot import plot_eval
from caprl_core.policy import (
    DTYPES,
    TINY_RANDOM,
    ModelLoadError,
    Models,
    PolicyPrompter,
    caption_tokens,
    load_models,
    stop_token_ids,
)
from caprl_core.reward import DEFAULT_TEMPLATE, CapRLReward, RewardConfig
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import Completion, SamplingParams
from caprl_core.world import make_world_data
from caprl_core.world.grammar import caption_fact_counts

# On CPU the engine's default cache is 10% of MemAvailable: gigabytes of address space for a tiny model. 32k
# tokens hold a batch of 16 images x 4 captions x (prompt + 128 new tokens) of the tiny policy without preemption
# (16 * 4 * (129 + 128) = 16.4k), and the reader's shared header and captions with room to spare.
CPU_KV_CACHE_TOKENS = 1 << 15
# The tiny models' matmuls are too small to gain much from threads, and on a busy 2-core machine OpenMP's barriers
# wait on a descheduled thread. Measured on the 2-core dev machine, no-argument run (time inside main): quiet, 4.1 s
# with 2 threads and 5.4 s with 1; with another process holding a core, 32.6 s with 2 threads and 4.8 s with 1 (16
# images). So small models (under SMALL_MODEL_PARAMETERS) run on one thread (restored afterwards); real
# checkpoints keep torch's setting.
TINY_MODEL_THREADS = 1
# The official Prism evaluation's sampling (--preset prism): 4 captions per image at T = 1.0, top-p 1.0, at most 2,048
# new tokens; mean accuracy over the 4 captions and best-of-4 are what `summarize` reports.
PRISM = {"k": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 2048}
SMALL_MODEL_PARAMETERS = 10_000_000


@dataclass(slots=True)
class EvalConfig:
    """k: captions per image. num_draws: draws per caption of the training reward (0 = not computed).
    batch_size: images per `generate` call. limit: evaluate the first `limit` images only."""

    k: int = 4
    num_draws: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("k", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_draws < 0:
            raise ValueError(f"num_draws must be >= 0 (0 = no training reward), got {self.num_draws}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


class CaptionEvaluator:
    """Captions images with the policy and scores every question of each image from each caption with the reader."""

    def __init__(self, policy, prompter: PolicyPrompter, reader, reader_tokenizer, config: EvalConfig, *,
                 max_options: int = MAX_OPTIONS + 1, template=None,
                 reward_preset: str = "default") -> None:  # fmt: skip
        self.config = config
        self.prompter = prompter
        cpu = next(policy.parameters()).device.type == "cpu"
        cache = {"kv_cache_tokens": CPU_KV_CACHE_TOKENS} if cpu else {}
        self.policy_engine = Engine(policy, **cache)
        self.params = SamplingParams(n=config.k, temperature=config.temperature, top_p=config.top_p,
                                     max_new_tokens=config.max_new_tokens,
                                     stop_token_ids=stop_token_ids(policy, prompter.tokenizer))  # fmt: skip
        reader_cpu = next(reader.parameters()).device.type == "cpu"
        reader_engine = Engine(reader, **({"kv_cache_tokens": CPU_KV_CACHE_TOKENS} if reader_cpu else {}))
        base = RewardConfig(num_draws=1, mode="hard", seed=config.seed, max_options=max_options,
                            template=template or DEFAULT_TEMPLATE)  # fmt: skip
        if reward_preset == "recipe":  # the reward server's prompt, letters and whole-vocabulary readout
            base = RewardConfig.recipe(num_draws=1, mode="hard", seed=config.seed)
        self.every_question = CapRLReward(reader, reader_tokenizer, base, engine=reader_engine)
        self.train_reward = None
        if config.num_draws:
            train = replace(base, num_draws=config.num_draws)
            self.train_reward = CapRLReward(reader, reader_tokenizer, train, engine=reader_engine)
        self.reader_prompt_tokens = self.reader_computed_tokens = 0

    def evaluate_batch(self, examples: list[Example], batch_index: int) -> list[dict]:
        """One detail row per example (see `_row`). batch_index seeds the sampling and the option shuffles."""
        prompts = [self.prompter(load_image(ex.image)) for ex in examples]
        seed = int(np.random.SeedSequence([self.config.seed, batch_index]).generate_state(1)[0])
        outs = self.policy_engine.generate(prompts, replace(self.params, seed=seed))  # [B][k]
        captions = [[self._text(c) for c in out] for out in outs]
        correct, p_correct = self._every_question(examples, captions, batch_index)
        train = self._train_rewards(examples, captions, batch_index)
        parts = zip(examples, captions, outs, correct, p_correct, train, strict=True)
        return [self._row(*part) for part in parts]

    def _every_question(self, examples, captions, step: int) -> tuple[list, list]:
        """Per example, per caption, per question: 1/0 correctness and the reader's probability of the right option.

        One `score` call per caption slot j, its rows in the same (example, question) order every time: CapRLReward
        seeds each row's option shuffle by (seed, step, row) only, so the k captions of an image meet each question
        with the same option order, and best-of-k compares captions, not shuffles."""
        pools = [[mcq] for ex in examples for mcq in ex.questions]  # one-question pools: the single draw is that one
        bounds = np.cumsum([0] + [len(ex.questions) for ex in examples]).tolist()
        correct, p_correct = [[] for _ in examples], [[] for _ in examples]
        for j in range(self.config.k):
            flat = [caps[j] for caps, ex in zip(captions, examples, strict=True) for _ in ex.questions]
            rewards, details = self.every_question.score(flat, pools, step=step)
            self.reader_prompt_tokens += details.prompt_tokens
            self.reader_computed_tokens += details.computed_tokens
            right = rewards.round().int().tolist()  # exactly 0.0 or 1.0: one hard draw per row
            for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                correct[i].append(right[lo:hi])
                p_correct[i].append(details.correct_prob[lo:hi])  # one draw per row: draws and rows line up
        return correct, p_correct

    def _train_rewards(self, examples, captions, step: int) -> list:
        if self.train_reward is None:
            return [None] * len(examples)
        flat = [c for caps in captions for c in caps]
        questions = [list(ex.questions) for ex, caps in zip(examples, captions, strict=True) for _ in caps]
        rewards, details = self.train_reward.score(flat, questions, step=step)
        self.reader_prompt_tokens += details.prompt_tokens
        self.reader_computed_tokens += details.computed_tokens
        k = self.config.k
        values = rewards.tolist()
        return [values[i * k : (i + 1) * k] for i in range(len(examples))]

    def _text(self, completion: Completion) -> str:
        ids = caption_tokens(completion)
        return self.prompter.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @staticmethod
    def _row(ex: Example, captions, outs, correct, p_correct, train) -> dict:
        row = {
            "id": ex.id, "image": str(ex.image), "captions": captions,
            "caption_tokens": [len(caption_tokens(c)) for c in outs],
            "finish_reasons": [c.finish_reason for c in outs],
            "accuracy": [sum(c) / len(c) for c in correct],
            "p_correct": [sum(p) / len(p) for p in p_correct],
            "correct": correct,  # [k][questions]: 1 when the reader answered that question right from that caption
            "questions": [mcq.question for mcq in ex.questions],
        }  # fmt: skip
        facts = caption_fact_counts(captions, [ex.caption] * len(captions))
        if facts is not None:
            row["facts"] = list(facts)  # summed over the k captions: true claims, claims, facts stated, facts
        if train is not None:
            row["train_reward"] = train
        return row


def summarize(rows: list[dict]) -> dict:
    """The headline numbers of detail rows (see the module docstring)."""
    accuracy = [float(np.mean(r["accuracy"])) for r in rows]
    summary = {
        "num_images": len(rows),
        "num_captions": sum(len(r["captions"]) for r in rows),
        "num_questions": sum(len(r["questions"]) for r in rows),
        "mean_accuracy": float(np.mean(accuracy)),
        "best_of_k": float(np.mean([max(r["accuracy"]) for r in rows])),
        "mean_p_correct": float(np.mean([np.mean(r["p_correct"]) for r in rows])),
        "mean_caption_tokens": float(np.mean([t for r in rows for t in r["caption_tokens"]])),
        "truncated_fraction": float(np.mean([f == "length" for r in rows for f in r["finish_reasons"]])),
        "train_reward": None,
    }
    if all("train_reward" in r for r in rows):
        summary["train_reward"] = float(np.mean([np.mean(r["train_reward"]) for r in rows]))
    summary["fact_precision"] = summary["fact_recall"] = None
    if all("facts" in r for r in rows):
        true, claims, stated, facts = np.sum([r["facts"] for r in rows], axis=0).tolist()
        summary["fact_precision"] = true / claims if claims else None
        summary["fact_recall"] = stated / facts
    return summary


def evaluate(evaluator: CaptionEvaluator, examples: list[Example], out_dir: Path, *, progress: bool = True) -> dict:
    """Evaluate `examples` in batches; returns `summarize` of the rows. out_dir/details.jsonl is written as it goes
    into a temporary file that replaces it only when complete: a crash leaves an earlier evaluation's files whole,
    never a partial details.jsonl beside an older summary.json (which a new details.jsonl removes)."""
    tmp = out_dir / f"details.jsonl.tmp-{os.getpid()}"
    try:
        rows = _evaluate_into(evaluator, examples, tmp, progress)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    (out_dir / "summary.json").unlink(missing_ok=True)  # an older run's: it does not describe these details
    os.replace(tmp, out_dir / "details.jsonl")
    return summarize(rows)


def _evaluate_into(evaluator: CaptionEvaluator, examples: list[Example], path: Path, progress: bool) -> list[dict]:
    from tqdm import tqdm  # a dependency of transformers, so always present

    size = evaluator.config.batch_size
    rows = []
    with open(path, "w", encoding="utf-8") as f, tqdm(
        total=len(examples), desc="eval", unit="img", file=sys.stderr, disable=not progress
    ) as bar:  # fmt: skip
        for b, start in enumerate(range(0, len(examples), size)):
            batch_rows = evaluator.evaluate_batch(examples[start : start + size], b)
            for row in batch_rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            rows += batch_rows
            bar.update(len(batch_rows))
            bar.set_postfix(acc=f"{np.mean([np.mean(r['accuracy']) for r in rows]):.3f}")
    return rows


# --- command line ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="python -m caprl_core.eval", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--policy", type=Path, metavar="DIR", help="local Hugging Face directory of the VL policy, e.g. a training "
        f"checkpoint (default: the shipped miniature-world start policy; {TINY_RANDOM} with --reader {TINY_RANDOM}: "
        "the random pair)")  # fmt: skip
    add("--reader", type=Path, metavar="DIR", help="local Hugging Face directory of the reader LLM (default: the "
        "shipped miniature-world reader)")  # fmt: skip
    add("--data", type=Path, metavar="FILE", help="dataset JSONL (default: the miniature world's 64 held-out images, "
        "written to a temp dir)")  # fmt: skip
    add("--k", type=int, default=d.k, metavar="INT", help=f"captions per image (default: {d.k})")
    add(
        "--num-draws",
        type=int,
        default=d.num_draws,
        metavar="INT",
        help=f"draws per caption of the training reward, for comparison; 0 skips it (default: {d.num_draws})",
    )
    add(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        metavar="INT",
        help=f"caption length cap in tokens (default: {d.max_new_tokens})",
    )
    add(
        "--temperature",
        type=float,
        default=d.temperature,
        metavar="FLOAT",
        help=f"sampling temperature; 0 = greedy (default: {d.temperature})",
    )
    add("--top-p", type=float, default=d.top_p, metavar="FLOAT", help=f"nucleus sampling threshold, 1 = off "
        f"(default: {d.top_p})")  # fmt: skip
    add(
        "--batch-size",
        type=int,
        default=d.batch_size,
        metavar="INT",
        help=f"images per generate call (default: {d.batch_size})",
    )
    add("--limit", type=int, default=d.limit, metavar="INT", help="evaluate the first INT images only (default: all)")
    add("--seed", type=int, default=d.seed, metavar="INT", help=f"seed of sampling, option shuffles and the tiny "
        f"models (default: {d.seed})")  # fmt: skip
    add("--reward-preset", choices=["default", "recipe"], default="default", help="the reader's prompt and readout: "
        "recipe = the published reward server's (caprl_core.reward.RewardConfig.recipe), as a recipe-trained "
        "policy was rewarded; default = the reader directory's or this project's (default: default)")  # fmt: skip
    add("--preset", choices=["none", "prism"], default="none", help="prism = the official Prism evaluation: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRISM.items())
        + "; flags given explicitly win (default: none)")  # fmt: skip
    add("--out", type=Path, metavar="DIR", help="output directory (default: runs/eval-<date-time>)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    add("--device", default=device, metavar="TEXT", help=f"torch device (default here: {device})")
    add("--dtype", choices=list(DTYPES), default="auto", help="model dtype; auto = bfloat16 on CUDA, float32 "
        "elsewhere (default: auto)")  # fmt: skip
    return p


def _apply_preset(args: argparse.Namespace, argv: list[str]) -> None:
    """--preset prism: its settings, under the flags given explicitly."""
    if args.preset != "prism":
        return
    for name, value in PRISM.items():
        flag = "--" + name.replace("_", "-")
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            setattr(args, name, value)


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EvalConfig:
    try:
        return EvalConfig(k=args.k, num_draws=args.num_draws, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                          seed=args.seed, limit=args.limit)  # fmt: skip
    except ValueError as e:
        parser.error(str(e))


def _models(parser, args) -> Models:
    """The policy and reader by the rule `train` uses too (`load_models`): a directory, or the shipped one."""
    for flag in ("policy", "reader", "data"):
        path = getattr(args, flag)
        if path is not None and str(path) != TINY_RANDOM and not path.exists():
            parser.error(f"--{flag}: {path} does not exist")
    try:
        return load_models(args.policy, args.reader, dtype=DTYPES[args.dtype], device=args.device, seed=args.seed)
    except ModelLoadError as e:
        parser.error(str(e))


def _examples(parser, data: Path, limit: int | None) -> tuple[list[Example], int]:
    try:
        result = load_jsonl(data, on_error="skip")
    except DataError as e:
        parser.error(f"--data: {e}")
    return result.examples[:limit], result.num_skipped


@contextlib.contextmanager
def _torch_threads(num_threads: int | None):
    """Run the block on `num_threads` intra-op threads (None: leave as is), then restore the previous setting."""
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation from command-line arguments; returns the summary (also written to OUT/summary.json)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    _apply_preset(args, argv)
    config = _config(parser, args)
    started = time.perf_counter()
    models = _models(parser, args)
    prompter = PolicyPrompter(models.tokenizer, models.image_processor)
    size = sum(p.numel() for m in (models.policy, models.reader) for p in m.parameters())
    threads = TINY_MODEL_THREADS if size < SMALL_MODEL_PARAMETERS else None
    with _torch_threads(threads), tempfile.TemporaryDirectory(prefix="caprl-eval-") as tmp:
        data = args.data or make_world_data(tmp, "heldout")
        examples, skipped = _examples(parser, data, config.limit)
        # The letters of the longest question plus "cannot answer": at most data.MAX_OPTIONS + 1, as in training.
        max_options = max(len(q.options) for ex in examples for q in ex.questions)
        evaluator = CaptionEvaluator(models.policy, prompter, models.reader, models.reader_tokenizer, config,
                                     max_options=max_options + 1, template=models.reader_template,
                                     reward_preset=args.reward_preset)  # fmt: skip
        out = args.out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        summary = evaluate(evaluator, examples, out)
        plot_eval(out / "details.jsonl", out / "plot.png")
    summary.update(
        k=config.k, num_draws=config.num_draws, skipped_lines=skipped, preset=args.preset,
        reward_preset=args.reward_preset,
        reader_prompt_tokens=evaluator.reader_prompt_tokens, reader_computed_tokens=evaluator.reader_computed_tokens,
        seconds=round(time.perf_counter() - started, 2), config=asdict(config), device=str(args.device),
        policy=str(args.policy or "shipped"), reader=str(args.reader or "shipped"),
        data=str(args.data or "world-heldout"), out=str(out),
    )  # fmt: skip
    tmp = out / f"summary.json.tmp-{os.getpid()}"  # written whole or not at all
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "summary.json")
    print(json.dumps({k: summary[k] for k in ("mean_accuracy", "best_of_k", "mean_caption_tokens", "train_reward",
                                              "fact_precision", "fact_recall", "num_images", "seconds",
                                              "out")}))  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
