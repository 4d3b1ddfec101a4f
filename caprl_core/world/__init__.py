"""The miniature CapRL world: scenes, questions, a caption grammar with fact precision and
recall, and the recipe that trains a reader and a starting policy in it.

A scene is 1 to 4 coloured shapes in four cells, the middles of the edges of a 3x3 grid (`caprl_core.world.scenes`: 6
colours, 3 kinds, cells top / left / right / bottom, one word and one token each); its facts are the four cells'
contents, more than a terse caption holds. The reference caption states every cell, empty ones included ("top: red
circle. left: none. ..."), so a caption answers a question exactly when it has the asked cell's statement. Questions
(`scenes.scene_questions`) ask what is at a cell ("none" for an empty one), and for a cell with a shape its colour and
its kind. The caption grammar, its parser, what a caption implies for each question and fact precision / recall are in
`caprl_core.world.grammar`; train and eval log the precision and recall of any dataset whose reference captions are
complete captions of the grammar (the synthetic shapes data are).

`python -m caprl_core.world build --out DIR` trains a reader (`world.reader`: a small Qwen2 that answers through
CapRLReward's own prompts) and a start policy (`world.policy`: a small Qwen2.5-VL fine-tuned to terse captions) and
writes them as Hugging Face directories with a card of measured figures; a last stage joins them into the world's VQA
model (`world.vqa`), which QA curation's filter scores the world's candidate questions with (`world.questions`:
visual and leaky questions with known ground truth). The package ships the build of the default BuildConfig in
`SHIPPED` (caprl_core/world/shipped: reader/, policy/, vqa/, card.json); `python -m caprl_core.train` and
`python -m caprl_core.eval` use them, and this world's data, when given no models and no data (docs/world.md has the
figures). The ablations (`world.ablations`) add, for their `qa` family, the shipped reader fine-tuned to read those
candidate questions and answer the leaky ones from their text (`world.qa_reader`, built into the ablation's directory).

Data splits are disjoint by construction (`caprl_core.world.splits`): the scene space is partitioned by a stable hash
of each scene into the trainer's images, the held-out images of evaluations, the reader's and the policy's training
streams and the build's checks, and each draws only scenes of its own part; a seed (`SPLIT_SEEDS`) fixes which scenes
of its part a split draws.

    python -m caprl_core.world build --out DIR          # train both models (deterministic for a torch build)
    python -m caprl_core.world build --only vqa --out DIR   # the VQA stage alone, on an existing build
    python -m caprl_core.world data --split heldout --out DIR [--num 64]
    python -m caprl_core.world questions --split heldout --out DIR [--leaky-fraction 0.5]
"""

from __future__ import annotations

from pathlib import Path

# Seeds of the scene streams: `train` and `heldout` are dataset files (make_world_data); `reader` and `policy` are the
# streams the shipped models were trained on; `reader_eval` and `policy_eval` measure them after training. Each draws
# from its own part of the scene space (`splits.PARTS`: the two checks share the part "check"), never by seed alone.
# `vqa` is the VQA model's training stream (parts "policy" and "reader"), `vqa_eval` its held-out check (`world.vqa`).
SPLIT_SEEDS = {"train": 1_000, "heldout": 2_000, "reader": 3_000, "policy": 4_000, "reader_eval": 5_000,
               "policy_eval": 6_000, "vqa": 7_000, "vqa_eval": 8_000}  # fmt: skip
DEFAULT_SIZES = {"train": 256, "heldout": 64}
# The world's images: 84 px, so that each cell of the 3x3 grid is one 28-px merged patch group, one image token.
IMAGE_SIZE = 84
# The shipped models: reader/, policy/, vqa/ and card.json (`python -m caprl_core.world build --out` this rebuilds).
SHIPPED = Path(__file__).resolve().parent / "shipped"


def make_world_data(out_dir: str | Path, split: str, num_images: int | None = None, faint: float = 0.0) -> Path:
    """Write the `split` ("train" or "heldout") dataset under out_dir (PNGs + data.jsonl); returns the JSONL path.
    Its scenes are of the split's part only (`splits.sample_scene`); the split's seed fixes every image and question,
    so a faint copy (`scenes.draw_scene`: shapes faded `faint` of the way to their cell's grey) has the same scenes."""
    from caprl_core.world.scenes import make_synthetic_dataset
    from caprl_core.world.splits import sample_scene

    if split not in DEFAULT_SIZES:
        raise ValueError(f"split: expected one of {sorted(DEFAULT_SIZES)}, got {split!r}")
    num = DEFAULT_SIZES[split] if num_images is None else num_images
    return make_synthetic_dataset(out_dir, num, seed=SPLIT_SEEDS[split], image_size=IMAGE_SIZE,
                                  sample=lambda rng: sample_scene(rng, split), faint=faint)  # fmt: skip
