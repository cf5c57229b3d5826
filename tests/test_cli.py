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


def test_per_modality_layers_parse_in_one_place():
    import pytest

    from anybind.cli import per_modality
    from anybind.errors import AnybindError

    assert per_modality(["image=8,final"]) == {"image": "8,final"}
    assert per_modality("image=8,final,text=3") == {"image": "8,final", "text": "3"}
    assert per_modality(["image=last", "text=auto"]) == {"image": "last", "text": "auto"}
    assert per_modality(None) == {}
    for bad, match in (("8,final", "MODALITY=LAYERS"), ("image=", "no layers for image"),
                       (["image=1", "image=2"], "named twice"), ("=3", "no modality")):
        with pytest.raises(AnybindError, match=match):
            per_modality(bad)


def test_help_reads_the_registries(capsys):
    """A baseline registered by a user shows in `anybind eval --help` with no change to the CLI."""
    import pytest

    from anybind.align.baselines import BASELINES

    BASELINES.register("my-test-baseline", "nowhere:Nothing", help="a user's baseline")
    try:
        with pytest.raises(SystemExit):
            main(["eval", "--help"])
    finally:
        BASELINES.unregister("my-test-baseline")
    out = capsys.readouterr().out
    assert "my-test-baseline" in out and "nn-transfer" in out and "structure" in out
    with pytest.raises(SystemExit):
        main(["assess", "--help"])
    assert "mutual_knn" in capsys.readouterr().out


def test_assess_metric_typo_is_refused_before_any_work(tmp_path, cache, capsys):
    assert main(["assess", "--store", "image=random:image+openclipart", "--store", "text=random:text+openclipart",
                 "--metric", "mutual_nn", "-q"]) == 2
    assert "did you mean 'mutual_knn'" in capsys.readouterr().err
    assert not cache.exists()


def test_train_layers_keywords_resolve_on_the_store(tmp_path, cache):
    """`--layers image=last` names the last block (it once reached the trainer as 'last' and failed)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _toy import replicas
    from anybind.cli import build_parser, train_inputs

    karpathy, *_ = replicas(tmp_path)
    args = build_parser().parse_args(["train", "--store", f"image=random:image+karpathy:{karpathy}",
                                      "--store", f"text=random:text+karpathy:{karpathy}",
                                      "--layers", "image=last", "--layers", "text=2,final", "-q"])
    stores, layers = train_inputs(args)
    assert layers == {"image": ["layer.3"], "text": ["layer.2", "final"]}
    assert set(stores["image"].layers) >= {"layer.3"}
    args = build_parser().parse_args(["train", "--store", f"image={stores['image'].path}",
                                      "--store", f"text={stores['text'].path}", "--layers", "image=-1,text=final"])
    assert train_inputs(args)[1] == {"image": ["layer.3"], "text": ["final"]}


def test_eval_sweep_writes_the_shared_sweep_document(tmp_path, cache, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _toy import replicas

    karpathy, *_ = replicas(tmp_path)
    out = tmp_path / "eval"
    assert main(["eval", "--data", f"karpathy:{karpathy}", "--image", "random:image", "--text", "random:text",
                 "--models", "linear", "--set", "train.max_steps=6", "--set", "train.val_every=3",
                 "--set", "train.batch_size=32", "--sweep", "n=20,all", "--folds", "0,", "--seeds", "0,",
                 "--tasks", "retrieval", "--metric", "retrieval/mean_R@10", "--out", str(out), "-q"]) == 0
    doc = json.loads((out / "sweep-n.json").read_text())
    assert doc["schema"] == "anybind.sweep/1" and doc["metric"] == "retrieval/mean_R@10"
    assert doc["folds"] == [0] and doc["seeds"] == [0]
    points = doc["series"]["linear"]
    assert [p["value"] for p in points] == [20, "all"]  # as a run file's sweep_n writes it
    assert points[0]["x"] == points[0]["train_items"] == 20
    assert (out / "sweep-n.png").exists() and "plot:" in capsys.readouterr().out
