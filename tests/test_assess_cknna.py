"""The sparse all-layer-pairs CKNNA (anybind.assess.cknna) equals metrics.cknna pair by pair."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import anybind.assess.cknna as C
import anybind.assess.metrics as M
from anybind.errors import AnybindError


def _layers(n: int, widths: list[int], noise: list[float], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=torch.Generator().manual_seed(99))  # shared by both sides
    return [z @ torch.randn(8, d, generator=g) + w * torch.randn(n, d, generator=g) for d, w in zip(widths, noise)]


def _pairwise(xs, ys, k) -> np.ndarray:
    return np.array([[M.cknna(x, y, k) for y in ys] for x in xs])


@pytest.mark.parametrize("k", [5, 10, "sqrt"])
def test_equals_the_pairwise_metric_on_layers_with_a_shared_component(k):
    xs = _layers(300, [16, 48, 24], [0.3, 1.0, 3.0], seed=1)
    ys = _layers(300, [32, 20], [0.5, 2.0], seed=2)
    got = C.batched_cknna([M.prepare(x) for x in xs], [M.prepare(y) for y in ys], k)
    want = _pairwise(xs, ys, k)
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert want.max() > 0.2  # the shared component shows: not all at chance


def test_small_blocks_and_tied_duplicate_rows_give_the_same_scores(monkeypatch):
    xs = _layers(60, [12, 6], [0.5, 1.5], seed=3)
    ys = _layers(60, [9], [0.8], seed=4)
    xs[0][30:40] = xs[0][:10]  # duplicated rows: ties in the neighbour search
    fxs, fys = [M.prepare(x) for x in xs], [M.prepare(y) for y in ys]
    monkeypatch.setattr(C, "_BLOCK", 7)  # one row per block, many blocks
    monkeypatch.setattr(C, "_GATHER_BLOCK", 7)
    got = C.batched_cknna(fxs, fys, 4)
    np.testing.assert_allclose(got, _pairwise(fxs, fys, 4), rtol=0, atol=1e-9)
    nb = M.nearest_neighbors(fxs[0], 4)
    brute = [[i in nb[j].tolist() for j in nb[i].tolist()] for i in range(60)]
    assert C.reciprocal(nb).tolist() == brute


def test_identical_spaces_score_one_on_their_pair():
    xs = _layers(120, [16, 24], [0.5, 2.0], seed=5)
    fxs = [M.prepare(x) for x in xs]
    got = C.batched_cknna(fxs, [fxs[1], fxs[0]], 6)
    assert got[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert got[1, 0] == pytest.approx(1.0, abs=1e-12)
    assert got[0, 0] < 0.99


# ---- a case worked out by hand: 6 points on the unit circle, k = 2 ------------------------------
X_DEG = [0, 10, 25, 55, 105, 160]  # angular distances decide the neighbours (cos is monotone)
Y_DEG = [0, 40, 15, 70, 125, 95]
# the two nearest other points of each point, read off the angles above (no ties)
X_NB = [{1, 2}, {0, 2}, {1, 0}, {2, 1}, {3, 5}, {4, 3}]
Y_NB = [{2, 1}, {2, 3}, {0, 1}, {5, 1}, {5, 3}, {3, 4}]
# mutual: j in both lists of row i
MUTUAL = [{1, 2}, {2}, {0, 1}, {1}, {3, 5}, {3, 4}]
# matched both ways (i, j) and (j, i): the only pairs in sum_ij A_ij B_ji
RECIPROCAL = [(0, 2), (1, 2), (4, 5)]


def _circle(deg: list[int]) -> torch.Tensor:
    rad = torch.tensor(deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def _mask(lists: list[set[int]]) -> torch.Tensor:
    m = torch.zeros(len(lists), len(lists), dtype=torch.float64)
    for i, js in enumerate(lists):
        m[i, sorted(js)] = 1.0
    return m


def test_a_case_worked_out_by_hand():
    fx, fy = _circle(X_DEG), _circle(Y_DEG)
    assert [set(r) for r in M.nearest_neighbors(fx, 2).tolist()] == X_NB
    assert [set(r) for r in M.nearest_neighbors(fy, 2).tolist()] == Y_NB
    assert [a & b for a, b in zip(X_NB, Y_NB)] == MUTUAL
    kmat, lmat = fx @ fx.T, fy @ fy.T  # cos of the angle differences
    mk, ml, m = _mask(X_NB), _mask(Y_NB), _mask(MUTUAL)
    assert {(i, j) for i, j in (m * m.T).nonzero().tolist() if i < j} == set(RECIPROCAL)
    cross = M.hsic_unbiased_dense(m * kmat, m * lmat)
    # the same HSIC from its four sums written out over the hand-made lists (n = 6)
    tr = 2 * sum(float(kmat[i, j] * lmat[i, j]) for i, j in RECIPROCAL)
    pairs = [(i, j) for i, js in enumerate(MUTUAL) for j in js]
    col = [sum(float(kmat[i, j]) for i, j in pairs if j == c) for c in range(6)]
    row = [sum(float(lmat[i, j]) for i, j in pairs if i == r) for r in range(6)]
    sum_a, sum_b = sum(col), sum(row)
    by_hand = (tr + sum_a * sum_b / (5 * 4) - 2 * float(np.dot(col, row)) / 4) / (6 * 3)
    assert cross == pytest.approx(by_hand, abs=1e-12)
    xs, ys = C._stack([C.neighbour_terms(fx, 2)]), C._stack([C.neighbour_terms(fy, 2)])
    assert float(C.cross_hsic(xs, ys, 6)[0, 0]) == pytest.approx(cross, abs=1e-12)
    sx = M.hsic_unbiased_dense(mk * kmat, mk * kmat)
    sy = M.hsic_unbiased_dense(ml * lmat, ml * lmat)
    assert float(C.self_hsic(*xs, 6)[0]) == pytest.approx(sx, abs=1e-12)
    assert float(C.self_hsic(*ys, 6)[0]) == pytest.approx(sy, abs=1e-12)
    got = C.batched_cknna([fx], [fy], 2)
    assert got[0, 0] == pytest.approx(cross / math.sqrt(sx * sy), abs=1e-12)
    assert got[0, 0] == pytest.approx(M.cknna(fx, fy, 2), abs=1e-12)


def test_errors_are_those_of_the_dense_form():
    f = [M.prepare(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)))]
    with pytest.raises(AnybindError, match="k >= 2"):
        C.batched_cknna(f, f, 1)
    with pytest.raises(AnybindError, match="at least 4 paired items"):
        C.batched_cknna([f[0][:3]], [f[0][:3]], 2)
    with pytest.raises(AnybindError, match="neighbours need at least"):
        C.batched_cknna(f, f, 10)
    with pytest.raises(AnybindError, match="unknown k rule"):
        C.batched_cknna(f, f, "cube")
