"""`select_device`: one function picks the device for every verb (auto, cpu, cuda, cuda:N, torchrun ranks)."""

import pytest
import torch

from anybind.cli import main
from anybind.device import DeviceError, local_rank, select_device


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture()
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_and_cpu_without_a_gpu(no_gpu, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert select_device() == select_device("auto") == select_device(" AUTO ") == torch.device("cpu")
    assert select_device("cpu") == select_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_without_a_gpu_says_so_and_what_to_do(no_gpu):
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=r"no CUDA device is visible.*--device cpu"):
            select_device(name)
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        select_device("gpu")


def test_gpus_by_index_and_by_torchrun_rank(two_gpus, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_rank() is None
    assert select_device() == select_device("cuda") == torch.device("cuda", 0)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"no CUDA device 2; 2 visible \(cuda:0 ... cuda:1\)"):
        select_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process on this machine
    assert local_rank() == 1
    assert select_device() == select_device("cuda") == torch.device("cuda", 1)
    assert select_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(DeviceError, match=r"LOCAL_RANK=3"):
        select_device()


def test_the_cli_refuses_a_missing_gpu_before_any_work(no_gpu, tmp_path, cache, capsys):
    assert main(["extract", "-e", "random:text", "-d", f"table:{tmp_path / 'none.csv'}", "--device", "cuda", "-q"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
    assert not cache.exists()
