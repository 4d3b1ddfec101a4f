"""Several processes, one step: torchrun launches, FSDP2 shards the policy, every rank rolls out its share of images.

    torchrun --standalone --nproc_per_node=8 -m caprl_core.train --policy DIR --reader DIR --data FILE ...
    torchrun --nnodes=2 --node-rank=0 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --nproc_per_node=8 \\
        -m caprl_core.train ...                               # on the second machine --node-rank=1

Without torchrun's environment (WORLD_SIZE unset) nothing here does anything: one process, the plain path.

Under torchrun, rank r of W takes images [r*B/W, (r+1)*B/W) of the step's global batch (whole groups, so advantages
stay per image), samples and scores them with its own sampler and reader replica, then all ranks exchange the
small per-caption results (rewards, lengths, ...) so that advantages and metrics are computed on the global batch
exactly as one process computes them. The policy is sharded with `fully_shard` over a 1-D mesh of all ranks: its
sharded parameters are fp32 and are the optimizer's masters (`MixedPrecisionPolicy` casts them to the compute dtype
when it gathers them), so `MasterWeightOptimizer` makes no copies there. A rollout gathers the parameters once
(`gathered`), the sampler runs on the unsharded ones, and they are resharded before the update. The update's forward
runs through `TokenLogprobs`, the FSDP root, so FSDP's hooks gather, reduce-scatter and reshard around it.

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
        return self._fn(self.policy, batch, temperature)


def shard_policy(root: TokenLogprobs, world: World, compute_dtype: torch.dtype) -> None:
    """fully_shard the whole policy as one parameter group (one all-gather per forward: the models here are a few
    billion parameters, where the gathered policy fits beside its shards; see docs/distributed.md, "Memory plan").
    Parameters stay fp32 (the masters); compute in `compute_dtype`; gradients reduced in fp32 and summed."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for p in root.parameters():
        if p.dtype != torch.float32:
            raise ValueError(f"shard_policy: parameters must be loaded in float32 (the masters), got {p.dtype}")
    param_dtype = None if compute_dtype == torch.float32 else compute_dtype
    fully_shard(root, mesh=world.mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype,
                                                                        reduce_dtype=torch.float32))  # fmt: skip
    # Sum, not mean: each loss share already divides by the global batch. Plain SUM reductions (gloo has no
    # PREMUL_SUM, which a divide factor alone would use).
    root.set_force_sum_reduction_for_comms(True)
    root.set_gradient_divide_factor(1.0)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def gathered(root: torch.nn.Module) -> Iterator[None]:
    """The policy's full parameters for the duration (one all-gather), resharded after: the sampler runs on them
    without a copy and without any collective of its own, so ranks may decode different numbers of steps."""
    if not is_sharded(root):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


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
