"""Multi-GPU / multi-node training through torchrun: process-group set-up and the few collectives
training needs. A single process (no torchrun) is the world_size == 1 case of the same code.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process, e.g.

    torchrun --nproc_per_node 4 -m cares train ...                        # one machine, 4 GPUs
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m cares train ...

Backend: NCCL when training on CUDA, gloo on CPU (which is how the tests run 2 processes).
Rank 0 alone writes logs and checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cares.runtime import resolve_device  # noqa: F401  (re-exported: callers import it from here too)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_preference: str = "auto") -> DistributedContext:
    """Join the process group torchrun describes in the environment (or run alone without one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(context: DistributedContext, *, synchronize: bool = False) -> None:
    """Destroy the process group. synchronize=True (a clean exit) first waits for every rank, so no rank
    tears down gloo while another still has work in flight on its connections: that race aborted a
    rank at exit ("terminate called without an active exception") once in CI. After an error, ranks
    may not all get here, so no barrier then."""
    if context.is_distributed and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def all_reduce_sum(context: DistributedContext, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place, also returned); identity when alone."""
    if context.is_distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(context: DistributedContext, obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every process (small picklable objects only)."""
    if not context.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(context: DistributedContext, obj: Any) -> Any:
    """Rank 0's obj on every process."""
    if not context.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
