"""Multi-process training through torchrun and torch.distributed (DistributedDataParallel), one process otherwise.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); the process group uses NCCL on CUDA
and gloo on the CPU. Each rank draws different pairs of one seeded sequence (rank r takes slots
r * batch .. (r + 1) * batch - 1 of every epoch's draw), DDP averages the gradients, only rank 0 writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """Whether this process writes checkpoints, the log and the output (rank 0 only)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place as torchrun describes it (one process when WORLD_SIZE is unset or 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World, device: torch.device) -> None:
    """Join the process group (a no-op for one process); NCCL on CUDA devices, gloo on the CPU."""
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=world.rank, world_size=world.size, **kwargs)


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def mean_over_ranks(world: World, values: torch.Tensor) -> torch.Tensor:
    """values (n,) float64 averaged over the ranks (the same tensor for one process)."""
    if not world.distributed:
        return values
    backend_device = values.device if dist.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())
    reduced = values.to(backend_device)
    dist.all_reduce(reduced)
    return reduced.to(values.device) / world.size


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (so a Ctrl-C seen by one rank stops all at the same step)."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)
