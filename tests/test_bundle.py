"""Bundles: export a trained run, load it in one line, and get exactly the evaluated embeddings."""

import json

import numpy as np
import pytest
import torch

import anybind
from _toy import replicas
from anybind.bundle import BundleError, export_bundle
from anybind.cli import main
from anybind.features import FeatureStore


@pytest.fixture()
def trained_run(tmp_path, cache):
    karpathy, *_ = replicas(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--recipe", "default", "--store", f"image=random:image+karpathy:{karpathy}",
                 "--store", f"text=random:text+karpathy:{karpathy}", "--set", "train.max_steps=20",
                 "--set", "train.batch_size=32", "--set", "train.val_every=10", "--out", str(run), "-q"]) == 0
    return run, karpathy


def test_export_load_and_encode_reproduce_the_evaluated_space(trained_run, tmp_path):
    trained_run, karpathy = trained_run
    out = tmp_path / "bundle"
    assert main(["export", "--run", str(trained_run), "--out", str(out)]) == 0
    info = json.loads((out / "bundle.json").read_text())
    assert {p.name for p in out.iterdir()} == {"bundle.json", "model", "card.json", "card.md", "recipe.yaml"}
    assert info["anchor"] == "image" and info["modalities"]["text"]["dtype"] == "float16"
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))  # no pickles
    model = anybind.load(out)
    assert model.modalities == ["image", "text"]
    assert model.bound.blended and model.bound.baseline.name == "nn-transfer"  # the default recipe blends
    # raw captions through the bundle == the stored caption features through the evaluated space
    stores = {k: FeatureStore.open(v) for k, v in json.loads((trained_run / "stores.json").read_text()).items()}
    txt = stores["text"]
    rows = np.arange(5)
    captions = _captions(txt, rows, karpathy)
    z = model.encode_text(captions)
    want = model.bound.encode("text", [torch.from_numpy(txt["final"].read(rows)).float()])
    torch.testing.assert_close(z, torch.nn.functional.normalize(want, dim=1), atol=2e-3, rtol=0)
    assert z.shape == (5, model.dim) and torch.allclose(z.norm(dim=1), torch.ones(5))
    probs = model.classify([np.full((8, 8, 3), 200, np.uint8)], ["red", "green", "blue"])
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(1), torch.ones(1))
    with pytest.raises(BundleError, match="binds image, text"):
        model.encode("audio", ["x"])
    with pytest.raises(BundleError, match="no text items"):
        model.encode_text([])


def test_export_refuses_to_overwrite_and_load_refuses_a_non_bundle(trained_run, tmp_path):
    trained_run, _ = trained_run
    out = tmp_path / "bundle"
    export_bundle(trained_run, out)
    with pytest.raises(anybind.AnybindError, match="--overwrite"):
        export_bundle(trained_run, out)
    export_bundle(trained_run, out, overwrite=True)
    with pytest.raises(BundleError, match="not an anybind bundle"):
        anybind.load(tmp_path)
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "b2")]) == 2


def _captions(store, rows, karpathy):
    """The caption text of store rows, from the dataset listing, through the item ids."""
    from anybind.data import load_dataset

    ids = [store.item_ids[r] for r in rows]
    caps = dict(zip(*[load_dataset(f"karpathy:{karpathy}").column(c) for c in ("item_id", "caption")], strict=True))
    return [caps[i][j] for i, j in zip(ids, store.caption_index[rows], strict=True)]


def test_overwrite_builds_first_and_never_deletes_what_is_not_a_bundle(trained_run, tmp_path):
    import shutil

    trained_run, _ = trained_run
    out = tmp_path / "bundle"
    export_bundle(trained_run, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a re-export that fails (its store was removed) leaves the old bundle exactly as it was
    stores = json.loads((trained_run / "stores.json").read_text())
    shutil.rmtree(stores["text"])
    with pytest.raises(anybind.AnybindError):
        export_bundle(trained_run, out, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no staging left behind
    # --overwrite onto a folder of the user's is refused, and their file stays
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(anybind.AnybindError, match="not a folder anybind wrote"):
        export_bundle(trained_run, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
