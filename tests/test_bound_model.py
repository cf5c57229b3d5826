"""One bound model: what `train` reports, what `eval` scores and what `export` ships agree to the
last digit on the same split, and the model saves and loads as one folder."""

import json

import numpy as np
import pytest
import torch

import anybind
from _toy import replicas
from anybind.align import load_recipe
from anybind.align.bound import BoundModel
from anybind.align.fit import embed_split, split_retrieval
from anybind.align.trainer import train
from anybind.bundle import export_bundle
from anybind.data import load_dataset
from anybind.evaluate.protocol import ModelSpec, run_model
from anybind.evaluate.suite import Suite
from anybind.features import extract
from anybind.metrics import retrieval_metrics
from anybind.saving import SavedPartError

OVERRIDES = ["train.max_steps=30", "train.batch_size=32", "train.val_every=10", "correction={name: qb-norm, beta: 20}"]


@pytest.fixture()
def bound_run(tmp_path, cache):
    karpathy, *_ = replicas(tmp_path)
    index = load_dataset(f"karpathy:{karpathy}")
    stores = {"image": extract("random:image", index, precision="fp32", progress=False),
              "text": extract("random:text", index, precision="fp32", progress=False)}
    recipe = load_recipe("default", OVERRIDES)
    result = train(recipe, stores, out=tmp_path / "run", progress=False)
    return result, stores, index, tmp_path


def test_train_eval_and_export_agree_to_the_last_digit(bound_run):
    result, stores, index, tmp_path = bound_run
    reported = result.val  # what train printed and wrote to summary.json
    assert json.loads((result.out / "summary.json").read_text())["val"] == reported
    assert result.model.blended and result.model.correction is not None

    # evaluation: the protocol retrains the same recipe and seed, and scores the val split
    suite = Suite(stores["image"], stores["text"], name="toy")
    spec = ModelSpec("default", recipe="default", overrides=tuple(OVERRIDES))
    doc = run_model(spec, suite, folds=[None], seeds=[0], out=tmp_path / "eval", split="val",
                    tasks=("retrieval",), progress=False)
    scored = doc["runs"][0]["metrics"]
    for k in (1, 5, 10):
        assert scored[f"retrieval/i2t_R@{k}"] == reported[f"image_to_text_R@{k}"]
        assert scored[f"retrieval/t2i_R@{k}"] == reported[f"text_to_image_R@{k}"]

    # export: raw images and captions through the bundle's encoders rank exactly the same way
    bundle = anybind.load(export_bundle(result.out, tmp_path / "bundle"))
    data = suite.fold_data(None).data
    pairs = data.pairs("val")
    za_store, zp_store, t2i = embed_split(result.model, data, pairs)
    images, captions = _raw_items(index, stores, np.unique(pairs.anchor_rows), pairs.partner_rows)
    za, zp = bundle.encode_image(images), bundle.encode_text(captions)
    torch.testing.assert_close(za, za_store, atol=0, rtol=0)
    torch.testing.assert_close(zp, zp_store, atol=0, rtol=0)
    shipped = retrieval_metrics(**bundle.bound.ranking_inputs(za, zp), text_to_image=t2i, ks=(1, 5, 10))
    assert {k: shipped[k] for k in reported} == reported


def test_a_bound_model_saves_and_loads_as_one_folder(bound_run, tmp_path):
    result, stores, _, _ = bound_run
    folder = result.model.save(tmp_path / "again")
    loaded = BoundModel.load(folder)
    assert repr(loaded) == repr(result.model) and loaded.dim == result.model.dim
    data = result.model  # the same model, loaded: the same val retrieval
    from anybind.align.data import PairedFeatures

    paired = PairedFeatures(stores)
    assert split_retrieval(loaded, paired, paired.pairs("val")) == result.val
    assert (folder / "projectors" / "image" / "weights.safetensors").read_bytes() == \
        (result.out / "model" / "projectors" / "image" / "weights.safetensors").read_bytes()
    assert data.anchor == "image" and loaded.side("text") == "text"
    with pytest.raises(SavedPartError, match="not a saved anybind bound-model"):
        BoundModel.load(tmp_path)


def _raw_items(index, stores, anchor_rows, partner_rows):
    """Image paths of anchor rows and caption texts of partner rows, from the dataset listing."""
    images = dict(zip(index.item_ids, index.column("image"), strict=True))
    captions = dict(zip(index.item_ids, index.column("caption"), strict=True))
    img, txt = stores["image"], stores["text"]
    paths = [index.resolve(images[img.item_ids[r]]) for r in anchor_rows]
    texts = [captions[txt.item_ids[r]][j] for r, j in zip(partner_rows, txt.caption_index[partner_rows], strict=True)]
    return paths, texts


def test_the_anchor_is_the_one_named_or_refused(bound_run):
    from anybind.align.data import PairedFeatures, PairingError

    _, stores, _, _ = bound_run
    assert PairedFeatures(stores).anchor_name == "image" == PairedFeatures(stores, anchor="image").anchor_name
    with pytest.raises(PairingError, match="anchor 'text' has several rows per item"):
        PairedFeatures(stores, anchor="text")
    with pytest.raises(PairingError, match="not one of the stores"):
        PairedFeatures(stores, anchor="audio")
