"""The miniature world's VQA model: a small Qwen2.5-VL that answers a cell question from the image by its option-letter
logits, the world's stand-in for the small VLM of QA curation (issue 26; `python -m caprl_core.curate filter`).

It joins the build's start policy's vision tower (`world.policy`: it already sees each cell) and the build's reader as
its language model (`world.reader`: it already matches an answer against lettered options and copies the letter;
`make_vqa`), and is fine-tuned on the candidate questions of `world.questions`, drawn from scenes of the "policy" and
"reader" parts of the scene space only (`splits.PARTS`), in two stages (`train_vqa`; `IdealTokens` says why): the
language model learns to answer from ideal image tokens (each cell's content words, as input embeddings), then the
vision tower learns to write those tokens. The answering loss trains both of the filter's modes:

- with the image: every question, cross-entropy on the right letter;
- text-only (the same prompt without the vision block): leaky questions towards their right letter, visual ones
  towards the uniform distribution over their options (the text does not say, so the model must not pretend to).

Prompt: exactly the curation filter's (`caprl_core.curate.prompts.VQAPrompter`: the image block, the question and its
lettered options, the answer cue; text-only the same without the image block; no chat turns, as the reader has none),
with the world's template `WORLD_VQA_TEMPLATE`, which the model directory carries as caprl_vqa_prompt.json; the option
letters' logits at the prompt's last position are read over the question's options.

`filter_scores` answers each question R times (rotations of its options) in both modes, as the filter does, and
`measure` turns that into the filter's decisions against the questions' ground truth (docs/world.md has the figures).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from caprl_core.curate.prompts import VQAPrompter, VQATemplate
from caprl_core.data import MAX_OPTIONS, MCQ
from caprl_core.world import IMAGE_SIZE
from caprl_core.world.questions import candidate_questions
from caprl_core.world.scenes import draw_scene
from caprl_core.world.splits import sample_scene

# The world's question template (the directory's caprl_vqa_prompt.json): the world reader's question part
# (`reader.WORLD_TEMPLATE`), which the model's language model was trained to read, after the image block where the
# reader had its caption. The model directory has no chat template, as the reader's has none: the prompt is the raw
# text, `<|vision_start|>` + image + `<|vision_end|>` + this.
WORLD_VQA_TEMPLATE = VQATemplate(question="\n\nQuestion: {question}\nOptions:\n{options}\n",
                                 option=" {letter}. {text}", answer_cue="Answer:")  # fmt: skip
ROTATIONS = 4
VISUAL_MIN, TEXT_MAX = 0.75, 0.25  # the filter's default thresholds: keep visual accuracy > 0.75, text-only < 0.25


def world_prompter(tokenizer, image_processor) -> VQAPrompter:
    """The curation filter's prompter (`curate.prompts.VQAPrompter`) with the world's template."""
    return VQAPrompter(tokenizer, image_processor, WORLD_VQA_TEMPLATE)


def _hidden(model, ids: list[list[int]], images: list[dict] | None, image_tokens: list[torch.Tensor] | None = None
            ) -> torch.Tensor:  # fmt: skip
    """Last-layer hidden states [B, L, H] of right-padded prompts: with their images (the vision tower's tokens, or
    `image_tokens`, one [NUM_CELLS, H] per prompt, in its place: stage "read" of `train_vqa`), or text-only."""
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
        inputs |= {"mm_token_type_ids": types, "image_grid_thw": torch.cat([p["image_grid_thw"] for p in images])}
        if image_tokens is None:
            inputs["pixel_values"] = torch.cat([p["pixel_values"] for p in images])
        else:  # transformers' own way to hand the language model an image's tokens
            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=image_tokens)}
    return model.model(**inputs, use_cache=False).last_hidden_state


def _last(hidden: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
    """Each prompt's last real position [B, H] of hidden states [B, L, H]."""
    return hidden[torch.arange(len(ids)), torch.tensor([len(x) - 1 for x in ids])]


def option_logits(model, hidden: torch.Tensor, letter_ids: list[int], num_options: list[int]) -> torch.Tensor:
    """Letter logits [B, MAX_OPTIONS] from last hidden states [B, H]; -inf past each question's options."""
    logits = model.lm_head(hidden)[:, letter_ids].float()
    valid = torch.arange(len(letter_ids))[None] < torch.tensor(num_options)[:, None]
    return logits.masked_fill(~valid, float("-inf"))


def make_vqa(reader, policy):
    """The VQA model before training: a Qwen2.5-VL with the start policy's vision tower and the reader's language
    model (its weights, heads and rotary base; for text tokens M-RoPE is the reader's 1-D RoPE), so that it starts
    with the reader's skill of matching an answer against lettered options and the policy's of seeing cells, and
    training has only to join them. The two share the world's tokenizer and hidden size."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    rc, pc = reader.config, policy.config
    if rc.hidden_size != pc.text_config.hidden_size or rc.vocab_size != pc.text_config.vocab_size:
        raise ValueError(f"reader: hidden size and vocabulary must be the policy's, got {rc.hidden_size}, "
                         f"{rc.vocab_size}, not {pc.text_config.hidden_size}, {pc.text_config.vocab_size}")  # fmt: skip
    head_dim = rc.hidden_size // rc.num_attention_heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    section[0] += head_dim // 2 - sum(section)
    theta = (getattr(rc, "rope_parameters", None) or {}).get("rope_theta") or getattr(rc, "rope_theta", 10000.0)
    text = pc.text_config.to_dict()
    text.update(num_attention_heads=rc.num_attention_heads, num_key_value_heads=rc.num_key_value_heads,
                intermediate_size=rc.intermediate_size, num_hidden_layers=rc.num_hidden_layers,
                rms_norm_eps=rc.rms_norm_eps, rope_scaling={"type": "mrope", "mrope_section": section},
                rope_theta=theta)  # fmt: skip
    text["rope_parameters"] = {"mrope_section": section, "rope_theta": theta, "rope_type": "default", "type": "mrope"}
    special = {k: getattr(pc, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id") if getattr(pc, k, None) is not None}  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=pc.vision_config.to_dict(), tie_word_embeddings=True,
                              **special)  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration(config)
    state = {k: v for k, v in policy.state_dict().items() if k.startswith("model.visual.")}
    state |= {"model.language_model." + k.removeprefix("model."): v for k, v in reader.state_dict().items()
              if k.startswith("model.")}  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"make_vqa: weights do not fit (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.eval()


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
