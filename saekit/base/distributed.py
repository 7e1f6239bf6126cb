"""Running a stage under torchrun: one process per device, each with a rank; without torchrun, one
process of rank 0 in a world of 1, and every function here does nothing.

    torchrun --nproc_per_node=2 01_save_activations.py        # two processes on this machine
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 02_train_sae.py

The backend is nccl on CUDA and gloo on the CPU; LOCAL_RANK picks a process's GPU. Work is split
into contiguous shares by rank (`share`), so that concatenating the ranks' results in rank order
gives what one process would have produced.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(device: torch.device) -> World:
    """Join the process group torchrun set up (once), or a world of one without torchrun."""
    if not launched_by_torchrun():
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    # a rank that leaves with its group still up can abort in gloo's teardown ("terminate called without
    # an active exception"), failing the whole torchrun: stages end with `leave_world`, and this catches
    # the ranks that leave on an error
    atexit.register(_destroy_group, world)
    return world


def process_device(device: torch.device) -> torch.device:
    """Under torchrun, each process on a node takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def share(n: int, world: World) -> tuple[int, int]:
    """The contiguous [start, stop) of n items that this rank handles."""
    return n * world.rank // world.size, n * (world.rank + 1) // world.size


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_(tensor: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """Reduce in place across ranks (sum or max); the same tensor back, for chaining."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def leave_world(world: World) -> None:
    """The end of a stage on every rank: wait until every rank is done (rank 0 writes the artifacts
    while the others wait), then tear the group down together. A rank that tears down while another
    still talks to it can abort in gloo's teardown, failing the whole torchrun."""
    barrier(world)
    _destroy_group(world)


def _destroy_group(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
