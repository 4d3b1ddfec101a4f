"""Training the world's reader: a small Qwen2 that answers the world's questions from a caption, through exactly the
prompts `CapRLReward` builds (shuffled options, the "cannot be answered" option, the answer cue; `WORLD_TEMPLATE`'s
one-line instruction as the header) and read out as `CapRLReward` reads it (the option letters' logits at the cue).

Training examples pair a random scene with a caption of many kinds (the reference, terse prefixes, prefixes with a
count clause, corrupted ones, empty ones, word soup) and one of its questions; the label is what the caption says
(`grammar.implied_answer`), so that a trained reader rewards true, complete captions and is not fooled by wrong ones.
Dense auxiliary labels (per option line, per question, a per-cell probe) help it learn the steps of reading; it still
learns too slowly for the issue's budget (README, "The miniature world").
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch

from caprl_core.data import (
    COLOURS,
    MAX_OPTIONS,
    MCQ,
    POSITIONS,
    SHAPES,
    Scene,
    Shape,
    _noun,
    describe,
    scene_questions,
    synthetic_scene,
)
from caprl_core.reward import CapRLReward, PromptTemplate, RewardConfig
from caprl_core.world.grammar import implied_answer, implied_text, parse_caption, terse_caption

AUX_WEIGHT = 1.0
# The world reader's prompt: CapRLReward's, with a one-line instruction instead of the few-shot header, which gives a
# fresh model 310 more tokens to spread its attention over (measured, reader 128 x 4, accuracy from reference captions:
# 29.5% after 600 steps with the header, 40.5% after 500 with this instruction). The reader directory carries it
# (reward.PROMPT_FILE), so train and eval prompt it the same way.
WORLD_TEMPLATE = PromptTemplate(
    header="Answer from the caption only.\n\n"
)  # weight of the per-option auxiliary loss (train_reader)
_SOUP_WORDS = [*COLOURS, *SHAPES, *POSITIONS, "a", "an", "the", "in", "and", "with", "image", "white", "shapes", "of"]


def render(items: list[Shape], count: int | None, rng: random.Random) -> str:
    """A caption in the grammar: an optional count clause, then the items joined by ", " or " and "."""
    phrases = [f"{_noun(s.colour, s.kind)} in the {s.position}" for s in items]
    if not phrases:
        body = ""
    elif len(phrases) == 1 or rng.random() < 0.2:
        body = (", " if rng.random() < 0.5 else " and ").join(phrases)
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if count is not None:
        head = f"A white image with {count} shape{'s' if count != 1 else ''}"
        return head + (": " + body if body else "") + "."
    return (body[0].upper() + body[1:] + ".") if body else ""


def _corrupt(items: list[Shape], rng: random.Random) -> list[Shape]:
    """One item changed (colour, kind or cell), one made up, or one duplicated."""
    items = list(items)
    what = rng.random()
    if what < 0.6 and items:
        i = rng.randrange(len(items))
        s = items[i]
        field = rng.choice(("colour", "kind", "position"))
        if field == "colour":
            s = Shape(s.kind, rng.choice([c for c in COLOURS if c != s.colour]), s.position)
        elif field == "kind":
            s = Shape(rng.choice([k for k in SHAPES if k != s.kind]), s.colour, s.position)
        else:
            s = Shape(s.kind, s.colour, rng.choice([p for p in POSITIONS if p != s.position]))
        items[i] = s
    elif what < 0.9:
        items.insert(rng.randrange(len(items) + 1),
                     Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(POSITIONS)))  # fmt: skip
    elif items:
        items.insert(rng.randrange(len(items) + 1), rng.choice(items))
    return items


def training_caption(scene: Scene, rng: random.Random) -> str:
    """A caption of one of the kinds the reader must read (see the module docstring)."""
    n = len(scene.shapes)
    u = rng.random()
    if u < 0.25:
        return describe(scene)
    if u < 0.45:
        return terse_caption(scene, rng.randint(1, n))
    items = list(scene.shapes[: rng.randint(1, n)])
    if rng.random() < 0.15:
        rng.shuffle(items)
    count = n if rng.random() < 0.5 else None
    if u < 0.6:
        return render(items, count, rng)
    if u < 0.9:
        if rng.random() < 0.3:
            count = rng.choice([c for c in range(1, 5) if c != n])
        return render(_corrupt(items, rng), count, rng)
    if u < 0.95:
        return ""
    words = rng.choices(_SOUP_WORDS, k=rng.randint(1, 12))
    return " ".join(words) + "."


def make_reader(tokenizer, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                rope_theta: float = 10000.0, seed: int = 0):  # fmt: skip
    """A randomly initialised Qwen2 reader for `tokenizer` (vocabulary padded to a multiple of 64)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_heads // 2, rope_theta=rope_theta, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)  # fmt: skip
    return Qwen2ForCausalLM(config)


SCENE_CLASSES = 2 + len(COLOURS) * len(SHAPES)  # per cell: not said, nothing, or one (colour, kind)


def scene_classes(claims) -> list[int]:
    """What a caption says of each cell (0: not said, 1: nothing, 2 + colour * kinds + kind) and its count (0: not
    said): the targets of the scene probe at the caption's end."""
    out = []
    for cell in POSITIONS:
        here = [s for s in claims.items if s.position == cell]
        if len(here) == 1:
            out.append(2 + list(COLOURS).index(here[0].colour) * len(SHAPES) + SHAPES.index(here[0].kind))
        else:
            out.append(1 if not here and claims.complete else 0)
    out.append(claims.count if claims.count is not None and 1 <= claims.count <= 4 else 0)
    return out


class ReaderBatches:
    """Batches of reader prompts and labels, built by `CapRLReward.reader_prompts` (the reward's own path)."""

    def __init__(self, reward: CapRLReward, seed: int) -> None:
        self.reward = reward
        self.rng = random.Random(seed)
        self._options_marker = reward._encode("Options:\n")  # token ids, encoded once for every prompt
        self._newline = reward._encode("\n")[0]

    def sample(self, batch_size: int, step: int) -> dict:
        template = self.reward.config.template.caption
        captions, pools, claims = [], [], []
        for _ in range(batch_size):
            scene = synthetic_scene(self.rng)
            mcq = scene_questions(scene, self.rng, 1)[0]
            caption = training_caption(scene, self.rng)
            captions.append(caption)
            pools.append([mcq])
            claims.append(parse_caption(caption))
        draws = self.reward.reader_prompts(captions, pools, step=step)
        labels, line_ends, question_ends, words = [], [], [], []
        for p, (mcq, claim) in enumerate(zip([pool[0] for pool in pools], claims, strict=True)):
            implied = implied_answer(claim, mcq)
            labels.append(len(mcq.options) if implied is None else draws.orders[p].index(implied))
            start = self._options_start(draws.prompts[p])
            ends = [i for i in range(start, len(draws.prompts[p])) if draws.prompts[p][i] == self._newline]
            line_ends.append(ends[1 : 1 + draws.num_options[p]])  # ends[0] ends "Options:"
            question_ends.append([start - 2, start - 1])  # "?" and the newline after it
            words.append(self._word_ids(implied_text(claim, mcq.question)))
        caption_ends = [len(self.reward._header_ids) + len(self.reward._encode(template.format(caption=c))) - 1
                        for c in captions]  # fmt: skip
        return {"prompts": draws.prompts, "labels": labels, "num_options": draws.num_options,
                "truth": draws.answers, "line_ends": line_ends, "question_ends": question_ends,
                "words": words, "caption_ends": caption_ends,
                "scene": [scene_classes(c) for c in claims]}  # fmt: skip

    def _options_start(self, prompt: list[int]) -> int:
        """Where the last "Options:" of `prompt` starts."""
        marker = self._options_marker
        return max(i for i in range(len(prompt) - len(marker) + 1) if prompt[i : i + len(marker)] == marker)

    def _word_ids(self, answer: str | None) -> list[int]:
        """Two token ids that name `answer` (what the caption says, before any option is read): colour and kind of
        a shape, the two words of a cell, else the answer word twice; " none" when the caption does not say."""
        if answer is None:
            words = ["none", "none"]
        elif answer == "nothing":
            words = ["no", "no"]
        elif answer.startswith(("a ", "an ")):
            words = answer.split()[1:]
        elif "-" in answer:
            words = answer.split("-")
        else:
            words = [answer, answer]
        return [self.reward._encode(w if w.isdigit() else " " + w)[-1] for w in words]


def suffix_hidden(model, header: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Last hidden states [P, W, D] of each prompt's tokens after `header` (right-padded to the longest). Every
    prompt starts with `header`: it runs once (batch 1) and its keys/values are repeated for the batch, so a batch
    costs its suffixes only."""
    from transformers import DynamicCache

    P, H = len(prompts), len(header)
    rest = [p[H:] for p in prompts]
    width = max(len(r) for r in rest)
    ids = torch.zeros(P, width, dtype=torch.long)
    mask = torch.zeros(P, H + width, dtype=torch.long)
    mask[:, :H] = 1
    for i, r in enumerate(rest):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, H : H + len(r)] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5 renames past_key_values; 4.x knows only that name
        cache = DynamicCache()
        model.model(input_ids=torch.tensor([header]), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(P)
        positions = torch.arange(H, H + width)[None].expand(P, -1)
        hidden = model.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        ).last_hidden_state  # [P, width, D]
    return hidden


def letter_logits(model, header: list[int], prompts: list[list[int]], letter_ids: torch.Tensor) -> torch.Tensor:
    """Option-letter logits [P, K] at the last position of each prompt (the answer cue), as `CapRLReward` reads."""
    hidden = suffix_hidden(model, header, prompts)
    last = torch.tensor([len(p) - len(header) - 1 for p in prompts])
    h = hidden[torch.arange(len(prompts)), last]  # [P, D]
    return h @ model.get_output_embeddings().weight[letter_ids].T  # [P, K]


def masked_letters(logits: torch.Tensor, num_options: list[int]) -> torch.Tensor:
    valid = torch.arange(logits.shape[1])[None] < torch.tensor(num_options)[:, None]
    return logits.masked_fill(~valid, float("-inf"))


def _reward(model, tokenizer, seed: int = 0) -> CapRLReward:
    """The reward whose prompts the world's reader is trained and checked on."""
    return CapRLReward(model, tokenizer, RewardConfig(num_draws=1, seed=seed, max_options=MAX_OPTIONS + 1,
                                                      template=WORLD_TEMPLATE))  # fmt: skip


def train_reader(model, tokenizer, *, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                 log=None) -> None:  # fmt: skip
    """Train `model` in place on `steps` batches of `WORLD_TEMPLATE` prompts (AdamW, warm-up then cosine decay).
    log(step, (answer, option, look, scene) losses, answer accuracy) is called after every step."""
    reward = _reward(model, tokenizer, seed)
    batches = ReaderBatches(reward, seed)
    # A linear probe at the caption's last token, trained with the model and then discarded: what the caption says of
    # each cell and the count (dense labels for the reading step).
    probe = torch.nn.Linear(model.config.hidden_size, len(POSITIONS) * SCENE_CLASSES + 5)
    params = [*model.parameters(), *probe.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps)))
    )
    model.train()
    for step in range(steps):
        batch = batches.sample(batch_size, step)
        logits, parts = _losses(model, probe, reward, batch)
        opt.zero_grad(set_to_none=True)
        (parts[0] + AUX_WEIGHT * sum(parts[1:])).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log is not None:
            acc = float((logits.argmax(-1) == torch.tensor(batch["labels"])).float().mean())
            log(step, tuple(float(p.detach()) for p in parts), acc)
    model.eval()


def _losses(model, probe, reward: CapRLReward, batch: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(letter logits [P, K], (answer, option, look, scene) losses) of one batch (`ReaderBatches.sample`).

    answer: the letter at the cue, as the reward reads it. The others are dense auxiliary labels for the steps the
    answer depends on (training only): option, " yes"/" no" at the end of each option line (is it the answer the
    caption implies?); look, at the question's "?" and the newline after it, the two words of what the caption says
    (read before any option); scene, the probe at the caption's end (what it says of each cell, and the count)."""
    ce = torch.nn.functional.cross_entropy
    header = reward._header_ids
    head = model.get_output_embeddings().weight
    hidden = suffix_hidden(model, header, batch["prompts"])  # [P, W, D]
    P = hidden.shape[0]

    def at(rows: list[int], positions: list[int]) -> torch.Tensor:  # hidden states at absolute prompt positions
        return hidden[torch.tensor(rows), torch.tensor(positions) - len(header)]

    last = [len(p) - 1 for p in batch["prompts"]]
    logits = masked_letters(at(list(range(P)), last) @ head[torch.tensor(reward.letter_ids)].T, batch["num_options"])
    answer = ce(logits, torch.tensor(batch["labels"]))
    ends = batch["line_ends"]
    yes_no = torch.tensor(reward._encode(" yes") + reward._encode(" no"))
    lines = at([p for p, e in enumerate(ends) for _ in e], [x for e in ends for x in e]) @ head[yes_no].T
    flags = [int(i != batch["labels"][p]) for p, e in enumerate(ends) for i in range(len(e))]  # 0: yes
    option = ce(lines, torch.tensor(flags))
    questions = at([p for p in range(P) for _ in range(2)], [x for e in batch["question_ends"] for x in e])
    look = ce(questions @ head.T, torch.tensor([w for ws in batch["words"] for w in ws]))
    scene = probe(at(list(range(P)), batch["caption_ends"]))  # [P, 4 * SCENE_CLASSES + 5]
    targets = torch.tensor(batch["scene"])  # [P, 5]
    cells = scene[:, : len(POSITIONS) * SCENE_CLASSES].reshape(-1, SCENE_CLASSES)
    scene_loss = ce(cells, targets[:, :4].reshape(-1)) + ce(scene[:, -5:], targets[:, 4])
    return logits, (answer, option, look, scene_loss)


@torch.no_grad()
def reader_accuracy(
    model, tokenizer, captions: list[str], questions: list[MCQ], *, seed: int = 0
) -> tuple[float, float]:
    """(accuracy against the truth, agreement with `implied_answer`) of the reader on (caption, question) pairs."""
    reward = _reward(model, tokenizer, seed)
    draws = reward.reader_prompts(captions, [[q] for q in questions], step=0)
    logits = masked_letters(letter_logits(model, reward._header_ids, draws.prompts, torch.tensor(reward.letter_ids)),
                            draws.num_options)  # fmt: skip
    chosen = logits.argmax(-1).tolist()
    right = [c == a for c, a in zip(chosen, draws.answers, strict=True)]
    implied = [implied_answer(parse_caption(c), q) for c, q in zip(captions, questions, strict=True)]
    agree = [c == (len(q.options) if i is None else o.index(i))
             for c, i, q, o in zip(chosen, implied, questions, draws.orders, strict=True)]  # fmt: skip
    return float(np.mean(right)), float(np.mean(agree))
