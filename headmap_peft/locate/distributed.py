"""Several processes (``accelerate launch``, ``torchrun``): each evaluates a shard of the batches, sums are reduced."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def ensure_initialized() -> None:
    """Under a launcher (WORLD_SIZE > 1) without a process group yet, start one the way accelerate does."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `tensor` over all processes (the tensor itself with one process)."""
    _, size = world()
    if size == 1:
        return tensor
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    reduced = tensor.to(device).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
