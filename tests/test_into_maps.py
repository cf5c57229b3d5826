"""Training-free maps into a fixed space (anybind.align.into): small cases worked out by hand,
saving, refusals, and a realistic retrieval check."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
import torch

from anybind.align.into import (
    INTO_MAPS,
    IntoMap,
    IntoMapError,
    NNTransferInto,
    RidgeInto,
    _ridge_weights,
    build_into_map,
    into_map_options,
    register_into_map,
)
from anybind.errors import AnybindError

NAMES = ["asif", "nn-transfer", "procrustes", "ridge"]


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def orthonormal_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """[rows, cols] with orthonormal rows (rows <= cols)."""
    q, _ = np.linalg.qr(rng.normal(size=(cols, rows)))
    return q.T


@cache
def realistic(n_items: int = 400, n_test: int = 200, dx: int = 48, dy: int = 24, seed: int = 0):
    """Features x of two noisy 'recordings' per item; targets y = normalise(tanh(z A)) + noise."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dx, dy)) * 2 / np.sqrt(dx)
    scale = np.linspace(2.0, 0.3, dx)  # a decaying spectrum, like real features

    def make(n: int, per: int):
        z = rng.normal(size=(n, dx)) * scale
        y = unit(np.tanh(z @ a)) + 0.5 * rng.normal(size=(n, dy)) / np.sqrt(dy)
        item = np.repeat(np.arange(n), per)
        x = z[item] + rng.normal(size=(n * per, dx)) + 1.0
        return x.astype(np.float32), y[item].astype(np.float32), item

    return make(n_items, 2), make(n_test, 1)


# ------------------------------------------------------------------ registry and interface


def test_registry_lists_every_map():
    assert sorted(INTO_MAPS) == NAMES
    for name in NAMES:
        model = build_into_map(name)
        assert isinstance(model, IntoMap) and model.name == name
    assert into_map_options("nn-transfer")["k"] == 10
    assert into_map_options("asif")["k"] == 64 and into_map_options("asif")["p"] == 8.0


@pytest.mark.parametrize("name", NAMES)
def test_shapes_normalisation_inputs_and_determinism(name):
    (x, y, item), (xt, _, _) = realistic()
    model = build_into_map(name).fit(x, y, item)
    z = model.encode("audio", torch.from_numpy(xt[:7]))
    assert z.dtype == torch.float32 and z.shape == (7, 24) and model.out_dim == 24
    torch.testing.assert_close(z.norm(dim=1), torch.ones(7))
    # a list of layers (the last is used), numpy, float64, one row as a 1-D vector, no rows
    assert torch.equal(model.encode("x", [torch.zeros(7, 3), torch.from_numpy(xt[:7])]), z)
    assert torch.equal(model.encode("x", xt[:7]), z)
    torch.testing.assert_close(model.encode("x", xt[:7].astype(np.float64)), z)
    torch.testing.assert_close(model.encode("x", xt[3]), z[3:4])  # one row: another BLAS path
    assert model.encode("x", xt[:0]).shape == (0, 24)
    # same request, same result; chunking does not change it
    again = build_into_map(name).fit(x.copy(), y.copy(), item.copy())
    assert torch.equal(again.encode("x", xt[:7]), z)
    small = build_into_map(name, batch_size=2).fit(x, y, item)
    torch.testing.assert_close(small.encode("x", xt[:7]), z, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ ridge


def test_ridge_recovers_an_exact_affine_map():
    rng = np.random.default_rng(1)
    y = unit(rng.normal(size=(60, 6)))
    b = rng.normal(size=(6, 10))
    x = y @ b + 3.0  # exactly affine in y, so y is exactly affine in x
    for alpha in (0.0, 1e-10):
        model = build_into_map("ridge", alpha=alpha).fit(x, y)
        np.testing.assert_allclose(model.encode("x", x).numpy(), y, atol=1e-5)
    # underdetermined (n < dx): the dual solve, and the min-norm least squares at alpha 0
    x_wide = y[:8] @ rng.normal(size=(6, 30)) - 1.0
    for alpha in (0.0, 1e-10):
        model = build_into_map("ridge", alpha=alpha).fit(x_wide, y[:8])
        np.testing.assert_allclose(model.encode("x", x_wide).numpy(), y[:8], atol=1e-4)


def test_ridge_primal_and_dual_agree():
    rng = np.random.default_rng(2)
    xc = rng.normal(size=(15, 9))
    xc -= xc.mean(axis=0)
    yc = rng.normal(size=(15, 4))
    np.testing.assert_allclose(_ridge_weights(xc, yc, 0.7, dual=False), _ridge_weights(xc, yc, 0.7, dual=True),
                               atol=1e-10)


def test_ridge_shrinks_with_alpha():
    (x, y, item), (xt, _, _) = realistic()
    norms = [build_into_map("ridge", alpha=a).fit(x, y).weight.norm().item() for a in (1e-3, 0.1, 1, 10, 1e3)]
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    # alpha -> infinity: every row goes to the target mean
    huge = build_into_map("ridge", alpha=1e9).fit(x, y)
    mean = torch.nn.functional.normalize(torch.from_numpy(unit(y.astype(np.float64)).mean(0)).float(), dim=0)
    torch.testing.assert_close(huge.encode("x", xt[:5]), mean.expand(5, -1), atol=1e-5, rtol=0)
    # scale-free: alpha is relative to the feature scale
    a = build_into_map("ridge", alpha=0.5).fit(x, y).encode("x", xt)
    b = build_into_map("ridge", alpha=0.5).fit(x * 1000, y).encode("x", xt * 1000)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ procrustes


def test_procrustes_recovers_a_rotation_exactly():
    rng = np.random.default_rng(3)
    y = unit(rng.normal(size=(50, 8)) + 0.5)  # not centred: the mean is added back
    r = orthonormal_rows(rng, 8, 8)
    model = build_into_map("procrustes").fit(y @ r.T, y)
    np.testing.assert_allclose(model.rotation.numpy(), r, atol=1e-5)
    np.testing.assert_allclose(model.encode("x", y @ r.T).numpy(), y, atol=1e-5)


def test_procrustes_wider_features_are_reduced_by_pca():
    rng = np.random.default_rng(4)
    y = unit(rng.normal(size=(50, 6)) + 0.5)
    b = orthonormal_rows(rng, 6, 20)  # an isometric embedding of y in 20 dims
    model = build_into_map("procrustes").fit(y @ b, y)
    assert model.rotation.shape == (6, 6) and model.matrix.shape == (20, 6)
    np.testing.assert_allclose(model.encode("x", y @ b).numpy(), y, atol=1e-5)


def test_procrustes_narrower_features_are_padded():
    rng = np.random.default_rng(5)
    e = orthonormal_rows(rng, 4, 9)  # targets live in a 4-dim subspace of the 9-dim space
    y = unit(rng.normal(size=(40, 4)) + 0.5) @ e
    r = orthonormal_rows(rng, 4, 4)
    x = y @ e.T @ r  # 4-dim features, an exact rotation of the targets' coordinates
    model = build_into_map("procrustes").fit(x, y)
    w = model.rotation.numpy()
    assert w.shape == (4, 9)
    np.testing.assert_allclose(w @ w.T, np.eye(4), atol=1e-5)  # orthonormal rows
    np.testing.assert_allclose(model.encode("x", x).numpy(), y, atol=1e-5)


# ------------------------------------------------------------------ nn-transfer and asif


def test_nn_transfer_k1_returns_the_neighbours_target():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    y = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    model = build_into_map("nn-transfer", k=1).fit(x, y)
    q = np.array([[0.9, 0.2], [0.1, 0.8], [-0.8, -0.1], [0.2, -0.9]])
    np.testing.assert_allclose(model.encode("x", q).numpy(), unit(y), atol=1e-6)
    # k=2: the mean of the two nearest targets, normalised
    two = build_into_map("nn-transfer", k=2).fit(x, y).encode("x", q[:1]).numpy()
    np.testing.assert_allclose(two, unit(unit(y)[[0, 1]].mean(0, keepdims=True)), atol=1e-6)


def test_nn_transfer_counts_each_item_once():
    # rows 0-2 are three recordings of item 7, row 3 is item 9, row 4 is item 4
    x = np.array([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.0, 1.0], [-1.0, 0.0]])
    y = np.array([[1.0, 0.0, 0.0]] * 3 + [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    q = np.array([[0.95, 0.3]])  # nearest rows: 1, 0, 2 (all item 7), then 3
    deduped = build_into_map("nn-transfer", k=2).fit(x, y, item=np.array([7, 7, 7, 9, 4]))
    np.testing.assert_allclose(deduped.encode("x", q).numpy(), unit(np.array([[1.0, 1.0, 0.0]])), atol=1e-6)
    assert deduped.targets.shape == (3, 3) and deduped._fitted["n_items"] == 3
    plain = build_into_map("nn-transfer", k=2).fit(x, y)  # without items: two rows of item 7
    np.testing.assert_allclose(plain.encode("x", q).numpy(), [[1.0, 0.0, 0.0]], atol=1e-6)


def test_asif_k1_equals_nn_transfer_k1_and_weights_by_power():
    (x, y, item), (xt, _, _) = realistic()
    asif = build_into_map("asif", k=1).fit(x, y, item)
    nn = build_into_map("nn-transfer", k=1).fit(x, y, item)
    assert torch.equal(asif.encode("x", xt), nn.encode("x", xt))
    # by hand: similarities 1 and 0.5 to the two items -> weights 1 and 0.5**p
    xs = np.array([[1.0, 0.0], [0.5, np.sqrt(0.75)], [-1.0, 0.0], [-0.5, -np.sqrt(0.75)]])
    ys = np.eye(4)
    model = build_into_map("asif", k=2, p=2.0).fit(xs, ys)
    q = model.encode("x", xs[:1]).numpy()
    np.testing.assert_allclose(q, unit(np.array([[1.0, 0.25, 0.0, 0.0]])), atol=1e-6)


def test_asif_with_no_positive_similarity_keeps_the_best_item():
    x = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    model = build_into_map("asif", k=4).fit(x, np.eye(4))
    out = model.encode("x", np.array([[0.0, 0.0, 1.0]])).numpy()  # similarity 0 to every row
    assert np.isclose(np.sort(out[0])[::-1], [1.0, 0.0, 0.0, 0.0]).all(), out


# ------------------------------------------------------------------ saving


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_and_same_bytes(name, tmp_path):
    (x, y, item), (xt, _, _) = realistic()
    model = build_into_map(name).fit(x, y, item)
    model.save(tmp_path / "a")
    model.save(tmp_path / "b")
    build_into_map(name).fit(x, y, item).save(tmp_path / "c")
    for f in ("config.json", "weights.safetensors"):
        first = (tmp_path / "a" / f).read_bytes()
        assert first == (tmp_path / "b" / f).read_bytes() == (tmp_path / "c" / f).read_bytes()
    loaded = IntoMap.load(tmp_path / "a")
    assert type(loaded) is type(model) and loaded.out_dim == model.out_dim
    assert torch.equal(loaded.encode("x", xt), model.encode("x", xt))
    loaded.save(tmp_path / "d")
    assert (tmp_path / "d" / "weights.safetensors").read_bytes() == (tmp_path / "a" / "weights.safetensors").read_bytes()


def test_load_refuses_the_wrong_class_and_a_damaged_folder(tmp_path):
    (x, y, item), _ = realistic()
    build_into_map("ridge").fit(x, y).save(tmp_path / "m")
    assert isinstance(RidgeInto.load(tmp_path / "m"), RidgeInto)
    with pytest.raises(IntoMapError, match="load it with IntoMap.load"):
        NNTransferInto.load(tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").unlink()
    with pytest.raises(IntoMapError, match="damaged"):
        IntoMap.load(tmp_path / "m")
    with pytest.raises(AnybindError, match="no config.json"):
        IntoMap.load(tmp_path / "nothing")


# ------------------------------------------------------------------ refusals


def test_bad_training_rows_are_refused():
    x, y = np.ones((5, 3)), np.eye(5)[:, :4] + 0.1
    cases = [
        (np.ones(5), y, None, "2-D"),
        (x, y[:4], None, "one row per pair"),
        (x[:1], y[:1], None, "at least 2"),
        (np.where(np.eye(5, 3) > 0, np.nan, 1.0), y, None, "NaN or inf"),
        (x, np.zeros((5, 4)), None, "all-zero"),
        (x, y, np.arange(4), "one entry per row"),
        (x, y, np.linspace(0, 1, 5), "integers"),
        (x, np.full((5, 4), "a"), None, "real numbers"),
    ]
    for xx, yy, item, message in cases:
        with pytest.raises(IntoMapError, match=message):
            build_into_map("ridge").fit(xx, yy, item)
    assert issubclass(IntoMapError, AnybindError) and issubclass(IntoMapError, ValueError)


def test_bad_encode_input_is_refused():
    model = build_into_map("nn-transfer")
    with pytest.raises(IntoMapError, match="not fitted"):
        model.encode("x", np.ones((2, 3)))
    with pytest.raises(IntoMapError, match="not fitted"):
        _ = model.out_dim
    model.fit(np.eye(4)[:, :3] + 0.1, np.eye(4))
    for feats, message in [(np.ones((2, 5)), "dimension 5"), (np.full((2, 3), np.inf), "NaN or inf"),
                           (np.ones((2, 3, 1)), "2-D"), ([], "empty list")]:
        with pytest.raises(IntoMapError, match=message):
            model.encode("x", feats)


def test_unknown_names_and_options_are_refused():
    with pytest.raises(IntoMapError, match=r"unknown map into a fixed space 'rige' \(did you mean 'ridge'\?\)"):
        build_into_map("rige")
    with pytest.raises(IntoMapError, match=r"no option 'aplha' \(did you mean 'alpha'\?\)"):
        build_into_map("ridge", aplha=1.0)
    for name, options, message in [("ridge", {"alpha": -1.0}, "alpha"), ("asif", {"p": 0}, "p must be above"),
                                   ("nn-transfer", {"k": 0}, "k must be at least 1"),
                                   ("asif", {"k": 2.5}, "integer"), ("ridge", {"alpha": float("nan")}, "finite")]:
        with pytest.raises(IntoMapError, match=message):
            build_into_map(name, **options)


def test_a_map_registered_from_outside():
    @register_into_map("mean-target")
    @dataclass(eq=False)
    class MeanTarget(IntoMap):
        """Every row goes to the targets' mean."""

        batch_size: int = 16
        _STATE = ("mean",)

        def _fit(self, x, y, item):
            self.mean = torch.from_numpy(y.mean(axis=0)).float()

        def _encode(self, x):
            return self.mean.expand(len(x), -1)

    try:
        out = build_into_map("mean-target").fit(np.eye(3), np.eye(3) + 1).encode("x", np.ones((2, 3)))
        torch.testing.assert_close(out, torch.full((2, 3), 3 ** -0.5))
        with pytest.raises(IntoMapError, match="dataclass subclasses of IntoMap"):
            register_into_map("plain")(type("Plain", (IntoMap,), {}))
    finally:
        INTO_MAPS.unregister("mean-target")


# ------------------------------------------------------------------ realistic retrieval

# measured over seeds 0-2 (200 test items, chance 0.005): ridge 0.61-0.64, procrustes 0.44-0.47,
# nn-transfer 0.18-0.22, asif 0.19-0.20
R1_FLOOR = {"ridge": 0.4, "procrustes": 0.25, "nn-transfer": 0.1, "asif": 0.1}


@pytest.mark.parametrize("name", NAMES)
def test_retrieval_far_above_chance(name):
    (x, y, item), (xt, yt, _) = realistic()
    z = build_into_map(name).fit(x, y, item).encode("audio", xt)
    scores = z @ torch.nn.functional.normalize(torch.from_numpy(yt), dim=1).T
    r1 = (scores.argmax(dim=1) == torch.arange(len(yt))).float().mean().item()
    print(f"{name}: R@1 {r1:.3f} (chance {1 / len(yt):.3f})")
    assert r1 >= R1_FLOOR[name], r1
