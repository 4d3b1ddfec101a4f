"""Training the world's VQA model (`caprl_core.world.vqa`): `train_vqa` in two stages, "read" then "see" (`IdealTokens`
says why), on fresh scenes of the parts TRAIN_PARTS of the scene space only (`splits.PARTS`), one candidate question
each (half of them leaky), in both of the curation filter's modes (`vqa_loss`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from caprl_core.curate.prompts import VQAPrompter
from caprl_core.data import MAX_OPTIONS, MCQ
from caprl_core.world import IMAGE_SIZE
from caprl_core.world.policy import NUM_CELLS
from caprl_core.world.questions import candidate_questions
from caprl_core.world.scenes import EMPTY, GRID_CELLS, Scene, cell_contents, draw_scene
from caprl_core.world.splits import sample_scene
from caprl_core.world.vqa import _hidden, _last, option_logits

TRAIN_PARTS = ("policy", "reader")  # the scene parts its training stream draws from (never "heldout" or "check")


class _Aux:
    """Dense auxiliary labels of a VQA prompt, for training only: the world reader's own (`world.reader`), at the same
    places, so that the language model it lends keeps reading the way it learnt. Each is read through the tied
    lm_head, so nothing is added to the model: at the newline ending each option line its letter (" A", the token
    the answer is read as) and whether it is the right option (" yes" / " no"); at the question's "?" and the token
    after it the first and the last word of the right option (" red", " circle"), where the image or the question's
    own text gives them.
    """

    def __init__(self, tokenizer, letter_ids: list[int]) -> None:
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.letter_ids = letter_ids
        self.yes_no = [encode(" yes")[-1], encode(" no")[-1]]
        self.question_mark = encode("?")[-1]
        self.newline = encode("\n")[-1]
        self.encode = encode
        self.parts: dict[str, float] = {}  # the last batch's losses by name, for logs

    def positions(self, ids: list[int], num_options: int) -> tuple[int, list[int]]:
        """(the question's last "?", the newline ending each option line)."""
        question = max(i for i, t in enumerate(ids) if t == self.question_mark)
        return question, [i for i in range(question + 2, len(ids)) if ids[i] == self.newline][1 : 1 + num_options]

    def loss(self, model, hidden: torch.Tensor, ids: list[list[int]], batch: list[tuple], with_image: bool):
        """The auxiliary losses of a batch of `vqa_draws` prompts, with the image or text-only: text-only, only what
        the text says is trained (the answer of a leaky question, the words of a stated one)."""
        rows, where, target, vocab = [], [], [], []

        def add(i: int, position: int, value: int, name: str) -> None:
            rows.append(i), where.append(position), target.append(value), vocab.append(name)

        for i, (draw, x) in enumerate(zip(batch, ids, strict=True)):
            q, leaky, kind = draw[1], draw[2], draw[4]
            question, ends = self.positions(x, len(q.options))
            for slot, end in enumerate(ends):
                add(i, end, slot, "letter")
                if with_image or leaky:
                    add(i, end, int(slot != q.answer), "option")
            if with_image or kind == "leaky-stated":
                words = [self.encode(" " + w)[0] for w in q.options[q.answer].split()]
                for position, word in ((question, words[0]), (question + 1, words[-1])):
                    add(i, position, word, "look")
        return self._sum(model, hidden, rows, where, target, vocab, "image" if with_image else "text")

    def _sum(self, model, hidden, rows, where, target, vocab, mode: str) -> torch.Tensor:
        head = model.get_output_embeddings().weight
        total = hidden.sum() * 0
        for name in dict.fromkeys(vocab):
            cols = {"letter": self.letter_ids, "option": self.yes_no}.get(name)  # None: the whole vocabulary
            pick = [j for j, v in enumerate(vocab) if v == name]
            h = hidden[torch.tensor([rows[j] for j in pick]), torch.tensor([where[j] for j in pick])]
            weight = head if cols is None else head[cols]
            part = torch.nn.functional.cross_entropy(h @ weight.T, torch.tensor([target[j] for j in pick]))
            self.parts[f"{name}_{mode}"] = float(part.detach())
            total = total + part
        return total


def vqa_loss(
    model,
    prompter: VQAPrompter,
    aux: _Aux,
    batch: list[tuple],
    uniform_weight: float = 1.0,
    ideal: IdealTokens | None = None,
) -> torch.Tensor:
    """The training loss of a batch of `vqa_draws`: cross-entropy on the right letter with the image; text-only, the
    same for leaky questions and cross-entropy to the uniform distribution over the options for visual ones; plus the
    auxiliary labels (`_Aux`). With `ideal`, each image's tokens are `ideal(scene)` instead of the vision tower's."""
    image_prompts = [prompter(prompter.image_inputs(x[0]), x[1].question, x[1].options) for x in batch]
    image_ids = [p["input_ids"].tolist() for p in image_prompts]
    texts = [prompter.prompt_ids(None, x[1].question, x[1].options) for x in batch]
    k = [len(x[1].options) for x in batch]
    answers = torch.tensor([x[1].answer for x in batch])
    leaky = [x[2] for x in batch]
    tokens = None if ideal is None else [ideal(x[3]) for x in batch]
    hidden_image = _hidden(model, image_ids, image_prompts, tokens)
    hidden_text = _hidden(model, texts, None)
    with_image = option_logits(model, _last(hidden_image, image_ids), aux.letter_ids, k)
    text = option_logits(model, _last(hidden_text, texts), aux.letter_ids, k)
    loss = torch.nn.functional.cross_entropy(with_image, answers)
    logp = text.log_softmax(-1)
    right = logp.gather(1, answers[:, None])[:, 0]
    uniform = torch.stack([logp[i, :n].mean() for i, n in enumerate(k)])
    is_leaky = torch.tensor(leaky)
    aux.parts["answer_image"] = float(loss.detach())
    aux.parts["answer_text_leaky"] = float(-right[is_leaky].mean().detach())
    aux.parts["uniform_text_visual"] = float(-uniform[~is_leaky].mean().detach())
    loss = loss - (right * is_leaky + uniform_weight * uniform * ~is_leaky).sum() / len(batch)
    return (
        loss + aux.loss(model, hidden_image, image_ids, batch, True) + aux.loss(model, hidden_text, texts, batch, False)
    )


class IdealTokens:
    """The image tokens that the language model is first taught to read (stage "read" of `train_vqa`) and the vision
    tower then to write (stage "see"): at each of the image's NUM_CELLS tokens, the sum of the input embeddings of its
    content's words as the language model had them before training (" red" + " circle"; " none" for an empty cell
    and for the grid's corners and centre, which are always empty). The token does not name its cell: the language
    model learns to read that from the token's M-RoPE position. (Tokens that also held the cell word were read sooner,
    0.91 of held-out visual rotations right after 1,000 steps against 0.56, but an experiment's regression onto them
    stalled at a relative error of 0.24; they were not tried with this recipe.)

    Why: trained end to end, the reader's language model and the policy's vision tower met on a plateau (2,000 steps:
    visual questions 54% right per rotation, shape contents at chance), though the tower's tokens hold the content
    (a linear probe reads it on 99-100% of held-out cells). Split in two, each half is quick: the language model
    reads these tokens, and the tower regresses them."""

    def __init__(self, model, tokenizer) -> None:
        self.table = model.get_input_embeddings().weight.detach().clone()  # frozen: the targets must not move
        self.word = lambda w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
        self.scale = float(self.table.pow(2).sum(1).mean())  # a word's mean squared norm: `see_loss` divides by it

    def content(self, content: str) -> torch.Tensor:
        return sum(self.table[self.word(w)] for w in content.split())

    def __call__(self, scene: Scene) -> torch.Tensor:
        """[NUM_CELLS, H]: the image's tokens, row-major over the 3x3 grid."""
        out = self.content(EMPTY).repeat(NUM_CELLS, 1)
        for cell, content in cell_contents(scene).items():
            row, col = GRID_CELLS[cell]
            out[3 * row + col] = self.content(content)
        return out


def see_loss(model, prompter: VQAPrompter, ideal: IdealTokens, scenes: list[Scene]) -> torch.Tensor:
    """Stage "see": the vision tower's tokens of the scenes' images against `ideal`'s, mean squared error per token
    over a word's mean squared norm."""
    vision = [prompter.image_inputs(draw_scene(x, IMAGE_SIZE)) for x in scenes]
    out = model.model.visual(torch.cat([v["pixel_values"] for v in vision]),
                             grid_thw=torch.cat([v["image_grid_thw"] for v in vision])).pooler_output  # fmt: skip
    target = torch.cat([ideal(x) for x in scenes])
    return (out - target).pow(2).sum(1).mean() / ideal.scale


def _train_scene(rng: random.Random) -> Scene:
    return sample_scene(rng, rng.choice(TRAIN_PARTS))


def vqa_draws(rng: random.Random, size: int) -> list[tuple]:
    """The training stream: (image, MCQ, leaky, scene, kind) of fresh scenes of the "policy" and "reader" parts, one
    candidate question each (half of them leaky)."""
    out = []
    for _ in range(size):
        scene = _train_scene(rng)
        row = candidate_questions(scene, rng, 1, 0.5)[0]
        out.append((draw_scene(scene, IMAGE_SIZE), MCQ(row["question"], tuple(row["options"]), row["answer"]),
                    row["leaky"], scene, row["kind"]))  # fmt: skip
    return out


@dataclass(frozen=True)
class Stage:
    """One stage of `train_vqa`: its name ("read" or "see"), steps, batch and peak learning rate (which parameters it
    trains is the stage's, in `train_vqa`)."""

    name: str
    steps: int
    batch_size: int
    lr: float


def train_vqa(model, prompter: VQAPrompter, *, read: Stage, see: Stage, seed: int = 0, uniform_weight: float = 1.0,
              log=None) -> None:  # fmt: skip
    """Fine-tune `model` (from `make_vqa`) in place, in two stages on fresh scenes of TRAIN_PARTS (`IdealTokens` says
    why): "read", the language model on `vqa_draws` whose image tokens are `IdealTokens`' (the vision tower unused);
    then "see", the vision tower regressing those tokens (`see_loss`; the language model untouched). AdamW, warm-up
    then cosine decay per stage; uniform_weight: the weight of the text-only visual questions' pull towards uniform;
    log(stage, step, loss, losses by name) after every step.

    No third stage trains the two together: measured on 100 held-out images, "see" ended with every visual rotation
    right (soft accuracy 1.0); 250 and 500 steps of the whole model on `vqa_draws` after it (lr 1e-3) lowered that to
    0.90 and 0.99."""
    rng = random.Random(seed)
    aux = _Aux(prompter.tokenizer, prompter.letter_token_ids(MAX_OPTIONS))
    ideal = IdealTokens(model, prompter.tokenizer)
    vision = [p for n, p in model.named_parameters() if n.startswith("model.visual.")]
    language = [p for n, p in model.named_parameters() if not n.startswith("model.visual.")]
    model.train()
    _run_stage(read, language, lambda n: vqa_loss(model, prompter, aux, vqa_draws(rng, n), uniform_weight, ideal),
               aux, log)  # fmt: skip
    _run_stage(see, vision, lambda n: see_loss(model, prompter, ideal, [_train_scene(rng) for _ in range(n)]), aux, log)
    model.eval()


def _run_stage(stage: Stage, params: list, loss_of, aux: _Aux, log) -> None:
    if stage.steps == 0:
        return
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, min(20, stage.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / stage.steps)))
    )
    for step in range(stage.steps):
        aux.parts.clear()
        loss = loss_of(stage.batch_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log is not None:
            log(stage.name, step, float(loss.detach()), dict(aux.parts))
