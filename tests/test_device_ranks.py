"""Under torchrun every rank takes its own device: cuda:LOCAL_RANK (a pure choice, tested for 8 GPUs
without any), and a real 2-process run (torch.distributed.run, gloo on CPU) where each rank reports
what it chose and the process group it joined."""

import json
import os
import subprocess
import sys

import pytest
import torch

from anybind.align.distributed import init_from_env
from anybind.device import DeviceError, local_world_size, rank_gpu_index

RANK_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from anybind.align.distributed import gather, init_from_env
from anybind.device import local_rank, rank_gpu_index, select_device

device = select_device(os.environ.get("TEST_DEVICE", "auto"))
joined = init_from_env(device)
mine = {"rank": dist.get_rank(), "local_rank": local_rank(), "device": str(device),
        "backend": dist.get_backend(), "gpu_of_8": rank_gpu_index(local_rank(), 8),
        "current_gpu": torch.cuda.current_device() if device.type == "cuda" else None}
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, mine)
# a collective on each rank's own device: the ranks' values summed, seen by all
total = gather(torch.tensor([float(dist.get_rank() + 1)], device=device)).sum().item()
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"joined": joined, "ranks": everyone, "total": total}, f)
dist.destroy_process_group()
"""


def test_each_local_rank_takes_its_own_gpu():
    assert [rank_gpu_index(r, 8) for r in range(8)] == list(range(8))
    assert rank_gpu_index(None, 1) == 0  # alone: the first GPU


def test_more_ranks_than_gpus_is_refused_with_the_fix():
    with pytest.raises(DeviceError, match=r"LOCAL_RANK=2.*no CUDA device 2; 2 visible.*nproc_per_node"):
        rank_gpu_index(2, 2)
    with pytest.raises(DeviceError, match="no CUDA device 0; 0 visible"):
        rank_gpu_index(None, 0)


def test_local_world_size_reads_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert local_world_size() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert local_world_size() == 8


def test_one_named_gpu_for_every_rank_is_refused_before_nccl(monkeypatch):
    """`--device cuda:0` under torchrun with 2 processes per machine: both ranks on one GPU, NCCL would fail."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DeviceError, match=r"LOCAL_RANK 1 on another rank's GPU.*--device cuda"):
        init_from_env(torch.device("cuda", 0))
    assert not torch.distributed.is_initialized()


def _torchrun(tmp_path, nproc: int, device: str = "auto") -> dict:
    script, out = tmp_path / "ranks.py", tmp_path / "ranks.json"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEST_DEVICE": device}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(script), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # two fresh interpreters importing torch: 5 s idle, up to 20 s on a loaded machine
def test_two_real_processes_each_use_their_own_device(tmp_path):
    """torchrun --nproc_per_node=2 on CPU: gloo, LOCAL_RANK honoured, each rank maps to its own GPU index."""
    report = _torchrun(tmp_path, 2)
    ranks = report["ranks"]
    assert report["joined"] is True and report["total"] == 3.0  # 1 + 2: both ranks took part
    assert [r["rank"] for r in ranks] == [0, 1] and [r["local_rank"] for r in ranks] == [0, 1]
    assert [r["gpu_of_8"] for r in ranks] == [0, 1]  # what --device cuda would give on an 8-GPU machine
    if torch.cuda.device_count() >= 2:
        assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"] and {r["backend"] for r in ranks} == {"nccl"}
        assert [r["current_gpu"] for r in ranks] == [0, 1]
    else:
        assert {r["device"] for r in ranks} == {"cpu"} and {r["backend"] for r in ranks} == {"gloo"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_one_cuda_process_joins_nccl_on_its_gpu(tmp_path):
    report = _torchrun(tmp_path, 1, device="cuda")
    assert report["ranks"] == [{"rank": 0, "local_rank": 0, "device": "cuda:0", "backend": "nccl",
                                "gpu_of_8": 0, "current_gpu": 0}]
    assert report["total"] == 1.0
