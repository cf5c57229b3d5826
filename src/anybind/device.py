"""Which device computes: one function for every entry point (`--device`, torchrun ranks).

    select_device()          # cuda when a GPU is visible, else cpu (under torchrun: this rank's GPU)
    select_device("cuda:1")  # checked: a clear error when there is no such GPU

Under torchrun every process on a machine gets LOCAL_RANK 0, 1, ...; "auto" and "cuda" then mean
cuda:LOCAL_RANK, so each rank uses its own GPU; `make_current` sets it before NCCL starts.
`rank_gpu_index` is that choice as a pure function (tested without GPUs).

torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from .errors import AnybindError

if TYPE_CHECKING:
    import torch


class DeviceError(AnybindError, ValueError):
    """A device that does not exist on this machine, or a name that is not one."""


def local_rank() -> int | None:
    """This process's rank on its machine under torchrun (LOCAL_RANK), or None when alone."""
    text = os.environ.get("LOCAL_RANK")
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise DeviceError(f"LOCAL_RANK must be an integer, not {text!r}") from None


def local_world_size() -> int:
    """How many torchrun processes share this machine (LOCAL_WORLD_SIZE), 1 when alone."""
    text = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else 1


def rank_gpu_index(rank: int | None, count: int, asked: str = "cuda") -> int:
    """The GPU a process with local rank `rank` takes among `count` visible: its own, or a clear error."""
    index = rank or 0
    if not 0 <= index < count:
        where = f"{asked} (LOCAL_RANK={rank})" if rank is not None else asked
        hint = (" (one process per GPU: torchrun --nproc_per_node at most the GPU count)"
                if rank is not None else "")
        raise DeviceError(f"--device {where}: there is no CUDA device {index}; {count} visible "
                          f"(cuda:0 ... cuda:{count - 1}){hint}, or use --device cpu")
    return index


def select_device(name: str | torch.device | None = None) -> torch.device:
    """The device `name` asks for, checked against what is visible.

    None or "auto": cuda when a GPU is visible (the GPU of this rank under torchrun), else cpu.
    "cuda": the first GPU (this rank's under torchrun); "cuda:N": that GPU; "cpu"; "mps".
    """
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        return _rank_gpu(torch) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        return _mps(torch)
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is visible on this machine "
                          "(check the driver and CUDA_VISIBLE_DEVICES), or use --device cpu")
    if match.group(1) is None:
        return _rank_gpu(torch)
    return _checked_gpu(torch, int(match.group(1)), str(name))


def make_current(device: torch.device) -> None:
    """Make a GPU the process's current one, so NCCL and code that says plain "cuda" use it too."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)


def _rank_gpu(torch) -> torch.device:
    """cuda:LOCAL_RANK under torchrun, else cuda:0."""
    return torch.device("cuda", rank_gpu_index(local_rank(), torch.cuda.device_count()))


def _checked_gpu(torch, index: int, asked: str) -> torch.device:
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DeviceError(f"--device {asked}: there is no CUDA device {index}; {count} visible "
                          f"(cuda:0 ... cuda:{count - 1}), or use --device cpu")
    return torch.device("cuda", index)


def _mps(torch) -> torch.device:
    backend = getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_available():
        raise DeviceError("--device mps: no Apple GPU (MPS) is available here; use --device cpu")
    return torch.device("mps")
