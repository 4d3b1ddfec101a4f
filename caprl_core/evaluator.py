"""The caption evaluator behind `python -m caprl_core.eval` (caprl_core/eval.py: the command, and what the numbers
mean): the policy captions each image k times, the reader answers every question of the image from each caption, and
`summarize` reduces the per-image rows to the reported figures. Training's held-out evaluation uses it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from caprl_core.data import MAX_OPTIONS, Example, load_image
from caprl_core.policy import PolicyPrompter, caption_tokens, stop_token_ids
from caprl_core.reward import CapRLReward
from caprl_core.reward_config import RewardConfig
from caprl_core.reward_prompts import DEFAULT_TEMPLATE
from caprl_core.sampler.engine import Engine
from caprl_core.sampler.sequence import Completion, SamplingParams
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


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """Run the block on `num_threads` intra-op threads (None: leave as is), then restore the previous setting."""
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_for(*models) -> int | None:
    """TINY_MODEL_THREADS for models under SMALL_MODEL_PARAMETERS together, None (torch's setting) otherwise."""
    size = sum(p.numel() for m in models for p in m.parameters())
    return TINY_MODEL_THREADS if size < SMALL_MODEL_PARAMETERS else None


class CaptionEvaluator:
    """Captions images with the policy and scores every question of each image from each caption with the reader."""

    def __init__(self, policy, prompter: PolicyPrompter, reader, reader_tokenizer, config: EvalConfig, *,
                 max_options: int = MAX_OPTIONS + 1, template=None, reward_preset: str = "default",
                 policy_engine: Engine | None = None, reader_engine: Engine | None = None) -> None:  # fmt: skip
        """policy_engine, reader_engine: engines of these models to run on instead of new ones (training's held-out
        evaluation passes the run's own: no second KV cache beside them)."""
        self.config = config
        self.prompter = prompter
        cpu = next(policy.parameters()).device.type == "cpu"
        cache = {"kv_cache_tokens": CPU_KV_CACHE_TOKENS} if cpu else {}
        self.policy_engine = Engine(policy, **cache) if policy_engine is None else policy_engine
        self.params = SamplingParams(n=config.k, temperature=config.temperature, top_p=config.top_p,
                                     max_new_tokens=config.max_new_tokens,
                                     stop_token_ids=stop_token_ids(policy, prompter.tokenizer))  # fmt: skip
        reader_cpu = next(reader.parameters()).device.type == "cpu"
        if reader_engine is None:
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
