"""The captioning policy's side of CapRL: turning an image into the policy's prompt, and loading policy and reader.

    prompter = PolicyPrompter(tokenizer, image_processor)
    prompt = prompter(image)  # {"input_ids" [L], "pixel_values" [rows, C*t*p*p], "image_grid_thw" [1, 3],
                              #  "mm_token_type_ids" [L]}: one prompt of `Engine.generate`

Qwen2.5-VL's own processor (and so `AutoProcessor`) cannot be built without torchvision, which the CPU path must not
need (docs/install.md). So the prompt is made from the two parts that do work without it, as the
processor itself does: the image processor turns the image into patches and a [t, h, w] grid, and the tokenizer's
single `<|image_pad|>` is expanded to t*h*w / merge**2 placeholders (one per merged 2x2 patch group), which the
model then replaces with the vision tower's output. Users with a full processor pass it to `from_processor`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from caprl_core.checkpoint import LATEST
from caprl_core.resume import latest_checkpoint

__all__ = [
    "DEFAULT_INSTRUCTION",
    "ChatTemplateFiles",
    "ModelLoadError",
    "Models",
    "PolicyPrompter",
    "load_models",
    "load_policy",
    "load_reader",
    "tiny_image_processor",
    "tiny_policy_and_reader",
    "TINY_RANDOM",
    "caption_tokens",
    "stop_token_ids",
]

DEFAULT_INSTRUCTION = (
    "Describe this image in as much detail as you can, accurately: every object, its colour, shape, position and "
    "number, and any visible text. Mention only what is really in the image."
)
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


def tiny_image_processor():
    """An image processor for `caprl_core.models.tiny_qwen2_5_vl`: 14-px patches, 2x2 merge, temporal patch 2.

    A 112x112 image stays 112x112 (a multiple of patch * merge = 28): an 8x8 patch grid, 16 image tokens after the
    merge. Other images are resized (aspect kept) to between 56x56 and 112x112 pixels' worth, so a prompt never
    holds more than 16 image tokens.
    """
    from transformers import Qwen2VLImageProcessorPil  # the torchvision-free class (Qwen2VLImageProcessor falls
    # back to it with a warning when torchvision is missing)

    return Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=112 * 112
    )


class PolicyPrompter:
    """Builds the policy's prompt dict for one image: the user turn `<|vision_start|><|image_pad|>*n<|vision_end|>`
    followed by `instruction`, wrapped in the tokenizer's chat template (with the assistant's turn opened) when it
    has one. use_chat_template: None = use it when the tokenizer (or `chat_template`) has one; False = the raw
    user text only. chat_template: a template to use instead of the tokenizer's (e.g. a processor's).
    """

    def __init__(
        self, tokenizer, image_processor, instruction: str = DEFAULT_INSTRUCTION, *,
        use_chat_template: bool | None = None, chat_template: str | None = None,
    ) -> None:  # fmt: skip
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.instruction = instruction
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.image_token_id = self._special_id(IMAGE_PAD)
        for token in (VISION_START, VISION_END):
            self._special_id(token)
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if use_chat_template and template is None:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template (and none was given)")
        self.chat_template = template if use_chat_template is not False else None
        # Token ids of the whole prompt with a single <|image_pad|>: the text never changes, only the expansion.
        self._ids = self._template_ids()

    @classmethod
    def from_processor(cls, processor, instruction: str = DEFAULT_INSTRUCTION, **kwargs) -> PolicyPrompter:
        """From a full transformers processor (e.g. Qwen2_5_VLProcessor, which needs torchvision): its tokenizer and
        image processor, and its chat template when the tokenizer has none."""
        for part in ("tokenizer", "image_processor"):
            if getattr(processor, part, None) is None:
                raise ValueError(f"processor has no {part}: expected a vision-language processor such as "
                                 f"Qwen2_5_VLProcessor, got {type(processor).__name__}")  # fmt: skip
        tokenizer = processor.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            kwargs.setdefault("chat_template", getattr(processor, "chat_template", None))
        return cls(tokenizer, processor.image_processor, instruction, **kwargs)

    def _special_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token: expected a Qwen2-VL style vocabulary")
        return int(ids[0])

    def _template_ids(self) -> list[int]:
        content = VISION_START + IMAGE_PAD + VISION_END + self.instruction
        if self.chat_template is not None:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=True,
            )  # fmt: skip
        else:
            text = content
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.image_token_id) != 1:
            raise ValueError(f"the rendered prompt holds {ids.count(self.image_token_id)} {IMAGE_PAD} tokens, "
                             f"expected 1 (does the chat template or the instruction add or drop one?)")  # fmt: skip
        return ids

    def num_image_tokens(self, image_grid_thw: torch.Tensor) -> int:
        """Placeholders of one image with grid [1, 3] (t, h, w in patches): t*h*w / merge**2."""
        return int(image_grid_thw.prod()) // self.merge_size**2

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The prompt dict of `image` (any PIL mode; converted to RGB)."""
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL.Image, got {type(image).__name__}")
        vision = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        pixel_values = vision["pixel_values"]  # [t*h*w, C * temporal_patch * patch**2]
        grid = torch.as_tensor(vision["image_grid_thw"], dtype=torch.long).reshape(1, 3)  # [1, 3]
        pad = self._ids.index(self.image_token_id)
        ids = self._ids[:pad] + [self.image_token_id] * self.num_image_tokens(grid) + self._ids[pad + 1 :]
        input_ids = torch.tensor(ids, dtype=torch.long)  # [L]
        return {
            "input_ids": input_ids,
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
            "mm_token_type_ids": (input_ids == self.image_token_id).long(),  # [L], 1 on image placeholders
        }


# --- loading ---------------------------------------------------------------------------------------------------


# Names a command line may give for a model dtype; "auto" (None) is bf16 on CUDA and fp32 elsewhere.
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stop_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids that end a caption: the tokenizer's eos and the model's generation-config eos ids (Qwen instruct models
    list two)."""
    ids = [tokenizer.eos_token_id]
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    ids += eos if isinstance(eos, (list, tuple)) else [eos]
    return tuple(sorted({int(i) for i in ids if i is not None}))


def caption_tokens(completion) -> list[int]:
    """A sampled caption's token ids without the stop token that ended it (`completion`: a sampler Completion)."""
    return completion.token_ids[: len(completion.token_ids) - int(completion.finish_reason == "stop")]


def _default_dtype(dtype: torch.dtype | None, device: str | torch.device) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class ModelLoadError(ValueError):
    """A policy or reader that cannot be loaded; the message is one line naming the flag or path."""


def _one_line(e: Exception) -> str:
    """`Type: message` on one line (transformers and safetensors errors can span several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class DeviceError(ValueError):
    """--device names a device this machine does not have; the message is one line naming the flag."""


def checked_device(name: str) -> torch.device:
    """`name` (cpu, cuda, cuda:N) as a device this machine has, for train and eval alike; DeviceError otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device: one of cpu, cuda, cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device here (torch {torch.__version__}, "
                          "torch.cuda.is_available() is False); use --device cpu")  # fmt: skip
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def resolve_latest(path: str | Path) -> Path:
    """A run's checkpoints/latest (a text file) as the checkpoint it names; any other path as it is."""
    path = Path(path)
    if path.name == LATEST and path.is_file():
        return path.parent / path.read_text().strip()
    return path


def _check_dir(path: str | Path, what: str) -> Path:
    path = resolve_latest(path)
    if not path.is_dir():
        raise ModelLoadError(f"{what} {path}: {'not a directory' if path.exists() else 'no such directory'}")
    if (path / "checkpoints").is_dir():  # its config.json is the run's configuration, not a model's
        raise ModelLoadError(f"{what} {path}: a training run directory, not a model; give one of its checkpoints, "
                             f"{_latest_in_run(path)}")  # fmt: skip
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{what} {path}: not a Hugging Face model directory (no config.json)")
    return path


def _latest_in_run(run: Path) -> str:
    """Where a run directory's newest checkpoint is, for an error message."""
    latest = latest_checkpoint(run)
    return f"e.g. {latest}" if latest is not None else f"{run / 'checkpoints' / 'step-N'} (it has none yet)"


def _load_tokenizer(path: Path, what: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{what} {path}: cannot load a tokenizer from it ({_one_line(e)})") from e
    processor_template = path / "chat_template.json"  # a processor's template (hub VL models ship one)
    if getattr(tokenizer, "chat_template", None) is None and processor_template.is_file():
        try:
            tokenizer.chat_template = json.loads(processor_template.read_text())["chat_template"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{what} {processor_template}: unreadable chat template ({_one_line(e)})") from e
    return tokenizer


def _load_image_processor(path: Path, what: str):
    if not (path / "preprocessor_config.json").is_file():
        raise ModelLoadError(f"{what} {path}: no preprocessor_config.json (the image processor's settings)")
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, OSError, ValueError):
        # Without torchvision the Auto class may refuse the fast processor; the PIL one reads the same file.
        from transformers import Qwen2VLImageProcessorPil

        try:
            return Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ModelLoadError(f"{what} {path}: cannot load its image processor ({_one_line(e)})") from e


def _load_model(path: Path, what: str, dtype: torch.dtype, device: str | torch.device):
    from caprl_core.models import load_pretrained

    try:
        return load_pretrained(path, dtype=dtype, device=device)
    except Exception as e:  # noqa: BLE001 -- any failure here (bad config, corrupt or mismatched weights, out of
        # memory) is the user's directory or machine, not a bug: one line naming the path, the cause chained.
        raise ModelLoadError(f"{what} {path}: cannot load the model ({_one_line(e)})") from e


def load_policy(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", what: str = "policy"
):
    """(model, tokenizer, image_processor) of a vision-language policy in a local Hugging Face directory.
    dtype None: bf16 on CUDA, fp32 on CPU. Raises ModelLoadError (a ValueError) naming `what` and the path when a
    part is missing or does not load. When the tokenizer has no chat template, a chat_template.json beside it (a
    processor's) gives it one."""
    path = _check_dir(path, what)
    tokenizer = _load_tokenizer(path, what)
    image_processor = _load_image_processor(path, what)
    try:  # a tokenizer without Qwen2-VL's vision tokens cannot prompt the policy: say so before loading weights
        PolicyPrompter(tokenizer, image_processor)
    except ValueError as e:
        raise ModelLoadError(f"{what} {path}: {e}") from e
    model = _load_model(path, what, _default_dtype(dtype, device), device)
    if not hasattr(model.config, "vision_config"):
        raise ModelLoadError(f"{what} {path}: {type(model).__name__} has no vision tower; the policy must be a "
                             f"vision-language model such as Qwen2.5-VL")  # fmt: skip
    return model, tokenizer, image_processor


def load_reader(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", what: str = "reader"
):
    """(model, tokenizer) of the reader LLM in a local Hugging Face directory. dtype None: bf16 on CUDA, fp32 on
    CPU. Raises ModelLoadError (a ValueError) naming `what` and the path when a part is missing or does not load."""
    path = _check_dir(path, what)
    tokenizer = _load_tokenizer(path, what)
    model = _load_model(path, what, _default_dtype(dtype, device), device)
    return model, tokenizer


class ChatTemplateFiles:
    """A policy directory's separate chat-template files (chat_template.json: a processor's; chat_template.jinja),
    copied verbatim into each checkpoint so that it is laid out like the directory the run started from. It has
    `save_pretrained`, like the tokenizer and image processor it is saved beside."""

    NAMES = ("chat_template.json", "chat_template.jinja")

    def __init__(self, directory: str | Path | None = None) -> None:
        self.files: dict[str, bytes] = {}
        for name in self.NAMES if directory is not None else ():
            if (Path(directory) / name).is_file():
                self.files[name] = (Path(directory) / name).read_bytes()

    def save_pretrained(self, directory: str | Path) -> None:
        for name, data in self.files.items():
            (Path(directory) / name).write_bytes(data)


@dataclass
class Models:
    """The models of a run or an evaluation. `processors`: what a checkpoint of the policy saves beside its weights
    (tokenizer, image processor, the start directory's chat-template files), so that the checkpoint is itself a
    policy directory. `builtin`: the tiny random pair (TINY_RANDOM)."""

    policy: torch.nn.Module
    tokenizer: object
    image_processor: object
    reader: torch.nn.Module
    reader_tokenizer: object
    builtin: bool
    chat_template_files: ChatTemplateFiles = field(default_factory=ChatTemplateFiles)
    reader_template: object = None  # the reader directory's reward prompt (reward_prompts.PromptTemplate) if any

    @property
    def processors(self) -> list:
        return [self.tokenizer, self.image_processor, self.chat_template_files]


TINY_RANDOM = "tiny-random"  # the --policy / --reader value of the tiny random pair (plumbing checks, never learning)


def load_models(
    policy: str | Path | None, reader: str | Path | None, *, dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu", seed: int = 0,
) -> Models:  # fmt: skip
    """The one rule of `train` and `eval` for which models to use. A directory is loaded; None is the package's
    shipped miniature-world model in that role (`caprl_core.world.SHIPPED`: a trained reader, a terse start policy),
    so either flag may be given alone; TINY_RANDOM for both is the built-in tiny pair with random weights
    (`tiny_policy_and_reader(seed)`), and for one only an error (its tokenizer is the pair's). dtype None: bf16 on
    CUDA, fp32 elsewhere. A reader directory with a caprl_prompt.json gives its prompt (`Models.reader_template`).
    Raises ModelLoadError (a ValueError) with a one-line message naming the flag and the path."""
    dtype = _default_dtype(dtype, device)
    tiny = [str(x) == TINY_RANDOM for x in (policy, reader)]
    if any(tiny):
        if not all(tiny):
            flag = "--reader" if tiny[0] else "--policy"
            raise ModelLoadError(f"{flag}: must be {TINY_RANDOM} too with the other {TINY_RANDOM} (the random pair "
                                 f"shares one tokenizer)")  # fmt: skip
        tiny_policy, tiny_reader, tokenizer, image_processor = tiny_policy_and_reader(seed)
        return Models(tiny_policy.to(device, dtype), tokenizer, image_processor, tiny_reader.to(device, dtype),
                      tokenizer, builtin=True)  # fmt: skip
    policy = shipped_dir("policy") if policy is None else policy
    reader = shipped_dir("reader") if reader is None else reader
    policy_model, tokenizer, image_processor = load_policy(policy, dtype=dtype, device=device, what="--policy")
    reader_model, reader_tokenizer = load_reader(reader, dtype=dtype, device=device, what="--reader")
    from caprl_core.reward_prompts import load_prompt_template

    try:
        template = load_prompt_template(reader)
    except ValueError as e:
        raise ModelLoadError(f"--reader {e}") from e
    return Models(policy_model, tokenizer, image_processor, reader_model, reader_tokenizer, builtin=False,
                  chat_template_files=ChatTemplateFiles(policy), reader_template=template)  # fmt: skip


def shipped_dir(role: str) -> Path:
    """The shipped world model directory of `role` ("policy" or "reader")."""
    from caprl_core.world import SHIPPED

    if not (SHIPPED / role / "config.json").is_file():
        raise ModelLoadError(f"--{role}: not given and the shipped world {role} is missing from {SHIPPED} (rebuild it: "
                             f"python -m caprl_core.world build --out {SHIPPED})")  # fmt: skip
    return SHIPPED / role


def tiny_policy_and_reader(seed: int = 0):
    """The built-in defaults, random weights: (policy, reader, tokenizer, image_processor) with a tiny Qwen2.5-VL
    policy and a tiny Qwen2 reader sharing `tiny_tokenizer()`, and `tiny_image_processor()`."""
    from caprl_core.models import tiny_qwen2, tiny_qwen2_5_vl, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    policy = tiny_qwen2_5_vl(tokenizer=tokenizer, seed=seed)
    reader = tiny_qwen2(tokenizer=tokenizer, seed=seed + 1)  # another stream: the two embeddings are not copies
    return policy, reader, tokenizer, tiny_image_processor()
