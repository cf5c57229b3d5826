"""Several processes (torchrun): every rank sees the global batch through gathered embeddings.

Each rank embeds its slice of the global batch; `gather_with_grad` concatenates the slices of all
ranks with gradients flowing back to their owners, so the contrastive loss sees every negative.
Every rank then computes the same global loss; averaging parameter gradients over ranks gives
exactly the single-process gradient of that loss.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist

from ..device import DeviceError, local_rank, local_world_size, make_current


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on this rank's GPU); False when alone."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if dist.is_initialized():
        return True
    if device.type != "cuda":
        dist.init_process_group("gloo")
        return True
    _check_own_gpu(device)
    make_current(device)  # before NCCL starts: its communicator binds to the current GPU
    bind = "device_id" in inspect.signature(dist.init_process_group).parameters  # torch >= 2.3
    dist.init_process_group("nccl", **({"device_id": device} if bind else {}))
    return True


def _check_own_gpu(device: torch.device) -> None:
    """NCCL needs one GPU per rank: refuse several ranks of a machine on one named GPU."""
    rank = local_rank()
    if rank is not None and local_world_size() > 1 and device.index != rank:
        raise DeviceError(f"--device {device} under torchrun with {local_world_size()} processes per machine "
                          f"would put LOCAL_RANK {rank} on another rank's GPU (NCCL needs one GPU per rank): "
                          f"use --device cuda (or auto), which gives each rank cuda:LOCAL_RANK")


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated in rank order; gradients reach each rank's own slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def gather(t: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated, no gradient (frozen features, item codes)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def average_gradients(params) -> None:
    """Mean of each parameter's gradient over ranks (what DDP does), after backward."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
