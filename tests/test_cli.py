"""Every CLI verb, called with an argument list exactly as a shell would."""

import json

from anybind.cli import main


def _pairs(tmp_path, n=12):
    from PIL import Image

    rows = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (40 + i, 30), (20 * i % 255, 100, 200)).save(p)
        rows.append({"image": p.name, "caption": f"a blue picture number {i}"})
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows.append({"image": "broken.png", "caption": "a broken file"})
    table = tmp_path / "pairs.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows))
    return table


def test_help_teaches(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "extract" in out and "examples:" in out


def test_encoders_verb(capsys):
    assert main(["encoders"]) == 0
    assert "efficientnet-lite0" in capsys.readouterr().out
    assert main(["encoders", "random:text", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"]["final"] == 32


def test_bad_spec_is_exit_2_with_message(capsys):
    assert main(["encoders", "/some/path"]) == 2
    assert "backend prefix" in capsys.readouterr().err


def test_extract_hit_ls_rm(tmp_path, cache, capsys):
    table = _pairs(tmp_path)
    args = ["extract", "-e", "random:image", "-d", f"table:{table}", "--layers", "all", "-q", "--workers", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "extracted" in out and "1 skipped" in out
    assert main(args) == 0
    assert "cache hit" in capsys.readouterr().out
    assert main(["extract", "-e", "random:text", "-d", f"table:{table}", "-q"]) == 0
    capsys.readouterr()
    assert main(["cache", "ls", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["field"] for r in rows} == {"image", "caption"} and all(r["status"] == "done" for r in rows)
    assert main(["cache", "rm", "--encoder", "random:image"]) == 0
    assert main(["cache", "ls", "--json"]) == 0
    assert [r["encoder"] for r in json.loads(capsys.readouterr().out.split("removed", 1)[-1].split("\n", 1)[1])] == ["random:text"]
    assert main(["cache", "rm"]) == 2


def test_extract_wrong_field_is_clear(tmp_path, cache, capsys):
    table = _pairs(tmp_path)
    assert main(["extract", "-e", "random:text", "-d", f"table:{table}", "--field", "image", "-q"]) == 2
    assert "encodes text" in capsys.readouterr().err


def test_torchrun_two_processes_write_one_store(tmp_path, cache):
    """`torchrun --nproc_per_node=2 anybind extract ...`: each rank extracts its shards, rank 0 merges."""
    import os
    import subprocess
    import sys

    from anybind.features import FeatureStore

    table = _pairs(tmp_path, n=30)
    out = tmp_path / "dist-store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "anybind.cli", "extract", "-e", "random:image", "-d", f"table:{table}", "--shard-size", "4",
           "--batch-size", "3", "--workers", "0", "--precision", "fp32", "-o", str(out), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    dist = FeatureStore.open(out)
    assert main(["extract", "-e", "random:image", "-d", f"table:{table}", "--shard-size", "4", "--batch-size", "3",
                 "--workers", "0", "--precision", "fp32", "-o", str(tmp_path / "single"), "-q"]) == 0
    single = FeatureStore.open(tmp_path / "single")
    assert len(dist) == len(single) == 30 and dist.manifest["skipped"] == 1
    assert dist.item_ids == single.item_ids
    import numpy as np

    np.testing.assert_array_equal(dist["final"].read(), single["final"].read())
