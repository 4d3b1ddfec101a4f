"""Training the world's reader: a small Qwen2 that answers the world's questions from a caption, through exactly the
prompts `CapRLReward` builds (shuffled options, the "cannot be answered" option, the answer cue; `WORLD_TEMPLATE`) and
read out as `CapRLReward` reads it (the option letters' logits at the cue).

Training examples pair a random scene with a caption of many kinds (the reference, any subset of its statements,
statements shuffled, one statement made wrong, a cell stated twice with two contents, an unreadable phrase, an empty
caption) and one of the scene's questions; the label is what the caption says (`grammar.implied_answer`), so a trained
reader rewards true, complete captions and is not fooled by wrong ones.

Reading a caption is a lookup (which statement is about the asked cell, then which option it matches), and a
transformer trained from scratch finds such lookups only after a long plateau. Dense auxiliary labels, used in
training only, shorten it: at each content word of the caption the cell it belongs to, and at the question's end the
cell asked ("key"); at the question's end the words of the answer the caption gives ("look"); at the end of each
option line whether it is that answer ("option") and its letter ("letter"). Each is read through the tied lm_head, so
no extra parameters are trained and none are shipped.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from caprl_core.data import MAX_OPTIONS, MCQ
from caprl_core.reward import CapRLReward
from caprl_core.reward_config import RewardConfig
from caprl_core.reward_prompts import PromptTemplate
from caprl_core.world.grammar import implied_answer, parse_caption
from caprl_core.world.scenes import (
    COLOURS,
    EMPTY,
    POSITIONS,
    SHAPES,
    Scene,
    cell_contents,
    scene_questions,
)
from caprl_core.world.scenes import statement as render_statement
from caprl_core.world.splits import sample_scene

# The world reader's prompt: CapRLReward's layout with a one-line instruction instead of the few-shot header (310
# tokens a fresh model must learn to ignore), the caption on the cue's line (so its first cell word is " top", the
# token the question uses, not "top"), and option lines " A. red circle": the letter is then the same token as the one
# after the answer cue, so answering is copying it. The reader directory carries it (reward_prompts.PROMPT_FILE), so
# train and eval prompt the reader the way it was trained.
WORLD_TEMPLATE = PromptTemplate(
    header="Answer from the caption only.\n", caption="Caption: {caption}\n\n", option=" {letter}. {text}"
)
CONTENTS = [EMPTY, *(f"{c} {k}" for c in COLOURS for k in SHAPES)]


def training_caption(scene: Scene, rng: random.Random) -> str:
    """A caption of one of the kinds the reader must read (see the module docstring)."""
    statements = list(cell_contents(scene).items())
    u = rng.random()
    if u < 0.3:
        chosen = statements
    elif u < 0.95:
        chosen = [s for s in statements if rng.random() < 0.5]
    else:
        chosen = []
    if chosen and rng.random() < 0.15:
        rng.shuffle(chosen)
    if chosen and rng.random() < 0.25:  # one statement wrong
        i = rng.randrange(len(chosen))
        chosen[i] = (chosen[i][0], rng.choice([c for c in CONTENTS if c != chosen[i][1]]))
    if chosen and rng.random() < 0.05:  # a cell stated twice, differently: the caption then does not say
        cell, content = rng.choice(chosen)
        chosen.insert(rng.randrange(len(chosen) + 1), (cell, rng.choice([c for c in CONTENTS if c != content])))
    phrases = [render_statement(cell, content) for cell, content in chosen]
    if rng.random() < 0.1:  # something the grammar cannot read, which says nothing
        junk = rng.choice([f"{rng.choice(POSITIONS)}: {rng.choice(list(COLOURS))}.", f"{rng.choice(SHAPES)}.",
                           f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}."])  # fmt: skip
        phrases.insert(rng.randrange(len(phrases) + 1), junk)
    return " ".join(phrases)


def make_reader(
    tokenizer, *, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4, seed: int = 0, init_std: float = 0.02
):
    """A randomly initialised Qwen2 reader for `tokenizer` (vocabulary padded to a multiple of 64, tied lm_head);
    init_std is the weights' initializer_range (BuildConfig.reader_init_std says why the build uses 0.1)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_heads, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True, initializer_range=init_std)  # fmt: skip
    return Qwen2ForCausalLM(config)


def world_reward(model, tokenizer, seed: int = 0) -> CapRLReward:
    """The reward whose prompts the world's reader is trained and checked on (one draw per caption)."""
    return CapRLReward(model, tokenizer, RewardConfig(num_draws=1, seed=seed, max_options=MAX_OPTIONS + 1,
                                                      template=WORLD_TEMPLATE, use_chat_template=False))  # fmt: skip


def reader_draws(rng: random.Random, size: int) -> tuple[list[Scene], list[MCQ], list[str]]:
    """The reader's training stream, `size` examples at a time: scenes of the reader's part of the scene space
    (`splits.PARTS`), one question each and a training caption."""
    scenes = [sample_scene(rng, "reader") for _ in range(size)]
    mcqs = [scene_questions(s, rng, 1)[0] for s in scenes]  # one question each, at random
    captions = [training_caption(s, rng) for s in scenes]
    return scenes, mcqs, captions


class ReaderBatches:
    """Reader prompts and labels, built by `CapRLReward.reader_prompts` (the reward's own path), in chunks."""

    def __init__(self, reward: CapRLReward, seed: int) -> None:
        self.reward = reward
        self.rng = random.Random(seed)
        encode = reward._encode  # token ids, looked up once for every prompt
        self.newline = encode("\n")[0]
        self.question_mark = encode("?")[-1]
        self.cell_ids = {encode(" " + c)[-1] for c in POSITIONS} | {encode(c)[-1] for c in POSITIONS}
        self.content_ids = {encode(" " + w)[-1] for w in [*COLOURS, *SHAPES, EMPTY]}
        self.cannot = encode(" cannot")[-1]
        self.word = {w: encode(" " + w)[-1] for w in [*COLOURS, *SHAPES, EMPTY]}

    def sample(self, size: int, step: int) -> list[dict]:
        """`size` examples: prompt ids, label (the letter the caption implies), option count and auxiliary targets."""
        _, mcqs, captions = reader_draws(self.rng, size)
        implied = [implied_answer(parse_caption(c), q) for c, q in zip(captions, mcqs, strict=True)]
        return self.examples(mcqs, captions, implied, step)

    def examples(self, mcqs: list[MCQ], captions: list[str], answers: list[int | None], step: int) -> list[dict]:
        """The training examples of (caption, question) pairs whose right answer is option `answers[i]` of each
        question (None: "cannot be answered"): prompts as the reward builds them at `step`, labels and auxiliary
        targets."""
        draws = self.reward.reader_prompts(captions, [[q] for q in mcqs], step=step)
        out = []
        for p, (mcq, implied) in enumerate(zip(mcqs, answers, strict=True)):
            label = len(mcq.options) if implied is None else draws.orders[p].index(implied)
            answer = None if implied is None else mcq.options[implied]  # the words the caption answers with
            out.append(self._targets(draws.prompts[p], label, draws.num_options[p], answer))
        return out

    def _targets(self, prompt: list[int], label: int, num_options: int, answer: str | None) -> dict:
        question_end = max(i for i, t in enumerate(prompt) if t == self.question_mark)
        line_ends = [i for i in range(question_end + 2, len(prompt)) if prompt[i] == self.newline][1 : 1 + num_options]
        # key: each content word of the caption names its cell, and so does the question's end (the cell asked).
        key_positions, key_targets, cell = [], [], None
        for i, token in enumerate(prompt[: question_end + 1]):
            if token in self.cell_ids:
                cell = token
            elif (token in self.content_ids or i == question_end) and cell is not None:
                key_positions.append(i)
                key_targets.append(cell)
        words = [self.cannot] if answer is None else [self.word[w] for w in answer.split()]
        return {"prompt": prompt, "label": label, "num_options": num_options,
                "look": ([question_end - 1, question_end, question_end + 1], [words[0], words[0], words[-1]]),
                "option": (line_ends, [int(i != label) for i in range(len(line_ends))]),
                "letter": (line_ends, list(range(len(line_ends)))),  # the index of its letter
                "key": (key_positions, key_targets)}  # fmt: skip


def _hidden(model, prompts: list[list[int]]) -> torch.Tensor:
    """Last hidden states [P, L, H] of right-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    return model.model(input_ids=ids, attention_mask=mask).last_hidden_state


def letter_logits(model, hidden: torch.Tensor, examples: list[dict], letter_ids: torch.Tensor) -> torch.Tensor:
    """Option-letter logits [P, K] at the last position of each prompt (the answer cue), -inf past its options."""
    last = torch.tensor([len(e["prompt"]) - 1 for e in examples])
    logits = hidden[torch.arange(len(examples)), last] @ model.get_output_embeddings().weight[letter_ids].T
    valid = torch.arange(logits.shape[1])[None] < torch.tensor([e["num_options"] for e in examples])[:, None]
    return logits.masked_fill(~valid, float("-inf"))


def _aux_loss(head: torch.Tensor, hidden: torch.Tensor, examples: list[dict], name: str, vocab: torch.Tensor | None):
    """Cross-entropy of the tied head's logits (over `vocab` rows, or all) at the positions of target `name`."""
    rows = torch.tensor([r for r, e in enumerate(examples) for _ in e[name][0]])
    positions = torch.tensor([x for e in examples for x in e[name][0]])
    targets = torch.tensor([x for e in examples for x in e[name][1]])
    if len(rows) == 0:
        return hidden.sum() * 0
    weight = head if vocab is None else head[vocab]
    return torch.nn.functional.cross_entropy(hidden[rows, positions] @ weight.T, targets)


def reader_losses(model, reward: CapRLReward, examples: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(letter logits [P, K], losses by name: answer (the letter at the cue, as the reward reads it), key, look,
    option, letter (the auxiliary labels of the module docstring))."""
    hidden = _hidden(model, [e["prompt"] for e in examples])  # [P, L, H]
    head = model.get_output_embeddings().weight
    logits = letter_logits(model, hidden, examples, torch.tensor(reward.letter_ids))
    yes_no = torch.tensor(reward._encode(" yes") + reward._encode(" no"))
    losses = {
        "answer": torch.nn.functional.cross_entropy(logits, torch.tensor([e["label"] for e in examples])),
        "key": _aux_loss(head, hidden, examples, "key", None),
        "look": _aux_loss(head, hidden, examples, "look", None),
        "option": _aux_loss(head, hidden, examples, "option", yes_no),
        "letter": _aux_loss(head, hidden, examples, "letter", torch.tensor(reward.letter_ids)),
    }
    return logits, losses


def train_reader(model, tokenizer, *, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                 chunk: int = 50, log=None, stream: type[ReaderBatches] = ReaderBatches) -> None:  # fmt: skip
    """Train `model` in place on `steps` batches (AdamW, warm-up then cosine decay); prompts are drawn `chunk` batches
    at a time (one `reader_prompts` call) from `stream` (the world's questions; `qa_reader.QAReaderBatches` adds the
    curation candidates'). log(step, losses by name, answer accuracy) is called after every step."""
    reward = world_reward(model, tokenizer, seed)
    batches = stream(reward, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    pool: list[dict] = []
    for step in range(steps):
        if not pool:
            pool = batches.sample(batch_size * chunk, step)
        examples, pool = pool[:batch_size], pool[batch_size:]
        logits, losses = reader_losses(model, reward, examples)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log is not None:
            labels = torch.tensor([e["label"] for e in examples])
            accuracy = float((logits.argmax(-1) == labels).float().mean())
            log(step, {k: float(v.detach()) for k, v in losses.items()}, accuracy)
    model.eval()


@torch.no_grad()
def reader_choices(model, tokenizer, captions: list[str], questions: list[MCQ], *, seed: int = 0,
                   batch_size: int = 256) -> tuple[list[int], object]:  # fmt: skip
    """(the option slot the reader picks for each (caption, question) pair, through the reward's prompts and
    read-out; the reward's draws, with each pair's right slot `answers` and option `orders`)."""
    reward = world_reward(model, tokenizer, seed)
    draws = reward.reader_prompts(captions, [[q] for q in questions], step=0)
    chosen = []
    for i in range(0, len(captions), batch_size):
        rows = zip(draws.prompts[i : i + batch_size], draws.num_options[i : i + batch_size], strict=True)
        examples = [{"prompt": p, "num_options": n} for p, n in rows]
        hidden = _hidden(model, [e["prompt"] for e in examples])
        chosen += letter_logits(model, hidden, examples, torch.tensor(reward.letter_ids)).argmax(-1).tolist()
    return chosen, draws


def reader_accuracy(
    model, tokenizer, captions: list[str], questions: list[MCQ], *, seed: int = 0, batch_size: int = 256
) -> tuple[float, float]:
    """(accuracy against the truth, agreement with `implied_answer`) of the reader on (caption, question) pairs,
    through the reward's prompts and read-out."""
    chosen, draws = reader_choices(model, tokenizer, captions, questions, seed=seed, batch_size=batch_size)
    right = [c == a for c, a in zip(chosen, draws.answers, strict=True)]
    implied = [implied_answer(parse_caption(c), q) for c, q in zip(captions, questions, strict=True)]
    agree = [c == (len(q.options) if i is None else o.index(i))
             for c, i, q, o in zip(chosen, implied, questions, draws.orders, strict=True)]  # fmt: skip
    return float(np.mean(right)), float(np.mean(agree))
