"""Train through the Python API, then caption held-out images with the trained checkpoint and score the captions.

    python examples/train_and_score.py                       # the miniature world's default run, a few CPU minutes
    python examples/train_and_score.py --steps 2 --output-dir /tmp/try   # a smoke run

The configuration is built the way the command builds it (`parse_config`: the world's defaults for the world's
policy, a --config file, flags), so anything `python -m caprl_core.train --help` lists can be passed here too. The
reward is built from the reader directory, so it reads prompts in the wording the reader was trained on (its
caprl_prompt.json; `RewardConfig()` leaves `template` to the reader).
"""

from __future__ import annotations

import sys

from caprl_core.caption import caption_images
from caprl_core.config_cli import parse_config
from caprl_core.data import load_image, load_jsonl
from caprl_core.policy import PolicyPrompter, load_models
from caprl_core.reward import CapRLReward
from caprl_core.reward_config import RewardConfig
from caprl_core.train import train
from caprl_core.world import make_world_data


def main(argv: list[str]) -> None:
    config, resume = parse_config(["--output-dir", "runs/api-example", *argv])  # the last --output-dir given wins
    run_dir = train(config, resume=resume)
    checkpoint = run_dir / "checkpoints" / "latest"  # accepted wherever a model directory is
    print(f"trained: {run_dir}; scoring {checkpoint}")

    models = load_models(checkpoint, config.model.reader)  # reader None: the shipped world reader
    examples = load_jsonl(make_world_data(run_dir / "heldout", "heldout")).examples[:8]
    prompter = PolicyPrompter(models.tokenizer, models.image_processor, config.rollout.instruction)
    images = [load_image(e.image) for e in examples]
    captions = [c[0] for c in caption_images(models.policy, prompter, images, max_new_tokens=32, temperature=0.7)]

    reward = CapRLReward(models.reader, models.reader_tokenizer, RewardConfig(mode="soft", num_draws=4))
    rewards, _ = reward.score(captions, [e.questions for e in examples], step=0)
    for example, caption, r in zip(examples, captions, rewards.tolist(), strict=True):
        print(f"{r:.2f}  {caption!r}  (reference: {example.caption!r})")
    print(f"mean reward over {len(examples)} held-out images: {rewards.mean().item():.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
