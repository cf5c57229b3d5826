"""Training-free baselines (anybind.align.baselines) on synthetic data with a planted map."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
import torch

from anybind.align.baselines import (
    BASELINES,
    Baseline,
    PairedArrays,
    baseline_options,
    build_baseline,
    register_baseline,
)
from anybind.errors import AnybindError

NAMES = ["procrustes", "cca", "asif", "nn-transfer"]


def recall_at_k(zi: torch.Tensor, zt: torch.Tensor, t2i: np.ndarray, k: int) -> tuple[float, float]:
    """(image->text, text->image) R@k; a query counts when any positive is in its top k."""
    scores = (zt @ zi.T).numpy()
    top_img = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    t2i_hits = np.mean([t2i[j] in top_img[j] for j in range(len(t2i))])
    top_txt = np.argsort(-scores.T, axis=1, kind="stable")[:, :k]
    i2t_hits = np.mean(
        [np.isin(np.flatnonzero(t2i == i), top_txt[i]).any() for i in range(len(zi))]
    )
    return float(i2t_hits), float(t2i_hits)


@cache
def planted(
    noise: float = 0.5, n_train: int = 400, n_test: int = 300, dim: int = 32, seed: int = 0
):
    """text = image @ Q + noise, Q a random orthogonal map, 2 captions per image, offset mean."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    scale = np.linspace(2.0, 0.5, dim)

    def make(n: int) -> PairedArrays:
        img = rng.normal(size=(n, dim)) * scale + 1.0
        t2i = np.repeat(np.arange(n), 2)
        txt = img[t2i] @ q + noise * rng.normal(size=(2 * n, dim))
        return PairedArrays(img.astype(np.float32), txt.astype(np.float32), t2i)

    return make(n_train), make(n_test), q


# ------------------------------------------------------------------ registry and interface


def test_registry_lists_every_baseline():
    assert sorted(BASELINES) == sorted(NAMES)
    for name in NAMES:
        model = build_baseline(name)
        assert isinstance(model, Baseline) and model.name == name


@pytest.mark.parametrize("name", NAMES)
def test_config_is_json_and_records_the_fit(name):
    train, _, _ = planted()
    model = build_baseline(name)
    before = json.loads(json.dumps(model.config()))
    assert before["name"] == name and "fitted" not in before
    after = json.loads(json.dumps(model.fit(train).config()))
    assert after["fitted"]["n_images"] == 400 and after["fitted"]["n_texts"] == 800
    assert after["fitted"]["out_dim"] == model.out_dim
    assert {k: v for k, v in after.items() if k != "fitted"} == before


# minimum test R@1 (both directions) on the planted data (noise 0.5, 400 train, 300 test
# images; 1/300 is chance). Measured: procrustes, cca 1.00; nn-transfer 0.94-0.99;
# asif 0.80-0.89 over seeds 0-2.
R1_FLOOR = {"procrustes": 0.9, "cca": 0.9, "nn-transfer": 0.85, "asif": 0.7}


@pytest.mark.parametrize("name", NAMES)
def test_retrieves_a_planted_correspondence(name):
    train, test, _ = planted()
    model = build_baseline(name).fit(train)
    zi, zt = model.encode("image", test.image), model.encode("text", test.text)
    i2t1, t2i1 = recall_at_k(zi, zt, test.text_to_image, 1)
    i2t10, t2i10 = recall_at_k(zi, zt, test.text_to_image, 10)
    assert min(i2t1, t2i1) >= R1_FLOOR[name], (i2t1, t2i1)
    assert min(i2t10, t2i10) >= 0.95, (i2t10, t2i10)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_normalisation_and_inputs(name):
    train, test, _ = planted()
    model = build_baseline(name).fit(train)
    zi, zt = model.encode("image", test.image[:7]), model.encode("text", test.text[:5])
    assert zi.dtype == torch.float32 and zt.dtype == torch.float32
    assert zi.shape == (7, model.out_dim) and zt.shape == (5, model.out_dim)
    torch.testing.assert_close(zi.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(zt.norm(dim=1), torch.ones(5))
    # torch input (any float dtype), aliases of the modality names, one row as a 1-D vector
    torch.testing.assert_close(model.encode("first", torch.from_numpy(test.image[:7]).double()), zi)
    torch.testing.assert_close(model.encode(1, test.text[:5]), zt)
    torch.testing.assert_close(model.encode("image", test.image[3]), zi[3:4])


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    train, test, _ = planted()
    a = build_baseline(name).fit(train)
    copy = PairedArrays(train.image.copy(), train.text.copy(), train.text_to_image.copy())
    b = build_baseline(name).fit(copy)
    for side, x in (("image", test.image), ("text", test.text)):
        assert torch.equal(a.encode(side, x), b.encode(side, x))
        assert torch.equal(a.encode(side, x), a.encode(side, x))


@pytest.mark.parametrize("name", NAMES)
def test_read_only_arrays_need_no_copy_warning(name):
    train, test, _ = planted()
    arrays = [a.copy() for a in (train.image, train.text, test.image)]
    for a in arrays:
        a.setflags(write=False)  # like a memory-mapped store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_baseline(name).fit(PairedArrays(arrays[0], arrays[1], train.text_to_image))
        model.encode("image", arrays[2])


# ------------------------------------------------------------------ procrustes


@pytest.mark.parametrize("scaling", ["none", "whiten"])
@pytest.mark.parametrize("normalize_input", [True, False])
def test_procrustes_recovers_a_planted_rotation_exactly(scaling, normalize_input):
    rng = np.random.default_rng(3)
    dim = 12
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    img = (rng.normal(size=(200, dim)) * np.linspace(3, 1, dim) + 0.5).astype(np.float64)
    train = PairedArrays(img.astype(np.float32), (img @ q).astype(np.float32), np.arange(200))
    model = build_baseline(
        "procrustes", dim=dim, scaling=scaling, normalize_input=normalize_input
    ).fit(train)
    rot = model.rotation
    np.testing.assert_allclose(rot @ rot.T, np.eye(dim), atol=1e-10)
    fresh = rng.normal(size=(50, dim)) * 2
    zi = model.encode("image", fresh.astype(np.float32))
    zt = model.encode("text", (fresh @ q).astype(np.float32))
    torch.testing.assert_close(zi, zt, atol=2e-5, rtol=0)


@pytest.mark.parametrize("scaling", ["none", "standardize", "whiten"])
def test_procrustes_in_row_blocks_equals_the_whole_array_fit(scaling):
    # means, covariances and the pairs' cross products accumulate over row blocks (a 10M-row fit
    # held n x d float64 copies): the same moments and maps as the whole-array PCA formulas
    from anybind.align.baselines import _cross_products, _prepare, _row_moments
    from anybind.align.linalg import covariance, eig_desc

    rng = np.random.default_rng(5)
    image = (rng.normal(size=(700, 12)) * np.linspace(3, 1, 12) + 4.0).astype(np.float32)
    t2i = np.r_[np.arange(700), rng.integers(0, 700, 500)]  # several captions for some images
    text = (image[t2i] @ rng.normal(size=(12, 9)) + rng.normal(size=(1200, 9)) + 6.0).astype(np.float32)
    train = PairedArrays(image, text, t2i)
    for normalize in (True, False):
        x, y = _prepare(image, normalize), _prepare(text, normalize)
        xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
        mx, cx = _row_moments(image, normalize, block_bytes=8 * 12 * 256)  # 3 blocks
        np.testing.assert_allclose(mx, x.mean(axis=0), rtol=1e-13)
        np.testing.assert_allclose(cx, covariance(xc), rtol=1e-11, atol=1e-13 * np.abs(cx).max())
        cross = _cross_products(train, mx, y.mean(axis=0), normalize, block_bytes=8 * 12 * 256)
        np.testing.assert_allclose(cross, xc[t2i].T @ yc, rtol=1e-11, atol=1e-12 * np.abs(cross).max())

    def whole_array_projection(x, d):  # the fit as it was, on n x d float64 copies
        xc = x - x.mean(axis=0)
        scale = 1.0 / np.maximum(xc.std(axis=0, ddof=1), 1e-12) if scaling == "standardize" else np.ones(x.shape[1])
        vals, vecs = eig_desc(covariance(xc * scale))
        w = vecs[:, :d] / (np.sqrt(vals[:d]) if scaling == "whiten" else 1.0)
        return scale[:, None] * w, (xc * scale) @ w

    model = build_baseline("procrustes", dim=6, scaling=scaling).fit(train)
    (wx, px), (wy, py) = (whole_array_projection(_prepare(a, True), 6) for a in (image, text))
    u, _, vt = np.linalg.svd(px[t2i].T @ py)
    np.testing.assert_allclose(model.rotation, u @ vt, atol=1e-9)
    queries = rng.normal(size=(5, 12)).astype(np.float32)
    want = (_prepare(queries, True) - _prepare(image, True).mean(axis=0)) @ wx @ (u @ vt)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)  # embeddings are unit rows
    torch.testing.assert_close(model.encode("image", queries), torch.from_numpy(want).float(), atol=1e-5, rtol=1e-5)


def test_procrustes_default_dim_is_capped():
    train = PairedArrays(
        np.random.default_rng(0).normal(size=(30, 40)).astype(np.float32),
        np.random.default_rng(1).normal(size=(30, 50)).astype(np.float32),
        np.arange(30),
    )
    assert build_baseline("procrustes").fit(train).out_dim == 29  # min(Di, Dt, 256, N - 1)


# ------------------------------------------------------------------ cca


def test_cca_perfectly_correlated_1d_signals_have_correlation_one():
    s = np.array([[-2.0], [-1.0], [0.5], [1.0], [3.0]], dtype=np.float32)
    train = PairedArrays.one_to_one(s, 2 * s + 1)
    model = build_baseline("cca", reg=0.0, normalize_input=False).fit(train)
    np.testing.assert_allclose(model.correlations, [1.0], atol=1e-10)
    # the regulariser adds reg * (average eigenvalue) to each variance: rho = 1 / (1 + reg)
    model = build_baseline("cca", reg=1.0, normalize_input=False).fit(train)
    np.testing.assert_allclose(model.correlations, [0.5], atol=1e-10)
    # a value and its image map to the same side of the 1-d shared space
    assert model.encode("image", [[2.0]]).item() == pytest.approx(
        model.encode("text", [[5.0]]).item()
    )


def test_cca_shared_and_private_dimensions():
    # x = [a, b], y = [a, c] with a, b, c zero-mean and mutually orthogonal: rho = (1, 0)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(50, 3))
    basis, _ = np.linalg.qr(m - m.mean(axis=0))  # combinations of zero-mean columns: zero-mean
    a, b, c = basis.T
    x = np.stack([a, b], 1).astype(np.float32)
    y = np.stack([a, c], 1).astype(np.float32)
    model = build_baseline("cca", reg=0.0, normalize_input=False).fit(PairedArrays.one_to_one(x, y))
    np.testing.assert_allclose(model.correlations, [1.0, 0.0], atol=1e-5)


def test_cca_moments_in_row_blocks_equal_the_whole_array_formulas():
    # the covariances accumulate over row blocks (never an n x d float64 copy); several captions per
    # image and a large mean (l2 rows all near one direction): the same as the two-pass formulas
    from anybind.align.baselines import _paired_moments, _prepare
    from anybind.align.linalg import covariance as _covariance

    rng = np.random.default_rng(4)
    image = (rng.normal(size=(700, 12)) + 4.0).astype(np.float32)
    t2i = np.r_[np.arange(700), rng.integers(0, 700, 500)]
    text = (image[t2i] @ rng.normal(size=(12, 9)) + rng.normal(size=(1200, 9)) + 6.0).astype(np.float32)
    train = PairedArrays(image, text, t2i)
    for normalize in (True, False):
        x, y = _prepare(image[t2i], normalize), _prepare(text, normalize)
        xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
        (mx, my), (cxx, cyy, cxy) = _paired_moments(train, normalize, block_bytes=8 * 12 * 256)  # 5 blocks
        np.testing.assert_allclose(mx, x.mean(axis=0), rtol=1e-13)
        np.testing.assert_allclose(my, y.mean(axis=0), rtol=1e-13)
        for got, want in ((cxx, _covariance(xc)), (cyy, _covariance(yc)), (cxy, xc.T @ yc / 1199)):
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13 * np.abs(want).max())
    fitted = build_baseline("cca").fit(train)
    assert 0.5 < fitted.correlations[0] <= 1.0 and fitted.out_dim == 9  # the planted map is found


def test_cca_power_weights_dimensions_by_correlation():
    train, test, _ = planted(noise=1.0)
    flat = build_baseline("cca", power=0.0).fit(train)
    weighted = build_baseline("cca", power=2.0).fit(train)
    np.testing.assert_allclose(flat.correlations, weighted.correlations)
    assert (np.diff(flat.correlations) <= 1e-12).all()  # descending
    assert not torch.allclose(
        flat.encode("image", test.image), weighted.encode("image", test.image)
    )


# ------------------------------------------------------------------ asif


def test_asif_is_sparse_in_the_captioned_anchor_space():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(60, 8)).astype(np.float32)
    t2i = np.array([i for i in range(50) for _ in range(1 + i % 3)])  # images 50..59: no caption
    txt = (img[t2i] + 0.05 * rng.normal(size=(len(t2i), 8))).astype(np.float32)
    model = build_baseline("asif", k=5).fit(PairedArrays(img, txt, t2i))
    assert model.out_dim == 50  # one anchor per captioned image
    zi, zt = model.encode("image", img[:10]), model.encode("text", txt[:10])
    assert ((zi != 0).sum(dim=1) <= 5).all() and ((zt != 0).sum(dim=1) <= 5).all()
    # a training image and a training caption are closest to their own anchor
    assert torch.equal(zi.argmax(dim=1), torch.arange(10))
    assert torch.equal(zt.argmax(dim=1), torch.from_numpy(t2i[:10]))


# ------------------------------------------------------------------ nn-transfer


def test_nn_transfer_with_one_neighbour_returns_the_captions_of_that_image():
    train, _, _ = planted()
    model = build_baseline("nn-transfer", k=1).fit(train)
    zi = model.encode("image", train.image[:5])  # each retrieves itself
    captions = model.encode("text", train.text[:10]).reshape(5, 2, -1).mean(dim=1)
    torch.testing.assert_close(zi, torch.nn.functional.normalize(captions, dim=1))
    assert model.out_dim == train.text.shape[1]  # the shared space is the text space


@pytest.mark.parametrize("name", ["asif", "nn-transfer"])
def test_anchor_baselines_encode_in_bounded_blocks_as_in_one(name, monkeypatch):
    """Similarities are computed a few query rows at a time once batch x bank would pass the bound."""
    import anybind.align.baselines as baselines

    train, test, _ = planted()
    model = build_baseline(name, k=5).fit(train)
    whole = {side: model.encode(side, getattr(test, side)[:50]) for side in ("image", "text")}
    monkeypatch.setattr(baselines, "SIMILARITY_BLOCK", 3 * len(train.text))  # 3 rows a block (ASIF's text: 3)
    for side, want in whole.items():  # a matrix product's rounding depends on its shape: close, not equal
        got = model.encode(side, getattr(test, side)[:50])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert torch.equal(got != 0, want != 0)  # the same neighbours kept


# ------------------------------------------------------------------ errors


def test_unknown_baseline_lists_the_registered_ones():
    with pytest.raises(AnybindError, match="procrustes") as err:
        build_baseline("pca-magic")
    assert "nn-transfer" in str(err.value)


def test_unknown_option_lists_the_options():
    with pytest.raises(AnybindError, match="temperature") as err:
        build_baseline("nn-transfer", kk=3)
    assert "kk" in str(err.value)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("asif", {"k": 0}),
        ("asif", {"power": -1}),
        ("asif", {"caption_aggregate": "median"}),
        ("cca", {"reg": -0.1}),
        ("cca", {"dim": 0}),
        ("procrustes", {"scaling": "zca"}),
        ("procrustes", {"normalize_input": "yes"}),
        ("nn-transfer", {"weighting": "vote"}),
        ("nn-transfer", {"temperature": 0}),
    ],
)
def test_bad_option_values(name, options):
    with pytest.raises(AnybindError, match=next(iter(options))):
        build_baseline(name, **options)


def test_mismatched_and_non_finite_training_pairs():
    img = np.ones((4, 3), np.float32)
    txt = np.ones((6, 2), np.float32)
    with pytest.raises(AnybindError, match="one entry per text row"):
        PairedArrays(img, txt, np.arange(4))
    with pytest.raises(AnybindError, match="outside the 4 image rows"):
        PairedArrays(img, txt, np.array([0, 1, 2, 3, 4, 0]))
    with pytest.raises(AnybindError, match="integer"):
        PairedArrays(img, txt, np.zeros(6))
    with pytest.raises(AnybindError, match="as many image rows"):
        PairedArrays.one_to_one(img, txt)
    bad = img.copy()
    bad[2, 1] = np.nan
    with pytest.raises(AnybindError, match="NaN or inf.*row 2"):
        PairedArrays(bad, txt, np.zeros(6, dtype=np.int64))
    bad_txt = txt.copy()
    bad_txt[5, 0] = np.inf
    with pytest.raises(AnybindError, match="text features.*row 5"):
        PairedArrays(img, bad_txt, np.zeros(6, dtype=np.int64))
    with pytest.raises(AnybindError, match="2-D"):
        PairedArrays(img[0], txt, np.zeros(6, dtype=np.int64))


def test_fit_and_encode_errors():
    train, test, _ = planted()
    model = build_baseline("cca")
    with pytest.raises(AnybindError, match="not fitted"):
        model.encode("image", test.image)
    with pytest.raises(AnybindError, match="PairedArrays"):
        model.fit((train.image, train.text))
    with pytest.raises(AnybindError, match="at least 2"):
        model.fit(PairedArrays(train.image, train.text[:1], np.array([0])))
    with pytest.raises(AnybindError, match="exceeds"):
        build_baseline("cca", dim=64).fit(train)
    model.fit(train)
    with pytest.raises(AnybindError, match="dimension 31"):
        model.encode("image", test.image[:, :31])
    bad = test.text[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(AnybindError, match="NaN"):
        model.encode("text", bad)
    with pytest.raises(AnybindError, match="unknown modality"):
        model.encode("audio", test.image)


def test_register_a_custom_baseline():
    @register_baseline("identity-test")
    @dataclass(eq=False)
    class Identity(Baseline):
        scale: float = 1.0

        def _fit(self, train):
            self._fitted_info["out_dim"] = train.image.shape[1]

        def _encode(self, side, x):
            return x * self.scale

    try:
        train, test, _ = planted()
        model = build_baseline("identity-test", scale=2.0).fit(train)
        assert model.encode("image", test.image).shape == (300, model.out_dim)
        with pytest.raises(AnybindError, match="already registered"):
            register_baseline("identity-test")(build_baseline("cca").__class__)
        assert build_baseline("cca").name == "cca"  # a refused registration renames nothing
        assert baseline_options("identity-test") == {"scale": 1.0}
        with pytest.raises(AnybindError, match="dataclass subclasses of Baseline"):
            register_baseline("not-a-dataclass-test")(type("Plain", (Baseline,), {}))
        assert "not-a-dataclass-test" not in BASELINES
    finally:
        BASELINES.unregister("identity-test")


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_a_saved_baseline_loads_to_identical_outputs(name, tmp_path):
    """Bundles carry fitted baselines (a blend): safetensors + JSON, no pickles, bit-identical."""
    from anybind.align.baselines import Baseline

    rng = np.random.default_rng(0)
    pa = PairedArrays(rng.standard_normal((120, 24)).astype(np.float32),
                      rng.standard_normal((240, 16)).astype(np.float32), np.repeat(np.arange(120), 2))
    fitted = (build_baseline(name, dim=8) if name == "procrustes" else build_baseline(name)).fit(pa)
    fitted.save(tmp_path / name)
    assert {p.name for p in (tmp_path / name).iterdir()} == {"config.json", "weights.safetensors"}
    again = Baseline.load(tmp_path / name)
    for side, x in (("image", pa.image[:7]), ("text", pa.text[:7])):
        assert torch.equal(fitted.encode(side, x), again.encode(side, x))
    assert again.config() == fitted.config()


def _fitted(name: str):
    rng = np.random.default_rng(0)
    pa = PairedArrays(rng.standard_normal((60, 12)).astype(np.float32),
                      rng.standard_normal((120, 10)).astype(np.float32), np.repeat(np.arange(60), 2))
    return (build_baseline(name, dim=8) if name == "procrustes" else build_baseline(name)).fit(pa), pa


@pytest.mark.parametrize("name", NAMES)
def test_two_saves_of_the_same_baseline_are_byte_identical(name, tmp_path):
    fitted, _ = _fitted(name)
    fitted.save(tmp_path / "a")
    fitted.save(tmp_path / "b")
    for file in ("config.json", "weights.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_the_saved_config_is_the_saved_part_contract(tmp_path):
    fitted, pa = _fitted("cca")
    fitted.save(tmp_path / "cca")
    config = json.loads((tmp_path / "cca" / "config.json").read_text())
    assert (config["format"], config["kind"], config["name"]) == (2, "baseline", "cca")
    assert config["options"] == baseline_options("cca") == {"reg": 0.3, "dim": None, "power": 1.0,
                                                             "normalize_input": True}
    again = Baseline.load(tmp_path / "cca")
    np.testing.assert_array_equal(again.correlations, fitted.correlations)  # fitted arrays travel too
    # the sides keep their aliases after loading: callers map their own modality names to them
    torch.testing.assert_close(again.encode("second", pa.text[:3]), fitted.encode("text", pa.text[:3]))


def test_load_checks_the_kind_and_refuses_the_old_format(tmp_path):
    fitted, _ = _fitted("asif")
    fitted.save(tmp_path / "asif")
    assert isinstance(type(fitted).load(tmp_path / "asif"), type(fitted))
    with pytest.raises(AnybindError, match="holds a 'asif' baseline, not a CCA"):
        type(build_baseline("cca")).load(tmp_path / "asif")
    old = tmp_path / "old"
    old.mkdir()  # format 1: baseline.json + state.safetensors
    (old / "baseline.json").write_text(json.dumps({"name": "asif", "options": {}, "state": {}}))
    (old / "state.safetensors").write_bytes(b"")
    with pytest.raises(AnybindError, match=r"format 1 \(baseline.json\); this anybind reads format 2: fit"):
        Baseline.load(old)
    with pytest.raises(AnybindError, match="not a saved anybind baseline"):
        Baseline.load(tmp_path / "nothing")
    with pytest.raises(AnybindError, match="not fitted: nothing to save"):
        build_baseline("cca").save(tmp_path / "unfitted")
