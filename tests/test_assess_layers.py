"""All layer pairs at once: identical to the per-pair metric in a loop; per-layer work done once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anybind.assess import metrics as M
from anybind.assess.layers import layer_pair_scores
from anybind.errors import AnybindError


def _layers(rng, n, dims, z, noise):
    out = []
    for i, d in enumerate(dims):
        f = z @ rng.normal(size=(z.shape[1], d)) + noise[i] * rng.normal(size=(n, d))
        out.append(f.astype(np.float32) if i % 2 else torch.tensor(f))
    return out


def _tolerance(metric: str) -> dict:
    # the batched linear CKA multiplies in float32 (the matmul rate): the bound is 1e-6
    return {"rtol": 0, "atol": 1e-6} if metric == "linear_cka" else {"rtol": 1e-9, "atol": 1e-12}


@pytest.mark.parametrize("metric", sorted(M.METRICS))
@pytest.mark.parametrize("standardize", [False, True])
def test_batched_equals_loop(metric, standardize):
    rng = np.random.default_rng(0)
    n = 60
    z = rng.normal(size=(n, 5))
    xs = _layers(rng, n, [8, 12, 6], z, [0.1, 1.0, 3.0])
    ys = _layers(rng, n, [10, 4], z, [0.5, 2.0])
    got = layer_pair_scores(xs, ys, metric=metric, k=6, standardize=standardize)
    want = np.array([[M.score(metric, x, y, k=6, standardize=standardize) for y in ys] for x in xs])
    assert got.shape == (3, 2)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, **_tolerance(metric))
    # the structure is there: scores differ across layers
    assert got.max() - got.min() > 0.01


@pytest.mark.parametrize("metric", ["linear_cka", "unbiased_cka"])
def test_batched_equals_loop_wide_features(metric):
    # d > n: the Gram-matrix route
    rng = np.random.default_rng(1)
    n = 12
    z = rng.normal(size=(n, 3))
    xs = _layers(rng, n, [40, 30], z, [0.2, 1.0])
    ys = _layers(rng, n, [25, 50, 8], z, [0.3, 0.3, 2.0])
    got = layer_pair_scores(xs, ys, metric=metric)
    want = np.array([[M.score(metric, x, y) for y in ys] for x in xs])
    np.testing.assert_allclose(got, want, **_tolerance(metric))


def test_knn_found_once_per_layer(monkeypatch):
    calls = []
    real = M.nearest_neighbors

    def counting(f, k):
        calls.append(f.shape)
        return real(f, k)

    monkeypatch.setattr(M, "nearest_neighbors", counting)
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(30, 4)) for _ in range(4)]
    ys = [rng.normal(size=(30, 3)) for _ in range(5)]
    for metric in ("mutual_knn", "cycle_knn", "cknna"):
        calls.clear()
        layer_pair_scores(xs, ys, metric=metric, k=4)
        assert len(calls) == 4 + 5, metric  # L1 + L2 top-k passes, not L1 x L2


def test_mutual_knn_layers_k_rule_and_identity():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8))
    got = layer_pair_scores([x, x * 2], [x, rng.normal(size=(50, 8))], "mutual_knn", k="sqrt")
    assert got[0, 0] == 1.0 and got[1, 0] == 1.0
    assert got[0, 1] < 0.5


def test_layer_errors():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20, 3))
    with pytest.raises(AnybindError, match="unknown metric .svcca.; registered metrics: cknna, cycle_knn"):
        layer_pair_scores([x], [x], metric="svcca")
    with pytest.raises(AnybindError, match="empty"):
        layer_pair_scores([], [x])
    with pytest.raises(AnybindError, match="same paired items"):
        layer_pair_scores([x, x[:10]], [x])
    with pytest.raises(AnybindError, match="list of per-layer"):
        layer_pair_scores(x, [x])
    with pytest.raises(AnybindError, match="at least 21"):
        layer_pair_scores([x], [x], k=20)


# ---- a metric registered by a user ------------------------------------------------------------------
def _mean_abs_cosine(x, y, standardize=False):
    """A toy metric: mean |cosine| between paired rows of the first min(dx, dy) dimensions."""
    fx, fy = M.prepare(x, standardize), M.prepare(y, standardize)
    d = min(fx.shape[1], fy.shape[1])
    return float(torch.nn.functional.cosine_similarity(fx[:, :d], fy[:, :d]).abs().mean())


@pytest.fixture
def user_metrics():
    added = []

    def register(name, fn, **kw):
        M.register_metric(name, fn, **kw)
        added.append(name)

    yield register
    for name in added:
        M.METRICS.unregister(name)


def test_a_users_metric_is_computed_by_its_own_function(user_metrics):
    # registered without a batched form: every layer pair goes through the user's function (not CKNNA)
    user_metrics("test_abs_cosine", _mean_abs_cosine)
    rng = np.random.default_rng(5)
    z = rng.normal(size=(40, 4))
    xs, ys = _layers(rng, 40, [6, 8], z, [0.1, 1.0]), _layers(rng, 40, [5, 7, 3], z, [0.2, 0.5, 2.0])
    got = layer_pair_scores(xs, ys, metric="test_abs_cosine", k=5)
    want = np.array([[_mean_abs_cosine(x, y) for y in ys] for x in xs])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert not np.allclose(got, layer_pair_scores(xs, ys, metric="cknna", k=5))
    assert M.score("test_abs_cosine", xs[0], ys[0], k=5) == pytest.approx(want[0, 0])


def test_a_users_batched_form_is_used(user_metrics):
    calls = []

    def batched(fxs, fys, k):
        calls.append((len(fxs), len(fys), k))
        return np.array([[_mean_abs_cosine(fx, fy) for fy in fys] for fx in fxs])

    user_metrics("test_abs_cosine_batched", _mean_abs_cosine, batched=batched)
    rng = np.random.default_rng(6)
    z = rng.normal(size=(30, 4))
    xs, ys = _layers(rng, 30, [6, 8], z, [0.1, 1.0]), _layers(rng, 30, [5], z, [0.2])
    got = layer_pair_scores(xs, ys, metric="test_abs_cosine_batched", k=4)
    assert calls == [(2, 1, 4)] and got.shape == (2, 1) and got.dtype == np.float64
    np.testing.assert_allclose(got[:, 0], [_mean_abs_cosine(x, ys[0]) for x in xs], rtol=1e-12)


def test_every_builtin_metric_carries_its_batched_form():
    for name in M.METRICS:
        form = M.batched_form(name)
        assert callable(form) and form.__name__ == f"batched_{name}", name
    with pytest.raises(AnybindError, match="unknown metric 'cka'"):
        layer_pair_scores([np.eye(5)], [np.eye(5)], metric="cka")


def test_float32_linear_cka_within_1e6_at_encoder_widths():
    # the batched form multiplies in float32: at encoder widths and a few thousand items it stays
    # within 1e-6 of the float64 per-pair definition (the bound for reduced precision)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2000, 32, generator=g)
    xs = [z @ torch.randn(32, 384, generator=g) + s * torch.randn(2000, 384, generator=g) for s in (1, 4)]
    ys = [z @ torch.randn(32, 768, generator=g) + s * torch.randn(2000, 768, generator=g) for s in (2, 8)]
    got = layer_pair_scores(xs, ys, metric="linear_cka")
    want = np.array([[M.linear_cka(x, y) for y in ys] for x in xs])
    assert np.abs(got - want).max() < 1e-6
    assert got.max() - got.min() > 0.05
