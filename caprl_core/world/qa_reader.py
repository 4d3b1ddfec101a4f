"""The reader of the `qa` ablation: the world's reader fine-tuned to read the curation candidates' questions as well
(`caprl_core.world.questions`), and to answer the leaky ones from their own text, as a real LLM reader does.

Why it is needed (measured on the faded training candidates, 256 images, 1,536 questions, soft score): the shipped
reader, trained on the world's own questions (2 to 4 options), reads the candidates (5 to 8 options, other phrasings)
at 0.31 from the reference caption, against 0.92 for its own questions; and it answers the leaky ones without a
caption at chance (0.19 stated, 0.14 typed). To it a leaky question is neither leaky nor readable, so training on the
candidates cannot show what leakage does to the reward (CapRL Table 6). A real reader answers a leaky question right
whatever the caption says: its reward is the same for every caption of a group, so it adds nothing a caption can
change, and a draw spent on it is a draw not spent on the image.

The fine-tuning stream (`QAReaderBatches`): the reader's own training captions of scenes of its part of the scene
space; 35% of the questions are the world's own (so it keeps reading them), the rest candidates, visual or leaky with
equal odds. A visual question's label is what the caption implies (`grammar.implied_answer`), a leaky one's is the
right option whatever the caption says.

    python -m caprl_core.world qa-reader --out DIR           # DIR/model.safetensors, ..., caprl_prompt.json, card.json
    python -m caprl_core.world read-candidates --candidates DIR/data.jsonl [--reader DIR]   # the figures above
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from caprl_core.data import MCQ
from caprl_core.world.grammar import implied_answer, parse_caption
from caprl_core.world.questions import leaky_question, visual_question
from caprl_core.world.reader import ReaderBatches, reader_choices, train_reader, training_caption, world_reward
from caprl_core.world.scenes import describe, scene_questions
from caprl_core.world.splits import sample_scene

# The stream and its length. Measured on the card's check (400 pairs of each kind): 800 steps at lr 1e-3 with half the
# questions the world's own read visual candidates at 0.65 from reference captions and leaky ones at 0.42 without a
# caption; 2,000 steps at the build reader's own lr, with 35% the world's own, 0.93 and 0.90 (the world's questions
# 0.9975, no caption answers a visual one). 345 s on the 2-core CPU beside another job.
WORLD_SHARE = 0.35  # of the stream's questions, the world's own; the rest candidates, half of them leaky
STEPS = 2000
LR = 3e-3
BATCH = 32
# The fine-tune's outcome depends on the order of its float sums, so on torch's thread count: on this 2-core CPU one
# thread gave the card above (0.93 / 0.90), two gave visual 0.815 and leaky 0.81. The build runs on BUILD_THREADS, so
# that every build on a machine is the same model, the one docs/world.md measured.
BUILD_THREADS = 1
CHECK_PAIRS = 400  # (caption, question) pairs of each kind in the card, of scenes of the part "check"
# Seeds of the stream and of the card's check, apart from the build's (`world.SPLIT_SEEDS`).
STREAM_SEED, CHECK_SEED = 13_000, 14_000


def qa_label(caption: str, mcq: MCQ, leaky: bool) -> int | None:
    """The option a reader should pick (its index), None for "cannot be answered": a leaky question's right option
    whatever the caption; a visual one's, what the caption implies."""
    return mcq.answer if leaky else implied_answer(parse_caption(caption), mcq)


class QAReaderBatches(ReaderBatches):
    """`ReaderBatches` whose questions are the world's own or curation candidates (module docstring)."""

    def sample(self, size: int, step: int) -> list[dict]:
        scenes = [sample_scene(self.rng, "reader") for _ in range(size)]
        captions = [training_caption(s, self.rng) for s in scenes]
        mcqs, labels = [], []
        for scene, caption in zip(scenes, captions, strict=True):
            mcq, leaky = draw_question(scene, self.rng)
            mcqs.append(mcq)
            labels.append(qa_label(caption, mcq, leaky))
        return self.examples(mcqs, captions, labels, step)


def draw_question(scene, rng: random.Random) -> tuple[MCQ, bool]:
    """(question, leaky) of the stream: the world's own question with probability WORLD_SHARE, else a candidate."""
    if rng.random() < WORLD_SHARE:
        return scene_questions(scene, rng, 1)[0], False
    leaky = rng.random() < 0.5
    return (leaky_question if leaky else visual_question)(scene, rng)[0], leaky


def check_qa_reader(model, tokenizer, num_pairs: int = CHECK_PAIRS) -> dict:
    """Accuracy against the truth of `model` on scenes of the part "check": the world's questions, visual and leaky
    candidates, each from the reference caption and from an empty one."""
    rng = random.Random(CHECK_SEED)
    scenes = [sample_scene(rng, "check") for _ in range(num_pairs)]
    kinds = {
        "world": [scene_questions(s, rng, 1)[0] for s in scenes],
        "visual": [visual_question(s, rng)[0] for s in scenes],
        "leaky": [leaky_question(s, rng)[0] for s in scenes],
    }
    out = {}
    for kind, questions in kinds.items():
        for caption, captions in (("reference", [describe(s) for s in scenes]), ("empty", [""] * num_pairs)):
            chosen, draws = reader_choices(model, tokenizer, captions, questions, seed=CHECK_SEED)
            out[f"{kind}_{caption}"] = round(sum(map(int.__eq__, chosen, draws.answers)) / num_pairs, 4)
    return out


# The captions `candidate_scores` reads each image's questions with, made from its reference caption.
CAPTIONS = {
    "reference": lambda c: c,
    "first cell only": lambda c: c.split(". ")[0].rstrip(".") + ".",
    "empty": lambda c: "",
}


@torch.no_grad()
def candidate_scores(model, tokenizer, rows: list[dict]) -> dict[str, dict[str, float]]:
    """How `model` reads candidate questions (`rows`: the lines of a `world questions` data.jsonl, each with its
    reference "caption" and questions with their "kind"): {caption: {question kind: mean probability of the right
    option}}, through the world reward's prompts and soft read-out (seed 0, step 0), for each caption of CAPTIONS."""
    reward = world_reward(model, tokenizer)
    out: dict[str, dict[str, float]] = {}
    for name, make in CAPTIONS.items():
        totals: dict[str, list[float]] = {}
        for row in rows:
            questions = [MCQ(q["question"], tuple(q["options"]), q["answer"]) for q in row["questions"]]
            _, details = reward.score([make(row["caption"])] * len(questions), [[q] for q in questions], step=0)
            for q, p in zip(row["questions"], details.correct_prob, strict=True):
                totals.setdefault(q["kind"], []).append(p)
        out[name] = {kind: round(sum(v) / len(v), 4) for kind, v in sorted(totals.items())}
    return out


def build_qa_reader(out_dir: str | Path, reader_dir: str | Path | None = None, *, steps: int = STEPS,
                    progress: bool = False) -> Path:  # fmt: skip
    """Fine-tune the reader in `reader_dir` (default: the shipped one) on `QAReaderBatches` and save it to out_dir with
    the world's prompt template and card.json (its `check_qa_reader` before and after, the settings, seconds)."""
    from caprl_core.policy import load_reader
    from caprl_core.reward_prompts import save_prompt_template
    from caprl_core.world import SHIPPED
    from caprl_core.world.build import save_model_dir
    from caprl_core.world.reader import WORLD_TEMPLATE

    reader_dir = Path(reader_dir) if reader_dir is not None else SHIPPED / "reader"
    model, tokenizer = load_reader(reader_dir, dtype=torch.float32)
    card: dict = {"from": str(reader_dir), "steps": steps, "lr": LR, "batch": BATCH, "world_share": WORLD_SHARE,
                  "threads": BUILD_THREADS, "before": check_qa_reader(model, tokenizer)}  # fmt: skip
    started = time.perf_counter()

    def log(step: int, losses: dict, accuracy: float) -> None:
        if progress and (step + 1) % 100 == 0:
            print(f"qa reader step {step + 1}/{steps}: answer loss {losses['answer']:.3f}, accuracy {accuracy:.3f}",
                  flush=True)  # fmt: skip

    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        train_reader(model, tokenizer, steps=steps, batch_size=BATCH, lr=LR, seed=STREAM_SEED, log=log,
                     stream=QAReaderBatches)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    card["seconds"] = round(time.perf_counter() - started, 1)
    card["after"] = check_qa_reader(model, tokenizer)
    out_dir = Path(out_dir)
    save_model_dir(model, tokenizer, out_dir)
    save_prompt_template(WORLD_TEMPLATE, out_dir)
    (out_dir / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    return out_dir
