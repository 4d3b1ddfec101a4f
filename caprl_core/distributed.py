"""Several processes, one step: torchrun launches, FSDP2 shards the policy, every rank rolls out its share of images.

    torchrun --standalone --nproc_per_node=8 -m caprl_core.train --policy DIR --reader DIR --data FILE ...
    torchrun --nnodes=2 --node-rank=0 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --nproc_per_node=8 \\
        -m caprl_core.train ...                               # on the second machine --node-rank=1

Without torchrun's environment (WORLD_SIZE unset) nothing here does anything: one process, the plain path.

Under torchrun, rank r of W takes images [r*B/W, (r+1)*B/W) of the step's global batch (whole groups, so advantages
stay per image), samples and scores them with its own sampler and reader replica, then all ranks exchange the
small per-caption results (rewards, lengths, ...) so that advantages and metrics are computed on the global batch
exactly as one process computes them. The policy is sharded with `fully_shard` over a 1-D mesh of all ranks, one
group per decoder layer and vision block and a root group (`TokenLogprobs`) with the rest, the lm_head included: its
sharded parameters are fp32 and are the optimizer's masters (`MixedPrecisionPolicy` casts them to the compute dtype
when it gathers them), so `MasterWeightOptimizer` makes no copies there. A rollout gathers every group once
(`gathered`), the sampler runs on the unsharded parameters, and they are resharded before the update. The update's
forward runs through the root, so FSDP's hooks gather each layer before its forward (and again in the backward),
reduce-scatter its gradients as soon as its backward is done, and reshard it: one layer's gathered weights and
unsharded gradients at a time, beside the root group's.

Gradients are summed across ranks (divide factor 1), and each micro-batch's loss share is taken against the global
batch's token (or caption) count: the summed gradient is the one-process gradient, up to reduction order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


class WorldSizeError(ValueError):
    """A global batch size that does not split into whole image groups over the ranks."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank of world_size, local_rank on its node, the FSDP device mesh."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh under torchrun

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = World()  # the default of functions that also run under torchrun: no process group


def init_world(device_type: str) -> World:
    """The process group and mesh from torchrun's environment (nccl on CUDA, gloo on CPU); one process without it."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, mesh)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """Each rank's own GPU (cuda:LOCAL_RANK); a CPU device unchanged."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.distributed else device


def local_images(images_per_step: int, world: World) -> range:
    """Indices into the step's global batch that this rank rolls out: a contiguous block of whole images."""
    if images_per_step % world.world_size:
        raise WorldSizeError(f"--images-per-step: the global batch ({images_per_step} images) must divide by the world "
                             f"size ({world.world_size} processes), so every rank gets whole image groups")  # fmt: skip
    per_rank = images_per_step // world.world_size
    return range(world.rank * per_rank, (world.rank + 1) * per_rank)


def all_gather_objects(obj: object, world: World) -> list:
    """Every rank's `obj`, in rank order (one process: [obj])."""
    if not world.distributed:
        return [obj]
    out: list = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def reduce_floats(values: dict[str, float], world: World, op: str = "sum") -> dict[str, float]:
    """Sum (or max) of each value over ranks; one process: unchanged. Every rank must pass the same keys."""
    if not world.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist(), strict=True))


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


class TokenLogprobs(torch.nn.Module):
    """The update's forward as a module around the policy: under FSDP this is the root that `fully_shard` wraps, so
    its hooks gather the parameters before the forward (the lm_head weight, used outside `policy.model`, included)
    and reduce-scatter the gradients after the backward. `fn(policy, batch, temperature)` computes the log-probs."""

    def __init__(self, policy: torch.nn.Module, fn) -> None:
        super().__init__()
        self.policy = policy
        self._fn = fn

    def forward(self, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        # Views of the op's flat outputs become tensors of their own: FSDP2 attaches its pre-backward hook to the
        # root's outputs, and warns (once per rank and run) that an in-place op on a view would drop it. [M, T] floats.
        out = self._fn(self.policy, batch, temperature)
        if isinstance(out, torch.Tensor):
            return out.clone() if out._base is not None else out
        return tuple(t.clone() if t._base is not None else t for t in out)


def shard_units(policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that get their own FSDP group: every decoder layer and vision-tower block of `policy`, found as the
    instances of the classes its Hugging Face `_no_split_modules` names (Qwen2: `Qwen2DecoderLayer`; Qwen2.5-VL: its
    decoder layer and `Qwen2_5_VLVisionBlock`; Qwen3-VL: `Qwen3VLTextDecoderLayer`, `Qwen3VLVisionBlock`), outermost
    only. That list is the one transformers itself keeps per architecture for "never split this module across
    devices", so no table of ours has to follow new models, and unlike a rule on `ModuleList` names it does not catch
    Qwen3-VL's `deepstack_merger_list`. A unit that holds the input or output embedding is refused: the lm_head (and
    the embeddings tied to it) must stay in the root group, gathered for the fused log-prob op (caprl_core.ops). A
    model whose `_no_split_modules` is empty gets no units: one group, as before per-layer sharding."""
    names = set(getattr(policy, "_no_split_modules", None) or ())
    units: list[torch.nn.Module] = []
    inside: set[int] = set()  # ids of modules already covered by a chosen unit
    for module in policy.modules():
        if id(module) in inside or type(module).__name__ not in names:
            continue
        units.append(module)
        inside.update(id(m) for m in module.modules())
    heads = [m.weight for m in (policy.get_input_embeddings(), policy.get_output_embeddings()) if m is not None]
    for unit in units:
        if any(p is w for p in unit.parameters() for w in heads):
            raise ValueError(f"shard_policy: {type(unit).__name__} holds the embeddings or the lm_head, which must "
                             "stay in the root group (gathered for the fused log-prob op)")  # fmt: skip
    return units


GROUPS_ENV = "CAPRL_FSDP_GROUPS"  # "layers" (default) or "whole": the old single group, for tests and measurements


def shard_policy(root: TokenLogprobs, world: World, compute_dtype: torch.dtype, *,
                 per_layer: bool | None = None) -> list[torch.nn.Module]:  # fmt: skip
    """fully_shard each decoder layer and vision block (`shard_units`), then the root: the root group holds the rest
    (embeddings, final norm, lm_head, the vision patch embedding and merger), so the lm_head weight used outside
    `policy.model` is gathered for the whole forward and backward, and only one layer's gathered weights and unsharded
    gradients exist at a time. `per_layer=False`: the old single group around the whole policy (kept for the test
    that compares the two and for measurements); None reads $CAPRL_FSDP_GROUPS ("layers", the default, or "whole").
    Returns the per-layer units (empty for one group).

    Parameters stay fp32 (the masters); compute in `compute_dtype`; gradients reduced in fp32 and summed."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for p in root.parameters():
        if p.dtype != torch.float32:
            raise ValueError(f"shard_policy: parameters must be loaded in float32 (the masters), got {p.dtype}")
    if per_layer is None:
        groups = os.environ.get(GROUPS_ENV, "layers")
        if groups not in ("layers", "whole"):
            raise ValueError(f"{GROUPS_ENV}: expected 'layers' or 'whole', got {groups!r}")
        per_layer = groups == "layers"
    param_dtype = None if compute_dtype == torch.float32 else compute_dtype
    units = shard_units(root.policy) if per_layer else []
    # Layers get their inputs as one process does: casting them would, e.g., round Qwen2.5-VL's vision rotary
    # cos/sin (fp32 in one process) to bf16. The root still casts the batch, as before.
    layer_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for unit in units:
        fully_shard(unit, mesh=world.mesh, mp_policy=layer_mp)
    fully_shard(root, mesh=world.mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype,
                                                                        reduce_dtype=torch.float32))  # fmt: skip
    # Sum, not mean, on every group (each has its own setting): each loss share already divides by the global batch.
    # Plain SUM reductions (gloo has no PREMUL_SUM, which a divide factor alone would use).
    for module in (*units, root):
        module.set_force_sum_reduction_for_comms(True)
        module.set_gradient_divide_factor(1.0)
    # FSDP2 picks its root lazily: the first FSDP module to run forward. The sampler calls the layers directly (never
    # through `root`), so without this a layer would make itself the root at the first rollout and the update's
    # forward would then fail. There is no public call for it in torch 2.13.
    root._get_fsdp_state()._lazy_init()
    return units


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def gathered(root: torch.nn.Module) -> Iterator[None]:
    """The policy's full parameters for the duration, resharded after: the sampler runs on them without a copy and
    without any collective of its own, so ranks may decode different numbers of steps.

    `unshard()` is not recursive in FSDP2: every group (the root and each layer's) is gathered, all at once (the
    all-gathers are issued together, then waited on). Inside, the layers' FSDP hooks still fire when the sampler calls
    them: they are told not to reshard after forward, and `reset_iter_state` after drops what those calls recorded
    (their post-forward order, which differs between ranks and would otherwise steer the next backward's prefetch)."""
    if not is_sharded(root):
        yield
        return
    layers = [m for m in root.modules() if m is not root and is_sharded(m)]
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        for handle in [m.unshard(async_op=True) for m in (root, *layers)]:
            handle.wait()
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
        root.reset_iter_state()  # reshards every group


def full_model_state(root: torch.nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """The policy's full state dict (keys of the policy itself, on CPU, fp32) on rank 0, None elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    return {k.removeprefix("policy."): v for k, v in state.items()}


def _trainable_names(root: torch.nn.Module) -> list[str]:
    """Parameter names in `MasterWeightOptimizer`'s order (model.parameters(), trainable only), policy's keys."""
    return [n.removeprefix("policy.") for n, p in root.named_parameters() if p.requires_grad]


def full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict | None:
    """The optimizer's full state on rank 0 in the one-process `MasterWeightOptimizer.state_dict()` layout (state
    keyed by parameter index, masters None: the fp32 masters are the weights saved beside it), so a checkpoint of
    N ranks resumes in one process and back. None on other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))  # fmt: skip
    if not world.is_main:
        return None
    index = {name: i for i, name in enumerate(_trainable_names(root))}
    key = lambda fqn: index[fqn.removeprefix("policy.")]  # noqa: E731
    groups = [{**g, "params": [key(f) for f in g["params"]]} for g in state["param_groups"]]
    inner = {"state": {key(f): s for f, s in state["state"].items()}, "param_groups": groups}
    return {"optimizer": inner, "masters": [None] * len(index)}


def load_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Restore a `full_optimizer_state` (or one-process) optimizer state into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = ["policy." + n for n in _trainable_names(root)]
    masters = saved.get("masters", [])
    if set(saved) != {"optimizer", "masters"} or len(masters) != len(names):
        raise ValueError(f"the saved optimizer state has {len(masters)} parameters, this policy {len(names)}")
    # fp32 master copies (a one-process low-precision run's) went into the full weights before sharding
    # (rl.state.load_full_weights): the sharded parameters are the masters.
    inner = saved["optimizer"]
    state = {names[int(i)]: s for i, s in inner["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in inner["param_groups"]]
    set_optimizer_state_dict(root, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))  # fmt: skip
