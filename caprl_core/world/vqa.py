"""The miniature world's VQA model: a small Qwen2.5-VL that answers a cell question from the image by its option-letter
logits, the world's stand-in for the small VLM of QA curation (issue 26; `python -m caprl_core.curate filter`).

It starts from the build's start policy (`world.policy`: its vision tower already reads each cell) and is fine-tuned
on the candidate questions of `world.questions`, drawn from scenes of the "policy" and "reader" parts of the scene
space only (`splits.PARTS`), in both of the filter's modes:

- with the image: every question, cross-entropy on the right letter;
- text-only (the same prompt without the vision block): leaky questions towards their right letter, visual ones
  towards the uniform distribution over their options (the text does not say, so the model must not pretend to).

Prompt: exactly the curation filter's (`caprl_core.curate.prompts.VQAPrompter`: the chat turn with the image block,
the question and its lettered options, the answer cue; text-only the same without the image block), with the world's
template `WORLD_VQA_TEMPLATE`, which the model directory carries as caprl_vqa_prompt.json; the option letters' logits at
the prompt's last position are read over the question's options.

`filter_scores` answers each question R times (rotations of its options) in both modes, as the filter does, and
`measure` turns that into the filter's decisions against the questions' ground truth (docs/world.md has the figures).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from caprl_core.curate.prompts import VQAPrompter, VQATemplate
from caprl_core.data import MAX_OPTIONS, MCQ
from caprl_core.world import IMAGE_SIZE
from caprl_core.world.questions import candidate_questions
from caprl_core.world.scenes import draw_scene
from caprl_core.world.splits import sample_scene

# The world's question template (the directory's caprl_vqa_prompt.json): the curation default's layout, shorter
# (the tiny tokenizer spells words it does not know byte by byte, and every token costs training time on a CPU).
WORLD_VQA_TEMPLATE = VQATemplate(question="Question: {question}\n{options}", option="{letter}) {text}",
                                 answer_cue="Answer:")  # fmt: skip
TRAIN_PARTS = ("policy", "reader")  # the scene parts its training stream draws from (never "heldout" or "check")
ROTATIONS = 4
VISUAL_MIN, TEXT_MAX = 0.75, 0.25  # the filter's default thresholds: keep visual accuracy > 0.75, text-only < 0.25


def world_prompter(tokenizer, image_processor) -> VQAPrompter:
    """The curation filter's prompter (`curate.prompts.VQAPrompter`) with the world's template."""
    return VQAPrompter(tokenizer, image_processor, WORLD_VQA_TEMPLATE)


def _hidden(model, ids: list[list[int]], images: list[dict] | None) -> torch.Tensor:
    """Last-layer hidden states [B, L, H] of right-padded prompts (with their images, or text-only)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), 0, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if images is not None:
        types = torch.zeros(len(ids), width, dtype=torch.int)
        for i, p in enumerate(images):
            types[i, : len(p["mm_token_type_ids"])] = p["mm_token_type_ids"]
        inputs |= {"mm_token_type_ids": types, "pixel_values": torch.cat([p["pixel_values"] for p in images]),
                   "image_grid_thw": torch.cat([p["image_grid_thw"] for p in images])}  # fmt: skip
    return model.model(**inputs, use_cache=False).last_hidden_state


def _last(hidden: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
    """Each prompt's last real position [B, H] of hidden states [B, L, H]."""
    return hidden[torch.arange(len(ids)), torch.tensor([len(x) - 1 for x in ids])]


def option_logits(model, hidden: torch.Tensor, letter_ids: list[int], num_options: list[int]) -> torch.Tensor:
    """Letter logits [B, MAX_OPTIONS] from last hidden states [B, H]; -inf past each question's options."""
    logits = model.lm_head(hidden)[:, letter_ids].float()
    valid = torch.arange(len(letter_ids))[None] < torch.tensor(num_options)[:, None]
    return logits.masked_fill(~valid, float("-inf"))


class _Aux:
    """Dense auxiliary labels of a VQA prompt, for training only (as the world's reader has, `world.reader`: a
    transformer trained from scratch finds a lookup only after a long plateau, and these shorten it). Each is read
    through the tied lm_head at a position: at the end of each option line its letter (" A", the token the answer is
    read as) and whether it is the right option (" yes" / " no"); at the question's "?" the first word of the right
    option (" red", " none", ...), where the image or the question text gives it."""

    def __init__(self, tokenizer, letter_ids: list[int]) -> None:
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.letter_ids = letter_ids
        self.yes_no = [encode(" yes")[-1], encode(" no")[-1]]
        self.question_mark = encode("?")[-1]
        self.newline = encode("\n")[-1]
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.encode = encode

    def positions(self, ids: list[int], num_options: int) -> tuple[int, list[int]]:
        """(the question's "?", the last token of each option line)."""
        question = ids.index(self.question_mark)
        ends = [i for i in range(question + 2, len(ids) - 1) if ids[i + 1] in (self.newline, self.end)]
        return question, ends[:num_options]

    def loss(self, model, hidden: torch.Tensor, ids: list[list[int]], batch: list[tuple], answer_known: list[bool]):
        """The auxiliary losses of a batch; `answer_known[i]`: whether prompt i says its answer (the image is there, or
        the question is leaky), else only the letters are trained."""
        head = model.get_output_embeddings().weight
        rows, where, target, vocab = [], [], [], []
        for i, (draw, x, known) in enumerate(zip(batch, ids, answer_known, strict=True)):
            q = draw[1]
            question, ends = self.positions(x, len(q.options))
            for slot, end in enumerate(ends):
                rows.append(i), where.append(end), target.append(slot), vocab.append("letter")
                if known:
                    rows.append(i), where.append(end), target.append(int(slot != q.answer)), vocab.append("option")
            if known:
                word = self.encode(" " + q.options[q.answer].split()[0])[0]
                rows.append(i), where.append(question), target.append(word), vocab.append("look")
        total = hidden.sum() * 0
        for name, columns in (("letter", self.letter_ids), ("option", self.yes_no), ("look", None)):
            pick = [j for j, v in enumerate(vocab) if v == name]
            if not pick:
                continue
            h = hidden[torch.tensor([rows[j] for j in pick]), torch.tensor([where[j] for j in pick])]
            weight = head if columns is None else head[columns]
            total = total + torch.nn.functional.cross_entropy(h @ weight.T, torch.tensor([target[j] for j in pick]))
        return total


def vqa_loss(model, prompter: VQAPrompter, aux: _Aux, batch: list[tuple]) -> torch.Tensor:
    """The training loss of a batch of `vqa_draws` (image, MCQ, leaky, scene): cross-entropy on the right letter with
    the image; text-only, the same for leaky questions and cross-entropy to the uniform distribution over the options
    for visual ones; plus the auxiliary labels (`_Aux`)."""
    image_prompts = [prompter(prompter.image_inputs(x[0]), x[1].question, x[1].options) for x in batch]
    image_ids = [p["input_ids"].tolist() for p in image_prompts]
    texts = [prompter.prompt_ids(None, x[1].question, x[1].options) for x in batch]
    k = [len(x[1].options) for x in batch]
    answers = torch.tensor([x[1].answer for x in batch])
    leaky = [x[2] for x in batch]
    hidden_image = _hidden(model, image_ids, image_prompts)
    hidden_text = _hidden(model, texts, None)
    with_image = option_logits(model, _last(hidden_image, image_ids), aux.letter_ids, k)
    text = option_logits(model, _last(hidden_text, texts), aux.letter_ids, k)
    loss = torch.nn.functional.cross_entropy(with_image, answers)
    logp = text.log_softmax(-1)
    right = logp.gather(1, answers[:, None])[:, 0]
    uniform = torch.stack([logp[i, :n].mean() for i, n in enumerate(k)])
    loss = loss - torch.where(torch.tensor(leaky), right, uniform).mean()
    return (
        loss
        + aux.loss(model, hidden_image, image_ids, batch, [True] * len(batch))
        + aux.loss(model, hidden_text, texts, batch, leaky)
    )


def vqa_draws(rng: random.Random, size: int) -> list[tuple]:
    """The training stream: (image, MCQ, leaky, scene) of fresh scenes of the "policy" and "reader" parts, one candidate
    question each (half of them leaky)."""
    out = []
    for _ in range(size):
        scene = sample_scene(rng, rng.choice(TRAIN_PARTS))
        row = candidate_questions(scene, rng, 1, 0.5)[0]
        out.append((draw_scene(scene, IMAGE_SIZE), MCQ(row["question"], tuple(row["options"]), row["answer"]),
                    row["leaky"], scene))  # fmt: skip
    return out


def train_vqa(model, prompter: VQAPrompter, *, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
              log=None) -> None:  # fmt: skip
    """Fine-tune `model` in place on `steps` batches of `vqa_draws` (AdamW, warm-up then cosine decay);
    log(step, loss) after every step."""
    rng = random.Random(seed)
    aux = _Aux(prompter.tokenizer, prompter.letter_token_ids(MAX_OPTIONS))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, min(20, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    for step in range(steps):
        loss = vqa_loss(model, prompter, aux, vqa_draws(rng, batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log is not None:
            log(step, float(loss.detach()))
    model.eval()


@dataclass
class Scores:
    """One question's accuracies over its rotations, with the image and text-only: hard (the share of rotations whose
    right letter has the strictly highest logit) and soft (the right letter's mean probability)."""

    visual_hard: float
    text_hard: float
    visual_soft: float
    text_soft: float


def rotations(num_options: int, r: int = ROTATIONS) -> list[list[int]]:
    """The option orders of the filter's `r` rotations: order j lists option (i + j) % k at slot i."""
    return [[(i + j) % num_options for i in range(num_options)] for j in range(r)]


@torch.no_grad()
def filter_scores(model, prompter: VQAPrompter, items: list[tuple], *, r: int = ROTATIONS, batch_size: int = 128
                  ) -> list[Scores]:  # fmt: skip
    """`Scores` of each (image, MCQ) in `items`: the question answered with each of `r` rotations of its options, with
    the image and text-only."""
    letter_ids = prompter.letter_token_ids(MAX_OPTIONS)
    jobs = []  # (item index, image prompt, text-only ids, right slot, k)
    for n, (image, q) in enumerate(items):
        vision = prompter.image_inputs(image)
        for order in rotations(len(q.options), r):
            options = [q.options[i] for i in order]
            p = prompter(vision, q.question, options)
            jobs.append((n, p, prompter.prompt_ids(None, q.question, options), order.index(q.answer), len(q.options)))
    hard = {m: [[] for _ in items] for m in ("visual", "text")}
    soft = {m: [[] for _ in items] for m in ("visual", "text")}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        k = [j[4] for j in chunk]
        for mode in ("visual", "text"):
            if mode == "visual":
                ids = [j[1]["input_ids"].tolist() for j in chunk]
                hidden = _last(_hidden(model, ids, [j[1] for j in chunk]), ids)
            else:
                hidden = _last(_hidden(model, [j[2] for j in chunk], None), [j[2] for j in chunk])
            logits = option_logits(model, hidden, letter_ids, k)
            probs = logits.softmax(-1)
            for row, (n, _, _, right, _) in enumerate(chunk):
                others = torch.cat([logits[row, :right], logits[row, right + 1 :]])
                hard[mode][n].append(float(logits[row, right] > others.max()))
                soft[mode][n].append(float(probs[row, right]))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return [Scores(mean(hard["visual"][n]), mean(hard["text"][n]), mean(soft["visual"][n]), mean(soft["text"][n]))
            for n in range(len(items))]  # fmt: skip


def kept(visual: float, text: float, visual_min: float = VISUAL_MIN, text_max: float = TEXT_MAX) -> bool:
    """The filter's rule: keep a question answered with the image (accuracy > visual_min) and not without
    (accuracy < text_max)."""
    return visual > visual_min and text < text_max


def heldout_items(num_images: int, seed: int, per_image: int = 2) -> list[tuple]:
    """(image, MCQ, leaky, kind) of candidate questions about fresh held-out scenes (the part "heldout"), half leaky."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_images):
        scene = sample_scene(rng, "heldout")
        image = draw_scene(scene, IMAGE_SIZE)
        for row in candidate_questions(scene, rng, per_image, 0.5):
            mcq = MCQ(row["question"], tuple(row["options"]), row["answer"])
            out.append((image, mcq, row["leaky"], row["kind"]))
    return out


def measure(model, prompter: VQAPrompter, items: list[tuple]) -> dict:
    """The filter's decisions on `items` (from `heldout_items`) against their ground truth, in both scorings: the
    mean accuracies of visual and leaky questions with and without the image, the share of visual questions kept and
    of leaky ones dropped."""
    scores = filter_scores(model, prompter, [(img, q) for img, q, _, _ in items])
    out: dict = {"questions": {"visual": sum(not x[2] for x in items), "leaky": sum(x[2] for x in items)}}
    for scoring in ("hard", "soft"):
        figures: dict = {}
        for group, leaky in (("visual", False), ("leaky", True)):
            s = [sc for sc, x in zip(scores, items, strict=True) if x[2] == leaky]
            v = [getattr(x, f"visual_{scoring}") for x in s]
            t = [getattr(x, f"text_{scoring}") for x in s]
            share = sum(kept(a, b) for a, b in zip(v, t, strict=True)) / max(len(s), 1)
            decided = ("dropped", 1 - share) if leaky else ("kept", share)
            figures[group] = {
                "image_accuracy": round(sum(v) / max(len(v), 1), 4),
                "text_accuracy": round(sum(t) / max(len(t), 1), 4),
                decided[0]: round(decided[1], 4),
            }
        out[scoring] = figures
    return out
