"""Alignment metrics: hand-computed small cases, invariances, chance levels, k rules, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anybind.assess import metrics as M
from anybind.errors import AnybindError


def unit(deg: float) -> list[float]:
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


# Points on the unit circle (angles in degrees); the nearest neighbour is the smallest angle gap.
#   x: 0, 10, 90, 100   -> NN_x = [1, 0, 3, 2]
#   y: 0, 10, 100, 25   -> NN_y: 0 -> 1 (gap 10); 1 -> 0 (gap 10 vs 15 to item 3);
#                          2 -> 3 (gap 75); 3 -> 1 (gap 15)   = [1, 0, 3, 1]
# mutual 1-NN: rows 0, 1, 2 agree, row 3 (2 vs 1) does not -> 3/4.
# cycle x->y->x (knn_x[knn_y] == i): 0: y-NN 1, x-NN(1) = 0 yes; 1: 0 -> x-NN(0) = 1 yes;
#   2: 3 -> x-NN(3) = 2 yes; 3: 1 -> x-NN(1) = 0 no                 -> 3/4.
# cycle y->x->y (knn_y[knn_x]): 0: 1 -> 0 yes; 1: 0 -> 1 yes; 2: 3 -> 1 no; 3: 2 -> 3 yes -> 3/4.
X4 = np.array([unit(a) for a in (0, 10, 90, 100)])
Y4 = np.array([unit(a) for a in (0, 10, 100, 25)])


def test_mutual_knn_hand_case():
    assert M.mutual_knn(X4, Y4, k=1) == pytest.approx(0.75)
    # rows scaled by positive factors: L2 normalisation makes it irrelevant
    scales = np.array([[3.0], [0.1], [7.0], [2.0]])
    assert M.mutual_knn(X4 * scales, torch.tensor(Y4 / scales), k=1) == pytest.approx(0.75)


def test_cycle_knn_hand_case():
    assert M.cycle_knn(X4, Y4, k=1) == pytest.approx(0.75)
    assert M.cycle_knn(Y4, X4, k=1) == pytest.approx(0.75)
    # k = 3 = n - 1: every other item is a neighbour, so every cycle returns home
    assert M.cycle_knn(X4, Y4, k=3) == pytest.approx(1.0)
    assert M.mutual_knn(X4, Y4, k=3) == pytest.approx(1.0)


def test_cycle_knn_asymmetric_hand_case():
    # x: 0, 10, 25 degrees -> NN_x = [1, 0, 1]; y: 0, 90, 10 degrees -> NN_y = [2, 2, 0]; k = 1.
    #   knn_x[knn_y]: 0: y 2 -> x-NN(2) = 1 no; 1: y 2 -> 1 yes; 2: y 0 -> x-NN(0) = 1 no -> 1/3
    #   knn_y[knn_x]: 0: x 1 -> y-NN(1) = 2 no; 1: x 0 -> y-NN(0) = 2 no; 2: x 1 -> 2 yes -> 1/3
    #   mutual: 0: 1 vs 2 no; 1: 0 vs 2 no; 2: 1 vs 0 no -> 0
    x = np.array([unit(a) for a in (0, 10, 25)])
    y = np.array([unit(a) for a in (0, 90, 10)])
    assert M.cycle_knn(x, y, k=1) == pytest.approx(1 / 3)
    assert M.cycle_knn(y, x, k=1) == pytest.approx(1 / 3)
    assert M.mutual_knn(x, y, k=1) == 0.0


def test_linear_cka_hand_case():
    # x rows e1, e2, e3 -> K = I, HKH = H; y rows e1, e1, e2 -> L = [[1,1,0],[1,1,0],[0,0,1]].
    # HSIC(K, L) = tr(H L H) = tr(L) - 1^T L 1 / 3 = 3 - 5/3 = 4/3; HSIC(K, K) = tr(H) = 2;
    # HLH: row means (2/3, 2/3, 1/3), grand mean 5/9 -> entries 2/9 (x4), -4/9 (x4), 8/9 (x1)
    # -> HSIC(L, L) = 16/81 + 64/81 + 64/81 = 16/9; CKA = (4/3) / sqrt(2 * 16/9) = 1/sqrt(2).
    x = np.eye(3)
    y = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert M.linear_cka(x, y) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert M.linear_cka(x, x) == pytest.approx(1.0)


def test_hsic_unbiased_hand_cases():
    # K~ = J - I (n = 4): sum(K~ * K~^T) = 12, sum(K~) = 12, sum(K~ K~) = |3 * 1|^2 = 36
    # -> [12 + 144/6 - 2*36/2] / (4*1) = 0 (a constant kernel carries no information)
    j = torch.ones(4, 4, dtype=torch.float64)
    assert M.hsic_unbiased_dense(j, j) == pytest.approx(0.0, abs=1e-12)
    # K~ pairs items (0,1) and (2,3): sum(K~ * K~^T) = 4, sum(K~) = 4, K~ 1 = 1 -> sum(K~K~) = 4
    # -> [4 + 16/6 - 2*4/2] / 4 = 2/3; the diagonal is ignored
    p = torch.tensor([[5, 1, 0, 0], [1, 5, 0, 0], [0, 0, 5, 1], [0, 0, 1, 5]], dtype=torch.float64)
    assert M.hsic_unbiased_dense(p, p) == pytest.approx(2 / 3)


def _song_unbiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Reference: the Song et al. estimator written out on the n x n kernels."""
    fx = torch.nn.functional.normalize(torch.tensor(x, dtype=torch.float64), dim=1)
    fy = torch.nn.functional.normalize(torch.tensor(y, dtype=torch.float64), dim=1)
    k, l_ = fx @ fx.T, fy @ fy.T
    h = M.hsic_unbiased_dense
    return h(k, l_) / math.sqrt(h(k, k) * h(l_, l_))


def test_unbiased_cka_matches_song_estimator_on_kernels():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 5))
    x = z @ rng.normal(size=(5, 12)) + 0.5 * rng.normal(size=(40, 12))
    y = z @ rng.normal(size=(5, 7)) + 0.5 * rng.normal(size=(40, 7))
    assert M.unbiased_cka(x, y) == pytest.approx(_song_unbiased_cka(x, y), rel=1e-10)
    assert M.unbiased_cka(x, x) == pytest.approx(1.0)
    # wide features (d > n) take the Gram route; same value
    xw = rng.normal(size=(10, 40))
    yw = xw[:, :30] + 0.1 * rng.normal(size=(10, 30))
    assert M.unbiased_cka(xw, yw) == pytest.approx(_song_unbiased_cka(xw, yw), rel=1e-10)


def _biased_cka_kernels(k: torch.Tensor, l_: torch.Tensor) -> float:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    hs = lambda a, b: float(torch.trace(a @ h @ b @ h))  # noqa: E731
    return hs(k, l_) / math.sqrt(hs(k, k) * hs(l_, l_))


def test_linear_and_rbf_cka_match_kernel_definition():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 6))
    y = x @ rng.normal(size=(6, 4)) + rng.normal(size=(30, 4))
    fx = torch.nn.functional.normalize(torch.tensor(x), dim=1)
    fy = torch.nn.functional.normalize(torch.tensor(y), dim=1)
    assert M.linear_cka(x, y) == pytest.approx(_biased_cka_kernels(fx @ fx.T, fy @ fy.T))
    s = 0.7
    kx = torch.exp(-(torch.cdist(fx, fx) ** 2) / (2 * s * s))
    ky = torch.exp(-(torch.cdist(fy, fy) ** 2) / (2 * s * s))
    assert M.rbf_cka(x, y, sigma=s) == pytest.approx(_biased_cka_kernels(kx, ky), rel=1e-9)
    # median heuristic: sigma_x = median distance between distinct normalised rows
    d = torch.cdist(fx, fx)
    med = float(d[torch.triu_indices(30, 30, 1).unbind()].median())
    assert M.rbf_sigma(fx) == pytest.approx(med)
    # very wide kernel: exp(-d^2/2s^2) ~ 1 - d^2/2s^2, whose centred form is HKH / s^2
    assert M.rbf_cka(x, y, sigma=1e3) == pytest.approx(M.linear_cka(x, y), abs=1e-5)
    assert M.rbf_cka(x, x) == pytest.approx(1.0)


def test_cka_family_invariances():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 8))
    y = np.tanh(x @ rng.normal(size=(8, 10))) + 0.3 * rng.normal(size=(60, 10))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    q2, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    for name in ("linear_cka", "unbiased_cka", "rbf_cka", "cknna", "mutual_knn", "cycle_knn"):
        base = M.score(name, x, y, k=5)
        moved = M.score(name, 3.7 * x @ q, 0.01 * y @ q2, k=5)
        assert moved == pytest.approx(base, abs=1e-9), name
        assert M.score(name, x, x, k=5) == pytest.approx(1.0), name


def test_standardize_changes_per_dimension_scale_only():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6))
    y = x + 0.5 * rng.normal(size=(50, 6))
    scale = np.array([100.0, 1, 1, 0.01, 1, 5])
    shift = np.array([3.0, -2, 0, 1, 10, 0])
    for name in M.METRICS:
        a = M.score(name, x, y, k=5, standardize=True)
        b = M.score(name, x * scale + shift, y, k=5, standardize=True)
        assert b == pytest.approx(a, abs=1e-9), name
    # a constant column does not break standardisation
    xc = np.concatenate([x, np.ones((50, 1))], axis=1)
    assert math.isfinite(M.linear_cka(xc, y, standardize=True))


def test_mutual_knn_identical_and_chance():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 32))
    assert M.mutual_knn(x, x, k=10) == 1.0
    assert M.mutual_knn(x, torch.tensor(x, dtype=torch.float32), k=10) == 1.0
    y = rng.normal(size=(500, 48))
    chance = 10 / 499  # each of the k neighbours in y is in x's list with probability k/(n-1)
    # per-row overlap ~ hypergeometric (mean 0.2, var < 0.2): sd of the mean ~ 0.002
    assert M.mutual_knn(x, y, k=10) == pytest.approx(chance, abs=0.01)
    assert M.cycle_knn(x, y, k=10) < 0.35  # 1 - (1 - 10/499)^100 ~ 0.87 at worst; typical ~0.18
    assert abs(M.linear_cka(x, y)) < 0.2
    assert abs(M.unbiased_cka(x, y)) < 0.05


def test_cknna_related_beats_unrelated_and_matches_reference():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(80, 4))
    x = z @ rng.normal(size=(4, 16)) + 0.2 * rng.normal(size=(80, 16))
    y = z @ rng.normal(size=(4, 12)) + 0.2 * rng.normal(size=(80, 12))
    u = rng.normal(size=(80, 12))
    assert M.cknna(x, y, k=8) > M.cknna(x, u, k=8) + 0.2
    # reference: masks from a full argsort of the Gram matrices (self set to -inf)
    fx = torch.nn.functional.normalize(torch.tensor(x), dim=1)
    fy = torch.nn.functional.normalize(torch.tensor(y), dim=1)
    k, l_ = fx @ fx.T, fy @ fy.T

    def mask(g):
        g = g.clone().fill_diagonal_(-math.inf)
        m = torch.zeros_like(g)
        m.scatter_(1, g.argsort(dim=1, descending=True)[:, :8], 1.0)
        return m

    mk, ml = mask(k), mask(l_)
    h = M.hsic_unbiased_dense
    ref = h(mk * ml * k, mk * ml * l_) / math.sqrt(h(mk * k, mk * k) * h(ml * l_, ml * l_))
    assert M.cknna(x, y, k=8) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize(
    ("n", "rule", "want"),
    [
        (100, "sqrt", 10),  # sqrt(100) = 10
        (1000, "sqrt", 32),  # 31.62 -> 32
        (100, "sturges", 8),  # ceil(6.64) + 1
        (1024, "sturges", 11),  # log2 = 10 exactly
        (100, "rice", 10),  # ceil(2 * 4.64) = ceil(9.28)
        (27, "rice", 6),  # 2 * 3 exactly, not 7
        (1000, "rice", 20),
        (50, 7, 7),
        (50, "SQRT", 7),  # round(7.07)
    ],
)
def test_knn_k_rules(n, rule, want):
    assert M.knn_k(n, rule) == want


def test_knn_k_errors():
    with pytest.raises(AnybindError, match="at least 11"):
        M.knn_k(10, 10)
    with pytest.raises(AnybindError, match="sqrt, sturges, rice"):
        M.knn_k(100, "log")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(AnybindError):
            M.knn_k(100, bad)
    with pytest.raises(AnybindError, match="at least 11"):
        M.mutual_knn(np.eye(10), np.eye(10), k=10)
    with pytest.raises(AnybindError, match="k >= 2"):
        M.cknna(np.eye(10), np.eye(10), k=1)
    assert M.mutual_knn(np.eye(11), np.eye(11), k="sturges") == 1.0  # ceil(log2 11) + 1 = 5


def test_score_dispatch_and_errors():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 5))
    assert set(M.METRICS) == {
        "mutual_knn",
        "cycle_knn",
        "linear_cka",
        "unbiased_cka",
        "cknna",
        "rbf_cka",
    }
    assert M.score("mutual_knn", x, y, k=3) == M.mutual_knn(x, y, k=3)
    assert M.score("linear_cka", x, y, k=3) == M.linear_cka(x, y)
    with pytest.raises(AnybindError, match="unknown metric 'cka'.*registered metrics: cknna, cycle_knn, linear_cka"):
        M.score("cka", x, y)
    with pytest.raises(AnybindError, match=r"unknown metric 'mutual_nn' \(did you mean 'mutual_knn'\?\)"):
        M.check_metric("mutual_nn")
    with pytest.raises(AnybindError, match="paired row by row"):
        M.linear_cka(x, y[:20])
    with pytest.raises(AnybindError, match="2-D"):
        M.linear_cka(x[:, 0], y)
    with pytest.raises(AnybindError, match="NaN"):
        M.linear_cka(np.full((30, 4), np.nan), y)
    with pytest.raises(AnybindError, match="sigma"):
        M.rbf_cka(x, y, sigma=-1.0)
    with pytest.raises(AnybindError, match="at least 4"):
        M.unbiased_cka(x[:3], y[:3])
    # constant features: zero denominator scores 0.0 (as platonic-rep's epsilon would)
    assert M.linear_cka(np.ones((30, 4)), y) == 0.0


@pytest.mark.parametrize("n, chunk", [(2, 1), (7, 3), (257, 64), (700, 128), (700, 1024)])
def test_nearest_neighbors_tiles_equal_brute_force(n, chunk):
    # the symmetric-tile search (upper tiles only, running top-k) finds the same neighbour sets,
    # in decreasing similarity, as a float64 sort of the full Gram matrix
    g = torch.Generator().manual_seed(n)
    f = M.prepare(torch.randn(n, 64, generator=g) + torch.randn(1, 64, generator=g))
    k = min(10, n - 1)
    got = M.nearest_neighbors(f, k, chunk=chunk)
    sims = f @ f.T
    sims.fill_diagonal_(-math.inf)
    want = torch.topk(sims, k, dim=1).indices
    assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values)
    got_sims = sims.gather(1, got)
    assert bool((got_sims[:, :-1] >= got_sims[:, 1:] - 1e-6).all())  # ordered
    assert not bool((got == torch.arange(n)[:, None]).any())  # self never a neighbour


def test_nearest_neighbors_tile_size_does_not_change_the_lists():
    f = M.prepare(torch.randn(500, 32, generator=torch.Generator().manual_seed(1)))
    base = M.nearest_neighbors(f, 7)
    for chunk in (1, 50, 499, 500, 4096):
        assert torch.equal(M.nearest_neighbors(f, 7, chunk=chunk).sort(1).values, base.sort(1).values)
