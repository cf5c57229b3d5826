"""The modality gap (Liang et al. 2022), the own-modality share of a mixed index, and centring per
modality as an option of the bound model: the metrics on cases worked by hand, then centring on a
real (tiny) progressively bound run, through save/load, the bundle, the index and the numpy runtime."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anybind
from _toy import replicas
from anybind.align import load_recipe
from anybind.align.bound import BoundModel, centre_run, run_training_features
from anybind.align.frozen import AddSpec
from anybind.align.trainer import train
from anybind.bundle import export_bundle
from anybind.data import load_dataset
from anybind.errors import AnybindError
from anybind.features import extract
from anybind.metrics.gap import (
    GapError,
    expected_own_share,
    gap_vector,
    modality_gap,
    null_gap,
    own_modality_share,
    pairwise_gaps,
)

OVERRIDES = ["train.max_steps=10", "train.batch_size=32", "train.val_every=5"]


# ---- the metrics, worked by hand --------------------------------------------------------------------
def test_the_gap_is_the_distance_between_centroids_of_normalised_rows():
    a = [[2.0, 0.0], [0.0, 3.0]]  # normalised: (1, 0), (0, 1) -> centroid (0.5, 0.5)
    b = [[-1.0, 0.0], [-5.0, 0.0]]  # centroid (-1, 0)
    np.testing.assert_allclose(gap_vector(a, b), [1.5, 0.5])
    assert modality_gap(a, b) == pytest.approx(math.sqrt(2.5))
    assert modality_gap(a, a) == 0.0
    assert modality_gap([[1.0, 0.0]], [[-1.0, 0.0]]) == pytest.approx(2.0)  # the largest it can be
    gaps = pairwise_gaps({"x": np.array(a), "y": np.array(b), "z": np.array([[0.0, 1.0]])})
    assert list(gaps) == ["x-y", "x-z", "y-z"]
    assert gaps["x-z"] == pytest.approx(math.sqrt(0.5)) and gaps["y-z"] == pytest.approx(math.sqrt(2.0))


def test_the_null_gap_of_paired_rows_worked_by_hand():
    a, b = [[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]
    # swap neither or both: gap sqrt(2); swap one: both centroids (0.5, 0.5), gap 0 -> mean sqrt(2) / 2
    assert null_gap(a, b, permutations=4000) == pytest.approx(math.sqrt(2) / 2, abs=0.03)
    assert null_gap(a, a) == 0.0 and null_gap(a, b, seed=3) == null_gap(a, b, seed=3)
    with pytest.raises(GapError, match="equal shapes"):
        null_gap(a, b[:1])


def test_the_gap_refuses_what_has_no_centroid():
    with pytest.raises(GapError, match="dims 2 and 3"):
        modality_gap([[1.0, 0.0]], [[1.0, 0.0, 0.0]])
    with pytest.raises(GapError, match="all-zero row"):
        modality_gap([[0.0, 0.0]], [[1.0, 0.0]])
    with pytest.raises(GapError, match="non-finite"):
        modality_gap([[np.nan, 1.0]], [[1.0, 0.0]])
    with pytest.raises(GapError, match="non-empty"):
        modality_gap(np.zeros((0, 2)), [[1.0, 0.0]])


def _unit(degrees):
    return np.array([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_own_modality_share_worked_by_hand():
    # A at 0 and 15 degrees, B at 25 and 90; each row's neighbours by angle, itself left out
    z, labels = _unit([0, 15, 25, 90]), ["A", "A", "B", "B"]
    # k=1: A0 -> A15 (own); A15 -> B25 (10 < 15); B25 -> A15; B90 -> B25 (65 < 75)
    assert own_modality_share(z, labels, k=1) == {"A": 0.5, "B": 0.5, "all": 0.5}
    # k=2: A0 {A15, B25} 1/2; A15 {B25, A0} 1/2; B25 {A15, A0} 0; B90 {B25, A15} 1/2
    assert own_modality_share(z, labels, k=2) == {"A": 0.5, "B": 0.25, "all": 0.375}
    # one chunk or many: the same
    assert own_modality_share(z, labels, k=2, chunk=1) == own_modality_share(z, labels, k=2)
    # ties go to the earlier row: three equal rows, k=1 -> row 0 (B) picks row 1 (A), rows 1 and 2 pick row 0 (B)
    assert own_modality_share(np.ones((3, 2)), ["B", "A", "B"], k=1) == {"B": 0.5, "A": 0.0, "all": 1 / 3}


def test_expected_share_is_each_modality_share_of_the_other_rows():
    assert expected_own_share(["A", "A", "A", "B"]) == {"A": pytest.approx(2 / 3), "B": 0.0, "all": pytest.approx(0.5)}
    balanced = expected_own_share(["i", "t", "a"] * 100)
    assert balanced["i"] == pytest.approx(99 / 299) and balanced["all"] == pytest.approx(99 / 299)
    with pytest.raises(GapError, match="one label per row"):
        own_modality_share(np.eye(3), ["A", "B"], k=1)
    with pytest.raises(GapError, match="k must be between 1 and 2"):
        own_modality_share(np.eye(3), ["A", "B", "B"], k=3)


# ---- centring a real bound model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def added_run(tmp_path_factory):
    """A blended image-text model with a qb-norm correction, and 'speech' added onto its text
    (trained once for the module; each test writes only under its own folder)."""
    tmp_path = tmp_path_factory.mktemp("gap")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANYBIND_CACHE", str(tmp_path / "cache"))
        yield _train_added(tmp_path)


def _train_added(tmp_path):
    karpathy, *_ = replicas(tmp_path)
    index = load_dataset(f"karpathy:{karpathy}")
    stores = {"image": extract("random:image", index, precision="fp32", progress=False),
              "text": extract("random:text", index, precision="fp32", progress=False),
              "speech": extract("random:text@7", index, precision="fp32", progress=False)}
    recipe = load_recipe("default", [*OVERRIDES, "correction={name: qb-norm, beta: 20}"])
    source = train(recipe, {"image": stores["image"], "text": stores["text"]}, out=tmp_path / "source", progress=False)
    spec = AddSpec.from_source(source.out, "speech", to="text")
    added = train(load_recipe("default", OVERRIDES), {"speech": stores["speech"], "text": stores["text"]},
                  out=tmp_path / "added", add=spec, progress=False)
    return added, karpathy, tmp_path


def _gaps(model, features):
    return pairwise_gaps({m: model.encode(m, f).numpy() for m, f in features.items()})


@pytest.mark.slow  # the module's two training runs
def test_centring_closes_the_gap_and_keeps_the_blend_and_the_correction(added_run):
    added, _, _ = added_run
    plain = BoundModel.load(added.out / "model")
    features = run_training_features(added.out, plain)
    assert set(features) == {"image", "text", "speech"}  # image and text from the source run
    centred = centre_run(added.out)
    assert set(centred.centres) == {"image", "text", "speech"} and not plain.centres
    assert "centring" in repr(centred) and plain.blended and centred.blended

    # the mean over the training rows is what is subtracted
    torch.testing.assert_close(centred.centres["text"], plain.encode("text", features["text"]).mean(0))
    # a blended modality: each space centred and normalised on its own, weighted sqrt(w), sqrt(1-w)
    z_plain, z = plain.encode("text", features["text"]), centred.encode("text", features["text"])
    width, w = centred.segments("text")[0][0], centred.weight
    shifted = z_plain - centred.centres["text"]
    torch.testing.assert_close(z, torch.cat([F.normalize(shifted[:, :width], dim=1) * w**0.5,
                                             F.normalize(shifted[:, width:], dim=1) * (1 - w) ** 0.5], dim=1))
    # an added modality: its own mean, the whole vector normalised (as its part outputs it)
    assert centred.segments("speech") == [(centred.dim, 1.0)]
    s_plain = plain.encode("speech", features["speech"])
    torch.testing.assert_close(centred.encode("speech", features["speech"]),
                               F.normalize(s_plain - s_plain.mean(0), dim=1))

    before, after = _gaps(plain, features), _gaps(centred, features)
    assert all(after[p] < 0.5 * before[p] for p in before), (before, after)
    # the correction is fitted again, on the centred bank; the plain model is untouched
    assert centred.correction is not plain.correction
    assert not torch.equal(centred.correction.bank["text"], plain.correction.bank["text"])
    torch.testing.assert_close(centred.correction.bank["text"], centred.encode("text", features["text"]))
    torch.testing.assert_close(plain.encode("text", features["text"]), z_plain)


@pytest.mark.slow  # the module's two training runs
def test_centring_refuses_what_it_cannot_fit(added_run, tmp_path):
    added, _, _ = added_run
    plain = BoundModel.load(added.out / "model")
    features = run_training_features(added.out, plain)
    with pytest.raises(AnybindError, match="at least one modality"):
        plain.centred({})
    with pytest.raises(AnybindError, match="at least 2 training rows"):
        plain.centred({"image": [f[:1] for f in features["image"]], "text": features["text"]})
    with pytest.raises(AnybindError, match="centre both"):  # the correction needs image and text
        plain.centred({"speech": features["speech"]})
    plain.save(tmp_path / "bare" / "model")  # a model folder with no run around it
    with pytest.raises(AnybindError, match="not a training run"):
        centre_run(tmp_path / "bare")
    with pytest.raises(AnybindError, match=r"shape \(3,\)"):
        BoundModel(plain.layers, plain.anchor, space=plain.space, centres={"image": torch.zeros(3)})


@pytest.mark.slow  # the module's two training runs
def test_a_centred_model_saves_exports_and_indexes_as_centred(added_run, tmp_path):
    from anybind.serve.index import VectorIndexError, build_index

    added, karpathy, _ = added_run
    centred = centre_run(added.out)
    loaded = BoundModel.load(centred.save(tmp_path / "centred"))
    assert json.loads((tmp_path / "centred" / "config.json").read_text())["parts"][-1] == "centring"
    x = torch.randn(4, centred.input_dims("text")[0])
    assert torch.equal(loaded.encode("text", x), centred.encode("text", x))
    assert not (added.out / "model" / "centring").exists()  # the run's own model is never written

    plain_bundle = export_bundle(added.out, tmp_path / "bundle")
    index = build_index(plain_bundle, f"karpathy:{karpathy}", tmp_path / "index", progress=False)
    bundle = anybind.load(export_bundle(added.out, tmp_path / "bundle", centre=True, overwrite=True))
    assert json.loads((bundle.path / "bundle.json").read_text())["centred"] == ["image", "text", "speech"]
    assert torch.equal(bundle.bound.encode("text", x), centred.encode("text", x))
    with pytest.raises(VectorIndexError, match="rebuild the index"):  # built on the uncentred bundle
        index.check_bundle(bundle)


@pytest.mark.slow
def test_the_numpy_runtime_centres_as_the_torch_path(added_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from anybind.bundle.onnx_export import export_onnx
    from anybind.runtime import load as load_runtime

    added, karpathy, _ = added_run  # the source run: an added 'speech' modality has no ONNX graph
    bundle = export_bundle(added.out.parent / "source", tmp_path / "bundle", centre=True)
    export_onnx(bundle)
    runtime, torch_path = load_runtime(bundle), anybind.load(bundle)
    assert set(runtime.centres) == {"image", "text"}
    captions = ["a red square", "blue", "a green thing on a table"]
    images = sorted((karpathy.parent).glob("*.jpg"))[:3]
    for got, want in ((runtime.encode_text(captions), torch_path.encode_text(captions)),
                      (runtime.encode_image(images), torch_path.encode_image(images))):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
        width = torch_path.bound.segments("text")[0][0]  # each space's run keeps its share of the norm
        np.testing.assert_allclose(np.linalg.norm(got[:, :width], axis=1) ** 2, torch_path.bound.weight, atol=1e-5)
