"""Every layer of one encoder against every layer of another, without L1 x L2 recomputations.

``layer_pair_scores(xs, ys, metric)`` returns the [len(xs), len(ys)] matrix that calling
``metrics.score(metric, xs[a], ys[b])`` for every pair would give, through the metric's
registered batched form (`anybind.assess.metrics.register_metric`), which does the per-layer work
once:

* k-NN metrics (mutual_knn, cycle_knn): each layer's neighbour lists are found once
  (L1 + L2 top-k passes); the L1 x L2 overlaps are then counted in one batched comparison of the
  stacked [L, n, k] index tensors (cycle: one batched gather per y layer);
* linear_cka: each layer is normalised and centred once, its self-HSIC computed once; the cross
  HSICs ||Xc_a^T Yc_b||_F^2 come from one matmul per x layer against all y layers concatenated;
* unbiased_cka: the same batched cross products, plus per-layer vectors for the unbiased terms;
* rbf_cka: each layer's centred RBF Gram matrix is built once (the y layers' are kept:
  L2 * n^2 * 8 bytes), cross HSICs are their inner products;
* cknna (`anybind.assess.cknna`): each layer's neighbour lists, its similarities to those
  neighbours and the reciprocity flags once; every pair's masked unbiased HSIC from those sparse
  lists, batched over pairs (no n x n matrix).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from anybind.assess import metrics as M
from anybind.errors import AnybindError


def _prepare_all(layers: Sequence[Any], standardize: bool, name: str) -> list[torch.Tensor]:
    if isinstance(layers, (torch.Tensor, np.ndarray)) or not isinstance(layers, Sequence):
        raise AnybindError(
            f"{name} must be a list of per-layer feature arrays [n, d], got {type(layers).__name__}"
        )
    if len(layers) == 0:
        raise AnybindError(f"{name} is an empty list: give at least one layer's features")
    return [M.prepare(f, standardize, f"{name}[{i}]") for i, f in enumerate(layers)]


def layer_pair_scores(
    xs: list,
    ys: list,
    metric: str = "mutual_knn",
    k: int | str = 10,
    standardize: bool = False,
) -> np.ndarray:
    """[len(xs), len(ys)] scores of every layer of x against every layer of y (float64).

    Equal, up to float rounding, to ``metrics.score(metric, xs[a], ys[b], k, standardize)`` for
    every (a, b). All layers must hold the same n items in the same order. The metric's
    registered all-layer-pairs form does the work; a metric registered without one is scored
    pair by pair with its own function.
    """
    batched = M.batched_form(metric)
    fxs = _prepare_all(xs, standardize, "xs")
    fys = _prepare_all(ys, standardize, "ys")
    _check_rows(fxs, fys)
    if batched is None:
        return np.array([[M.score(metric, x, y, k, standardize) for y in ys] for x in xs], dtype=np.float64)
    return np.asarray(batched(fxs, fys, k), dtype=np.float64)


def _check_rows(fxs: list[torch.Tensor], fys: list[torch.Tensor]) -> None:
    n = fxs[0].shape[0]
    for name, fs in (("xs", fxs), ("ys", fys)):
        for i, f in enumerate(fs):
            if f.shape[0] != n:
                raise AnybindError(
                    f"{name}[{i}] has {f.shape[0]} rows but xs[0] has {n}: every layer must hold "
                    "the same paired items in the same order"
                )


# ---- the batched forms the built-in metrics register (anybind.assess.metrics) ------------------------
def batched_mutual_knn(fxs: list[torch.Tensor], fys: list[torch.Tensor], k: int | str = 10) -> np.ndarray:
    kk = M.knn_k(fxs[0].shape[0], k)
    nx, ny = _neighbours(fxs, kk), _neighbours(fys, kk)
    return (M.knn_overlap(nx, ny).double().mean(dim=2) / kk).numpy()


def batched_cycle_knn(fxs: list[torch.Tensor], fys: list[torch.Tensor], k: int | str = 10) -> np.ndarray:
    kk = M.knn_k(fxs[0].shape[0], k)
    return M.cycle_hits(_neighbours(fxs, kk), _neighbours(fys, kk)).double().mean(dim=2).numpy()


def _neighbours(fs: list[torch.Tensor], kk: int) -> torch.Tensor:
    """[L, n, k] neighbour lists, each layer's found once."""
    return torch.stack([M.nearest_neighbors(f, kk) for f in fs])


def _cross_frob2(ax: list[torch.Tensor], ay: list[torch.Tensor]) -> np.ndarray:
    """[L1, L2] of ||ax_a^T ay_b||_F^2: one matmul per y layer against all x layers at once.

    The products run in the inputs' dtype; their squares are summed in float64.
    """
    n = ax[0].shape[0]
    dys = [f.shape[1] for f in ay]
    out = np.empty((len(ax), len(ay)))
    if max(f.shape[1] for f in ax) * max(dys) > n * n:  # wide features: Gram form is cheaper
        grams = [f @ f.T for f in ay]
        for a, fa in enumerate(ax):
            ga = fa @ fa.T
            for b, gb in enumerate(grams):
                out[a, b] = float((ga * gb).double().sum())
        return out
    cat = torch.cat(ax, dim=1)
    bounds = np.cumsum([0, *(f.shape[1] for f in ax)])
    for b, fb in enumerate(ay):
        # all x layers against one y layer: cat^T fb ran at the matmul roof here, ~7% faster than
        # one y-concatenation against each x layer
        sq = (cat.T @ fb).double().square().sum(dim=1)  # per x column, then per x layer block
        for a in range(len(ax)):
            out[a, b] = float(sq[bounds[a] : bounds[a + 1]].sum())
    return out


def _ratios(cross: np.ndarray, sx: list[float], sy: list[float]) -> np.ndarray:
    out = np.empty_like(cross)
    for a in range(cross.shape[0]):
        for b in range(cross.shape[1]):
            out[a, b] = M._ratio(float(cross[a, b]), sx[a], sy[b])
    return out


def batched_linear_cka(fxs: list[torch.Tensor], fys: list[torch.Tensor], k: int | str = 10) -> np.ndarray:
    """Centred in float64, multiplied in float32 (the matmul rate; scores agree with the float64
    per-pair form to ~1e-8, tested), squares summed in float64."""
    M._need_n(fxs[0].shape[0], 2, "linear CKA")
    cx = [M.centred(f).float() for f in fxs]
    cy = [M.centred(f).float() for f in fys]
    sx = [_self_frob2(c) for c in cx]
    sy = [_self_frob2(c) for c in cy]
    return _ratios(_cross_frob2(cx, cy), sx, sy)


def _self_frob2(c: torch.Tensor, block: int = 384) -> float:
    """||c^T c||_F^2 from the blocks on and above the diagonal of the symmetric c^T c (the ones
    below are their transposes: counted twice), ~3/4 of the full product's FLOPs at 768 columns."""
    if c.shape[1] > c.shape[0]:
        return float(_cross_frob2([c], [c])[0, 0])  # wide: the n x n Gram form is cheaper
    cols = [c[:, s : s + block] for s in range(0, c.shape[1], block)]
    total = 0.0
    for i, ci in enumerate(cols):
        for j in range(i, len(cols)):
            total += (1.0 if i == j else 2.0) * float((ci.T @ cols[j]).double().square().sum())
    return total


def batched_unbiased_cka(fxs: list[torch.Tensor], fys: list[torch.Tensor], k: int | str = 10) -> np.ndarray:
    n = fxs[0].shape[0]
    M._need_n(n, 4, "unbiased CKA")
    stx = [M.unbiased_stats(f) for f in fxs]
    sty = [M.unbiased_stats(f) for f in fys]
    sx = [M.hsic_unbiased_from(M.frob2_cross(f, f), s, s, n) for f, s in zip(fxs, stx)]
    sy = [M.hsic_unbiased_from(M.frob2_cross(f, f), s, s, n) for f, s in zip(fys, sty)]
    cross = _cross_frob2(fxs, fys)
    hs = np.empty_like(cross)
    for a in range(len(fxs)):
        for b in range(len(fys)):
            hs[a, b] = M.hsic_unbiased_from(float(cross[a, b]), stx[a], sty[b], n)
    return _ratios(hs, sx, sy)


def batched_rbf_cka(fxs: list[torch.Tensor], fys: list[torch.Tensor], k: int | str = 10) -> np.ndarray:
    M._need_n(fxs[0].shape[0], 2, "RBF CKA")
    ly = [M.rbf_centred_kernel(f, None) for f in fys]
    sy = [float(lc.square().sum()) for lc in ly]
    out = np.empty((len(fxs), len(fys)))
    for a, f in enumerate(fxs):
        kc = M.rbf_centred_kernel(f, None)
        sx = float(kc.square().sum())
        for b, lc in enumerate(ly):
            out[a, b] = M._ratio(float((kc * lc).sum()), sx, sy[b])
        del kc
    return out
