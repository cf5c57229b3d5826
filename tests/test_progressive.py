"""Progressive binding (`train --add`): a new modality is trained against the frozen bound space of
an existing model; every part of the source stays byte-identical and its metrics do not move."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from _toy import replicas
from anybind.align import load_recipe
from anybind.align.bound import BoundModel
from anybind.align.data import PairedFeatures
from anybind.align.fit import split_retrieval
from anybind.align.frozen import AddSpec, read_source
from anybind.align.trainer import train
from anybind.data import load_dataset
from anybind.errors import AnybindError
from anybind.features import extract

OVERRIDES = ["train.max_steps=30", "train.batch_size=32", "train.val_every=10"]


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def source_run(tmp_path, cache):
    karpathy, *_ = replicas(tmp_path)
    index = load_dataset(f"karpathy:{karpathy}")
    stores = {"image": extract("random:image", index, precision="fp32", progress=False),
              "text": extract("random:text", index, precision="fp32", progress=False)}
    recipe = load_recipe("default", [*OVERRIDES, "correction={name: qb-norm, beta: 20}"])
    result = train(recipe, stores, out=tmp_path / "source", progress=False)
    # the "new modality": captions through another encoder (any encoder, any field works alike)
    stores["speech"] = extract("random:text@7", index, precision="fp32", progress=False)
    return result, stores, tmp_path


def test_adding_a_modality_changes_nothing_already_bound(source_run):
    result, stores, tmp_path = source_run
    source_dir = result.out / "model"
    before = _hashes(source_dir)
    spec = AddSpec.from_source(result.out, "speech", to="text")
    added = train(load_recipe("default", OVERRIDES), {"speech": stores["speech"], "text": stores["text"]},
                  out=tmp_path / "added", add=spec, progress=False)

    assert _hashes(source_dir) == before  # the source is never written
    new_dir = added.out / "model"
    after = _hashes(new_dir)
    assert {k: v for k, v in after.items() if not k.startswith("added/") and k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}  # every existing part bit-identical
    new = BoundModel.load(new_dir)
    assert new.modalities == ["image", "text", "speech"] and new.bound_to("speech") == "text"
    assert new.dim == result.model.dim and new.correction is not None

    # the image-text metrics, to the last digit
    paired = PairedFeatures({"image": stores["image"], "text": stores["text"]})
    assert split_retrieval(new, paired, paired.pairs("val")) == result.val

    # the new modality lands in the space: speech -> text retrieval is far above chance on val
    data = PairedFeatures({"text": stores["text"], "speech": stores["speech"]}, anchor="text")
    val = split_retrieval(new, data, data.pairs("val"))
    assert added.val == val and val["mean_R@10"] > 0.5
    assert read_source(added.out)["fingerprint"] == spec.fingerprint
    z = new.encode("speech", data.side("speech").rows(np.arange(3)))
    assert z.shape == (3, new.dim) and torch.allclose(z.norm(dim=1), torch.ones(3))


def test_an_added_run_resumes_and_refuses_another_source(source_run):
    result, stores, tmp_path = source_run
    spec = AddSpec.from_source(result.out / "model", "speech")
    pair = {"speech": stores["speech"], "text": stores["text"]}
    first = train(load_recipe("default", OVERRIDES), pair, out=tmp_path / "a", add=spec, progress=False)
    again = train(load_recipe("default", OVERRIDES), pair, out=tmp_path / "a", add=spec, progress=False)
    assert again.val == first.val
    assert (tmp_path / "a" / "model" / "added" / "speech" / "speech" / "weights.safetensors").read_bytes() == \
        (first.out / "model" / "added" / "speech" / "speech" / "weights.safetensors").read_bytes()

    other = train(load_recipe("default", [*OVERRIDES, "train.seed=3"]),
                  {"image": stores["image"], "text": stores["text"]}, out=tmp_path / "other", progress=False)
    with pytest.raises(AnybindError, match="another recipe, other stores or another split"):
        train(load_recipe("default", OVERRIDES), pair, out=tmp_path / "a",
              add=AddSpec.from_source(other.out, "speech"), progress=False)


def test_add_refuses_what_cannot_work(source_run):
    result, stores, tmp_path = source_run
    with pytest.raises(AnybindError, match="already binds 'text'"):
        AddSpec.from_source(result.out, "text")
    with pytest.raises(AnybindError, match="--to sound"):
        AddSpec.from_source(result.out, "speech", to="sound")
    with pytest.raises(AnybindError, match="neither a training run"):
        AddSpec.from_source(tmp_path, "speech")
    spec = AddSpec.from_source(result.out, "speech")
    with pytest.raises(AnybindError, match="two stores, speech=... and text=..."):
        train(load_recipe("default", OVERRIDES), {"speech": stores["speech"], "image": stores["image"]},
              out=tmp_path / "x", add=spec, progress=False)
    with pytest.raises(AnybindError, match="not extracted as the source model's text side"):
        train(load_recipe("default", OVERRIDES), {"speech": stores["speech"], "text": stores["speech"]},
              out=tmp_path / "x", add=spec, progress=False)
    with pytest.raises(AnybindError, match="the text side reads"):
        train(load_recipe("default", OVERRIDES), {"speech": stores["speech"], "text": stores["text"]},
              out=tmp_path / "x", add=spec, layers={"text": ["layer.1"]}, progress=False)
    saved = json.loads((result.out / "model" / "config.json").read_text())
    assert "added" not in saved["options"] if "options" in saved else "added" not in saved


def test_emergent_scores_agree_with_training_and_resume(source_run):
    """score_pairs on the jointly trained pair equals split_retrieval on the same split; the
    protocol scores the added modality against images it never met, and reuses its log."""
    from anybind.evaluate.emergent import (
        Addition,
        EmergentSetup,
        emergent_protocol,
        score_pairs,
        split_items,
        summarise,
    )

    result, stores, tmp_path = source_run
    paired = PairedFeatures({"image": stores["image"], "text": stores["text"]})
    items = split_items(stores["image"], "val", None)
    scores = score_pairs(result.model, ("image", stores["image"]), {"text": ("text", stores["text"], None)}, items)
    reference = split_retrieval(result.model, paired, paired.pairs("val"))
    assert scores["text"]["text_to_image_R@5"] == reference["text_to_image_R@5"]
    assert scores["text"]["image_to_text_R@1"] == reference["image_to_text_R@1"]

    setup = EmergentSetup(
        recipe=load_recipe("default", [*OVERRIDES, "correction={name: qb-norm, beta: 20}"]),
        base={"image": stores["image"], "text": stores["text"]}, add_recipe=load_recipe("default", OVERRIDES),
        additions={"speech": Addition("speech", {"speech": stores["speech"], "text": stores["text"]})},
        queries={"audio": ("speech", stores["speech"], 0), "spoken": ("text", stores["text"], 0)},
        emergent="audio")
    records = emergent_protocol(setup, folds=[None], seeds=[0], out=tmp_path / "emergent", progress=False)
    (rec,) = records
    # the fixed split's test items are neither train nor val of the addition: all are scored
    assert rec["scores"]["audio"]["gallery"] == len(split_items(stores["image"], "test", None))
    assert rec["scores"]["audio"]["chance"]["audio_to_image_R@1"] == pytest.approx(1 / rec["scores"]["audio"]["gallery"])
    ratio = rec["ratios"]["audio"]["audio_to_image_R@10"]
    spoken = rec["scores"]["spoken"]["spoken_to_image_R@10"]
    assert ratio == pytest.approx(rec["scores"]["audio"]["audio_to_image_R@10"] / spoken) if spoken else math.isnan(ratio)
    again = emergent_protocol(setup, folds=[None], seeds=[0], out=tmp_path / "emergent", progress=False)
    assert again == records and len((tmp_path / "emergent" / "results.jsonl").read_text().splitlines()) == 1
    assert set(rec["baselines"]) == {"ridge", "nn-transfer"}
    assert rec["baselines"]["ridge"]["gallery"] == rec["scores"]["audio"]["gallery"]
    rows = summarise(records)
    assert {r["query"] for r in rows} == {"audio", "spoken", "map: ridge", "map: nn-transfer"} and rows[0]["n"] == 1


def test_training_free_maps_bind_a_modality_without_touching_the_source(source_run):
    from anybind.align.fit import INTO_MAP_BASELINES, added_map_model

    result, stores, tmp_path = source_run
    spec = AddSpec.from_source(result.out, "speech")
    added = train(load_recipe("default", OVERRIDES), {"speech": stores["speech"], "text": stores["text"]},
                  out=tmp_path / "added", add=spec, progress=False)
    assert set(added.baselines) == {f"map: {n}" for n in INTO_MAP_BASELINES}
    data = PairedFeatures({"text": stores["text"], "speech": stores["speech"]}, anchor="text")
    model = added_map_model("ridge", {"alpha": 1e-3}, spec.source, "speech", data, data.pairs("train"))
    folder = model.save(tmp_path / "ridge-model")
    loaded = BoundModel.load(folder)
    assert loaded.added["speech"].kind == "map:ridge"
    assert split_retrieval(loaded, data, data.pairs("val")) == split_retrieval(model, data, data.pairs("val"))
    assert split_retrieval(loaded, data, data.pairs("val"))["mean_R@10"] > 0.5  # a random linear map is learnable
