"""Held-out evaluation during training (`--eval-every N`): the caption evaluation of `python -m caprl_core.eval`
(`caprl_core.evaluator`), run on the training policy every N steps, at step 0 and at the last step.

    python -m caprl_core.train --eval-every 10                      # the world's 64 held-out images
    python -m caprl_core.train --data train.jsonl --eval-every 50 --eval-data heldout.jsonl

At step s it runs after the step's update: it evaluates the policy that checkpoint step-s would hold, so
`python -m caprl_core.eval --policy RUN/checkpoints/step-s --num-draws 0 --seed SEED` measures the same captions.
The numbers (metrics.jsonl keys of that step): heldout_accuracy (the evaluator's mean_accuracy: every question of
every image answered from each of k = 4 captions), heldout_caption_length (tokens), heldout_precision and
heldout_recall (fact precision and recall, when every image's reference caption is a world caption), time_heldout.

The training RNG stream is untouched: captions are sampled with the engine's own generators seeded by (seed, batch),
option shuffles by the reward's own numpy generators, and both engines' KV caches are freed afterwards as the step
leaves them, so a run with --eval-every logs the same training metrics as one without (tests/test_heldout.py).
Under torchrun every rank evaluates whole batches b with b % world_size == rank (the same batches and seeds as one
process) and the rows are gathered: every rank calls the same collectives on the same steps, so nothing waits.
"""

from __future__ import annotations

import time
from pathlib import Path

from caprl_core.data import Example, load_jsonl
from caprl_core.distributed import all_gather_objects, barrier, gathered
from caprl_core.evaluator import CaptionEvaluator, EvalConfig, summarize, threads_for, torch_threads
from caprl_core.rl.step import Run
from caprl_core.world import make_world_data

# summarize()'s names -> metrics.jsonl's; a None (facts unknown for this data) is left out of the step's metrics.
KEYS = {"mean_accuracy": "heldout_accuracy", "mean_caption_tokens": "heldout_caption_length",
        "fact_precision": "heldout_precision", "fact_recall": "heldout_recall"}  # fmt: skip


def is_due(step: int, every: int, steps: int) -> bool:
    """Whether a run of `steps` steps evaluates after step `step`: every `every` steps from 0, and the last one."""
    return step % every == 0 or step == steps - 1


class HeldOut:
    """`due(step)` says whether step `step` evaluates; `evaluate(run)` returns that step's heldout_* metrics."""

    def __init__(self, run: Run) -> None:
        config = run.config
        self.every, self.steps = config.log.eval_every, config.steps
        self.examples = _examples(run)
        max_options = max(len(q.options) for ex in self.examples for q in ex.questions)
        reward = run.reward
        # `python -m caprl_core.eval`'s defaults (k = 4 captions at T = 0.7, <= 128 tokens), seeded by the run's seed;
        # no training-reward draws (the run logs its own reward).
        self.evaluator = CaptionEvaluator(run.policy, run.prompter, reward.model, reward.tokenizer,
                                          EvalConfig(num_draws=0, seed=config.seed), max_options=max_options + 1,
                                          template=reward.config.template, reward_preset=config.reward.reward_preset,
                                          policy_engine=run.engine, reader_engine=reward.engine)  # fmt: skip
        self.threads = threads_for(run.policy, reward.model)

    def due(self, step: int) -> bool:
        return is_due(step, self.every, self.steps)

    def evaluate(self, run: Run) -> dict[str, float]:
        """The held-out metrics of the policy as it is now; collective under torchrun (every rank calls it)."""
        started = time.perf_counter()
        size, world = self.evaluator.config.batch_size, run.world
        starts = range(0, len(self.examples), size)
        mine = [(b, start) for b, start in enumerate(starts) if b % world.world_size == world.rank]
        run.policy.eval()
        # One thread for the tiny models, as `python -m caprl_core.eval` (caprl_core.evaluator.TINY_MODEL_THREADS):
        # on the shared 2-core machine the world's 64 images took 35-81 s with 2 threads at load 4-8.
        with gathered(run.root), torch_threads(self.threads):  # gathered once for the whole evaluation
            rows = {b: self.evaluator.evaluate_batch(self.examples[start : start + size], b) for b, start in mine}
        self.evaluator.policy_engine.free_kv_cache()  # as the rollout and the reward leave them: the update's memory
        run.reward.release_kv_cache()  # the reader's engine: the training reward's header kept, if this left it cached
        gathered_rows = {b: r for part in all_gather_objects(rows, world) for b, r in part.items()}
        summary = summarize([row for b in sorted(gathered_rows) for row in gathered_rows[b]])
        metrics = {name: float(summary[key]) for key, name in KEYS.items() if summary[key] is not None}
        return {**metrics, "time_heldout": time.perf_counter() - started}


def _examples(run: Run) -> list[Example]:
    """--eval-data, or the world's held-out split (`make_world_data(..., "heldout")`, the images of
    `python -m caprl_core.eval`), written once by rank 0 into RUN_DIR/heldout."""
    path = run.config.log.eval_data
    if path is None:
        path = run.output_dir / "heldout" / "data.jsonl"
        if run.world.is_main:
            path = make_world_data(run.output_dir / "heldout", "heldout")
        barrier(run.world)
    return load_jsonl(Path(path), on_error=run.config.data.on_error).examples
