"""The CLI refuses what cannot work with exit code 2 and one message, before any work is done:
a GPU that is not there, a zero batch size, a non-finite learning rate."""

import json

import pytest
import torch
from PIL import Image

from anybind.cli import main


@pytest.fixture()
def table(tmp_path):
    """A small real paired table (4 PNGs with captions)."""
    rows = []
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 100, 200)).save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": f"a blue picture number {i}"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _nothing_written(cache, *folders) -> bool:
    return not (cache / "stores").exists() and not any(f.exists() for f in folders)


def _refused(capsys, *words) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: "), err
    assert all(w in err for w in words), err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here")
def test_device_cuda_without_a_gpu_is_refused_by_every_verb_that_takes_it(tmp_path, table, cache, capsys):
    data = f"table:{table}"
    assert main(["extract", "-e", "random:image", "-d", data, "--device", "cuda", "-q"]) == 2
    _refused(capsys, "--device cuda", "no CUDA device", "--device cpu")
    run = tmp_path / "run"
    assert main(["train", "--store", f"image=random:image+{data}", "--store", f"text=random:text+{data}",
                 "--out", str(run), "--device", "cuda:1", "-q"]) == 2
    _refused(capsys, "--device cuda:1", "--device cpu")
    index = tmp_path / "index"
    assert main(["index", "--bundle", str(tmp_path / "bundle"), "--data", data, "--out", str(index),
                 "--device", "cuda", "-q"]) == 2
    _refused(capsys, "--device cpu")
    assert _nothing_written(cache, run, index)  # refused before any extraction, training or index


@pytest.mark.parametrize("argv", [
    ["extract", "-e", "random:image", "--batch-size", "0"],
    ["extract", "-e", "random:image", "-b", "-5"],
    ["extract", "-e", "random:image", "--shard-size", "0"],
    ["index", "--bundle", "b", "--out", "o", "--batch-size", "0"],
])
def test_a_zero_or_negative_batch_size_is_refused_at_the_cli(table, cache, capsys, argv):
    with pytest.raises(SystemExit) as info:
        main([*argv, "-d", f"table:{table}", "-q"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least 1" in err and "Traceback" not in err
    assert _nothing_written(cache)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_train_with_a_non_finite_learning_rate_exits_2_before_any_work(tmp_path, table, cache, capsys, value):
    run = tmp_path / "run"
    data = f"table:{table}"
    assert main(["train", "--store", f"image=random:image+{data}", "--store", f"text=random:text+{data}",
                 "--set", f"optimizer.lr={value}", "--out", str(run), "-q"]) == 2
    _refused(capsys, "optimizer.lr", "finite")
    assert _nothing_written(cache, run)  # no store extracted, no run folder
    assert not (cache / "datasets").exists()  # the table was not even listed


def test_eval_refuses_a_mistyped_task_before_any_work(tmp_path, table, cache, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--image", "random:image", "--text", "random:text", "--data", f"table:{table}",
                 "--models", "nn-transfer", "--tasks", "retreival", "--out", str(out), "-q"]) == 2
    _refused(capsys, "--tasks", "did you mean 'retrieval'")
    assert _nothing_written(cache, out)
