"""Alignment metrics on paired features: how alike two representations of the same items are.

Every metric takes paired features ``x`` [n, dx] and ``y`` [n, dy] (torch tensors or numpy
arrays; row i of x and row i of y describe the same item) and returns a float. The definitions
follow the Platonic Representation Hypothesis code (Huh et al. 2024, github minyoungg/platonic-rep,
``metrics.py``, class ``AlignmentMetrics``; ``measure_alignment.py`` L2-normalises the features
before every metric):

* features are optionally standardised per dimension (zero mean, unit variance over the n rows;
  constant dimensions are only centred), then L2-normalised per row (an all-zero row stays zero);
* nearest neighbours use the inner product of the normalised features (cosine similarity) and
  exclude the item itself;
* ``mutual_knn``: mean over rows i of |N_k^x(i) & N_k^y(i)| / k;
* ``cycle_knn``: for row i, take its k neighbours j in y, then the k neighbours of each j in x;
  the row scores 1 if i is among those k*k items (the cycle x -> y -> x returns home), else 0;
  mean over rows (platonic-rep ``knn_A[knn_B]`` with A = x, B = y);
* ``linear_cka``: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, L = Y Y^T and the
  biased HSIC tr(K H L H), H = I - 11^T/n (the 1/(n-1)^2 factor cancels);
* ``unbiased_cka``: the same ratio with the unbiased HSIC estimator of Song et al. (2012, eq. 5):
  with K~, L~ the kernels with zeroed diagonals,
  [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)); needs n >= 4;
* ``cknna``: CKA restricted to mutual neighbour pairs: with the 0/1 mask M_ij = 1 when j is
  among the k nearest neighbours of i in both x and y (self excluded),
  HSIC_u(M*K, M*L) / sqrt(HSIC_u(M_x*K, M_x*K) HSIC_u(M_y*L, M_y*L)), M_x and M_y each space's own
  neighbour mask and HSIC_u the unbiased estimator above (platonic-rep's default
  ``unbiased=True``); needs k >= 2;
* ``rbf_cka``: biased CKA with Gaussian kernels exp(-|a-b|^2 / (2 sigma^2)) on the normalised
  features. ``sigma=None`` takes, for each space separately, the median Euclidean distance
  between distinct normalised rows (the median heuristic; platonic-rep fixes sigma = 1).

Differences from platonic-rep, on purpose: no ``+1e-6`` in the CKA denominators (a ratio whose
denominator is zero or negative, e.g. constant features, scores 0.0, which is what their epsilon
gives); their outlier clipping (``remove_outliers``, a quantile clamp applied before the metrics
in ``measure_alignment.py``) is not applied here; linear and unbiased CKA are computed in feature
space (||X^T H Y||_F^2 instead of tr(K H L H), identical in exact arithmetic) when that is cheaper.
CKA-family sums run in float64; neighbour search runs in float32.

Every metric is registered in `METRICS` with its all-layer-pairs form (``batched``, used by
`anybind.assess.layers.layer_pair_scores`); a metric registered without one is scored there
pair by pair with its own function::

    @register_metric("my_cka", batched="mypkg.cka:all_layer_pairs")   # or batched=None
    def my_cka(x, y, standardize=False) -> float: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from anybind.errors import AnybindError
from anybind.registry import Entry, Registry, signature_options

_KNN_RULES = ("sqrt", "sturges", "rice")
_KNN_CHUNK = 1024  # rows of the Gram matrix held at once during neighbour search


# ----------------------------------------------------------------------------- inputs


def knn_k(n: int, k: int | str = 10) -> int:
    """The number of neighbours for n items: k itself, or a rule.

    Rules: ``"sqrt"`` round(sqrt(n)), ``"sturges"`` ceil(log2(n)) + 1, ``"rice"`` ceil(2 n^(1/3)).
    Raises AnybindError if k is not a positive int or a known rule, or if n < k + 1 (every item
    needs k neighbours other than itself).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise AnybindError(f"the number of items must be a positive integer, got {n!r}")
    n = int(n)
    if isinstance(k, str):
        rule = k.strip().lower()
        if rule == "sqrt":
            kk = max(1, round(math.sqrt(n)))
        elif rule == "sturges":
            kk = math.ceil(math.log2(n)) + 1
        elif rule == "rice":
            kk = math.ceil(2 * n ** (1 / 3) - 1e-9)  # n = 27 gives 6, not 7
        else:
            raise AnybindError(
                f"unknown k rule {k!r}: give a positive integer or one of {', '.join(_KNN_RULES)}"
            )
    elif isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise AnybindError(
            f"k must be a positive integer or one of {', '.join(_KNN_RULES)}, got {k!r}"
        )
    else:
        kk = int(k)
    if n < kk + 1:
        raise AnybindError(
            f"k = {kk} neighbours need at least {kk + 1} paired items, got {n}: "
            "use a smaller k or more pairs"
        )
    return kk


def _as_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach().to("cpu")
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except (TypeError, ValueError) as e:
            raise AnybindError(f"{name} must be a 2-D array of numbers: {e}") from e
    if t.ndim != 2:
        raise AnybindError(
            f"{name} must be 2-D [items, features], got shape {tuple(t.shape)}: "
            "pool or flatten token features first"
        )
    if not (
        t.is_floating_point()
        or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)
    ):
        raise AnybindError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise AnybindError(f"{name} is empty (shape {tuple(t.shape)}): give at least a few pairs")
    # one summing pass first (NaN or inf make the sum non-finite); the exact check only if it is
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise AnybindError(f"{name} contains NaN or infinite values: check the extracted features")
    return t


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise AnybindError(
            f"x and y must be paired row by row, but x has {x.shape[0]} rows and y has "
            f"{y.shape[0]}: pass features of the same items in the same order"
        )


def prepare(a: Any, standardize: bool = False, name: str = "x") -> torch.Tensor:
    """Float64 copy of ``a``: optionally standardised per dimension, then L2-normalised per row."""
    t = _as_tensor(a, name)
    if standardize:
        t = t - t.mean(dim=0, keepdim=True)
        std = t.std(dim=0, keepdim=True) if t.shape[0] > 1 else torch.ones_like(t[:1])
        t = t / torch.where(std > 0, std, torch.ones_like(std))
    return torch.nn.functional.normalize(t, p=2.0, dim=1, eps=1e-12)


def _ratio(kl: float, kk: float, ll: float) -> float:
    den = kk * ll
    if not (den > 0) or not math.isfinite(den):
        return 0.0
    return float(kl / math.sqrt(den))


# ----------------------------------------------------------------------------- neighbours


def nearest_neighbors(f: torch.Tensor, k: int, chunk: int = _KNN_CHUNK) -> torch.Tensor:
    """[n, k] indices of each row's k most similar other rows (inner product, self excluded).

    ``f`` is already normalised. The Gram matrix is symmetric, so only its upper block tiles are
    computed (float32): each tile [rows s:e, columns s:n] updates the running top-k of its rows
    and, through its transpose, of its columns. That is about half the multiply-adds of the full
    matrix, memory stays O(chunk * n), and order within a row is by decreasing similarity.
    """
    n = f.shape[0]
    f32 = f.to(torch.float32)
    best_v = torch.full((n, k), -math.inf)
    best_i = torch.zeros(n, k, dtype=torch.int64)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        tile = f32[s:e] @ f32[s:].T  # rows s:e against columns s:n
        rows = torch.arange(e - s)
        tile[rows, rows] = -math.inf
        _merge_top(best_v, best_i, slice(s, e), tile, s, k)
        if e < n:  # the same similarities seen from the later rows (columns e:n)
            _merge_top(best_v, best_i, slice(e, n), tile[:, e - s :].T, s, k)
    return best_i  # every merge keeps its rows sorted (topk's order)


def _merge_top(best_v: torch.Tensor, best_i: torch.Tensor, rows: slice, sims: torch.Tensor,
               offset: int, k: int) -> None:
    """Fold the top-k of ``sims`` (its column c is item offset + c) into rows' running top-k."""
    v, i = torch.topk(sims, min(k, sims.shape[1]), dim=1)
    v = torch.cat([best_v[rows], v], dim=1)
    i = torch.cat([best_i[rows], i + offset], dim=1)
    top = torch.topk(v, k, dim=1).indices
    best_v[rows] = v.gather(1, top)
    best_i[rows] = i.gather(1, top)


def knn_overlap(nx: torch.Tensor, ny: torch.Tensor) -> torch.Tensor:
    """Per-row |N_x(i) & N_y(i)| for stacks of neighbour lists.

    nx [A, n, k], ny [B, n, k] -> [A, B, n] counts (indices within a row are distinct, so the number
    of equal (p, q) position pairs is the size of the intersection). Rows are processed in blocks to
    bound memory to about 2^24 comparisons per block.
    """
    a, n, k = nx.shape
    b = ny.shape[0]
    out = torch.empty(a, b, n, dtype=torch.int64)
    step = max(1, (1 << 24) // max(1, a * b * k * k))
    for s in range(0, n, step):
        e = min(n, s + step)
        eq = nx[:, None, s:e, :, None] == ny[None, :, s:e, None, :]
        out[:, :, s:e] = eq.sum(dim=(-1, -2))
    return out


def cycle_hits(nx: torch.Tensor, ny: torch.Tensor) -> torch.Tensor:
    """Per-row cycle x -> y -> x success for stacks: nx [A, n, k], ny [B, n, k] -> [A, B, n] bool.

    Row i succeeds for the pair (a, b) when i is among the x-neighbours (layer a) of any of its
    y-neighbours (layer b): platonic-rep's ``knn_A[knn_B]`` then ``== i``.
    """
    a, n, k = nx.shape
    b = ny.shape[0]
    out = torch.empty(a, b, n, dtype=torch.bool)
    ids = torch.arange(n)
    for j in range(b):
        hops = nx[:, ny[j]]  # [A, n, k (y-neighbour), k (its x-neighbours)]
        out[:, j] = (hops == ids[None, :, None, None]).flatten(2).any(dim=2)
    return out


# ----------------------------------------------------------------------------- HSIC pieces


def hsic_unbiased_sums(tr, sum_k, sum_l, dot, n: int):
    """Song et al. (2012) unbiased HSIC from its four sums (works elementwise on tensors):
    [tr + sum_k sum_l / ((n-1)(n-2)) - 2 dot / (n-2)] / (n(n-3)), with tr = sum(K~ * L~^T),
    sum_k = sum(K~), sum_l = sum(L~), dot = sum(K~ L~) = (1^T K~)(L~ 1); K~, L~ zero-diagonal."""
    return (tr + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 * dot / (n - 2)) / (n * (n - 3))


def hsic_unbiased_dense(kmat: torch.Tensor, lmat: torch.Tensor) -> float:
    """Song et al. (2012) unbiased HSIC of two n x n matrices (need not be symmetric), n >= 4.

    As platonic-rep's ``hsic_unbiased``: zero the diagonals, then `hsic_unbiased_sums` of
    sum(K~ * L~^T), sum(K~), sum(L~) and sum(K~ @ L~).
    """
    kt = kmat.clone()
    lt = lmat.clone()
    kt.fill_diagonal_(0)
    lt.fill_diagonal_(0)
    dot = kt.sum(dim=0) @ lt.sum(dim=1)  # sum(K~ L~) = (1^T K~)(L~ 1)
    return float(hsic_unbiased_sums((kt * lt.T).sum(), kt.sum(), lt.sum(), dot, kmat.shape[0]))


def centred(f: torch.Tensor) -> torch.Tensor:
    return f - f.mean(dim=0, keepdim=True)


def frob2_cross(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a^T b||_F^2, i.e. sum(K * L) for K = a a^T, L = b b^T, in the cheaper of the two forms."""
    n = a.shape[0]
    if a.shape[1] * b.shape[1] <= n * n:
        return float((a.T @ b).square().sum())
    return float(((a @ a.T) * (b @ b.T)).sum())


def unbiased_stats(f: torch.Tensor) -> dict[str, Any]:
    """Per-space pieces of the feature-space unbiased HSIC (K = f f^T, K~ = K - diag(K)).

    d = diag(K); s = sum(K~) = |f^T 1|^2 - sum(d); r = K~ 1 = f (f^T 1) - d.
    """
    d = f.square().sum(dim=1)
    colsum = f.sum(dim=0)
    return {"f": f, "d": d, "s": float(colsum.square().sum() - d.sum()), "r": f @ colsum - d}


def hsic_unbiased_from(cross: float, a: dict[str, Any], b: dict[str, Any], n: int) -> float:
    """Unbiased HSIC from ``cross`` = sum(K * L) = ||f_a^T f_b||_F^2 and the per-space stats.

    tr(K~ L~) = sum(K * L) - d_a . d_b (K, L symmetric); sum(K~ L~) = r_a . r_b.
    """
    tr = cross - float(a["d"] @ b["d"])
    return hsic_unbiased_sums(tr, a["s"], b["s"], float(a["r"] @ b["r"]), n)


def rbf_sigma(f: torch.Tensor) -> float:
    """Median Euclidean distance between distinct rows of ``f`` (1.0 if that median is 0)."""
    n = f.shape[0]
    dist = torch.cdist(f, f)
    iu = torch.triu_indices(n, n, offset=1)
    med = float(dist[iu[0], iu[1]].median()) if n > 1 else 0.0
    return med if med > 0 else 1.0


def rbf_centred_kernel(f: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """H K H for K = exp(-|a-b|^2 / (2 sigma^2)) on the rows of f (float64, n x n)."""
    s = rbf_sigma(f) if sigma is None else float(sigma)
    if not (s > 0) or not math.isfinite(s):
        raise AnybindError(f"sigma must be a positive number or None, got {sigma!r}")
    sq = f.square().sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2 * (f @ f.T)).clamp_min(0)
    kmat = torch.exp(-d2 / (2 * s * s))
    kmat = kmat - kmat.mean(dim=0, keepdim=True)
    return kmat - kmat.mean(dim=1, keepdim=True)


def cknna_similarity(
    kmat: torch.Tensor, lmat: torch.Tensor, nk: torch.Tensor, nl: torch.Tensor
) -> float:
    """Unbiased HSIC of the two kernels masked to pairs that are neighbours in both lists."""
    n = kmat.shape[0]
    rows = torch.arange(n)[:, None]
    mk = torch.zeros(n, n, dtype=kmat.dtype)
    mk[rows, nk] = 1.0
    if nl is nk:
        mask = mk
    else:
        ml = torch.zeros(n, n, dtype=kmat.dtype)
        ml[rows, nl] = 1.0
        mask = mk * ml
    return hsic_unbiased_dense(mask * kmat, mask * lmat)


# ----------------------------------------------------------------------------- the registry

#: Alignment metrics by name: each entry is the pairwise function ``f(x, y, [k=...,]
#: standardize=...) -> float`` (it takes ``k`` when it has that parameter), and its meta
#: ``batched`` is the all-layer-pairs form ``batched(fxs, fys, k) -> [len(fxs), len(fys)]`` on
#: prepared layers (see `prepare`), a lazy ``"module:function"``, or None (score pair by pair).
METRICS = Registry("metric")

#: The signature of a batched all-layer-pairs form.
BatchedForm = Callable[[list[torch.Tensor], list[torch.Tensor], "int | str"], np.ndarray]


def register_metric(
    name: str,
    pairwise: Callable[..., float] | None = None,
    *,
    batched: BatchedForm | str | None = None,
    help: str = "",
    replace: bool = False,
):
    """Register an alignment metric and its all-layer-pairs form; a decorator without `pairwise`.

    `batched` receives every layer of each side, prepared once (standardised if asked, then
    L2-normalised, float64 tensors [n, d]) and `k`, and returns the score matrix equal to the
    pairwise function on every layer pair. Without it the layer pairs are scored one by one.
    """

    def add(fn: Callable[..., float]) -> Callable[..., float]:
        return METRICS.register(name, fn, help=help, replace=replace, batched=batched)

    return add if pairwise is None else add(pairwise)


def check_metric(metric: str) -> str:
    """`metric` if it is registered (else an error with a did-you-mean and the list)."""
    METRICS.entry(metric)
    return metric


def batched_form(metric: str) -> BatchedForm | None:
    """The metric's all-layer-pairs form (imported on first use), or None."""
    entry = METRICS.entry(metric)
    form = entry.meta.get("batched")
    if isinstance(form, str):  # a lazy "module:function"
        form = entry.meta["batched"] = Entry(metric, form).resolve()
    return form


def score(metric: str, x: Any, y: Any, k: int | str = 10, standardize: bool = False) -> float:
    """Score x against y with the metric named ``metric`` (k goes to the metrics that take it)."""
    fn = METRICS.get(metric)
    options: dict[str, Any] = {"standardize": standardize}
    if "k" in signature_options(fn):
        options["k"] = k
    return fn(x, y, **options)


# ----------------------------------------------------------------------------- metrics


def _pair(x: Any, y: Any, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fx = prepare(x, standardize, "x")
    fy = prepare(y, standardize, "y")
    _check_pair(fx, fy)
    return fx, fy


def _need_n(n: int, m: int, what: str) -> None:
    if n < m:
        raise AnybindError(f"{what} needs at least {m} paired items, got {n}: give more pairs")


@register_metric("mutual_knn", batched="anybind.assess.layers:batched_mutual_knn")
def mutual_knn(x: Any, y: Any, k: int | str = 10, standardize: bool = False) -> float:
    """Mean over rows of |N_k^x(i) & N_k^y(i)| / k; 1 for identical spaces, ~k/(n-1) by chance."""
    fx, fy = _pair(x, y, standardize)
    kk = knn_k(fx.shape[0], k)
    ov = knn_overlap(nearest_neighbors(fx, kk)[None], nearest_neighbors(fy, kk)[None])
    return float(ov[0, 0].double().mean() / kk)


@register_metric("cycle_knn", batched="anybind.assess.layers:batched_cycle_knn")
def cycle_knn(x: Any, y: Any, k: int | str = 10, standardize: bool = False) -> float:
    """Fraction of rows i found again among the x-neighbours of i's y-neighbours."""
    fx, fy = _pair(x, y, standardize)
    kk = knn_k(fx.shape[0], k)
    hits = cycle_hits(nearest_neighbors(fx, kk)[None], nearest_neighbors(fy, kk)[None])
    return float(hits[0, 0].double().mean())


@register_metric("linear_cka", batched="anybind.assess.layers:batched_linear_cka")
def linear_cka(x: Any, y: Any, standardize: bool = False) -> float:
    """Linear CKA (biased HSIC) of the normalised features."""
    fx, fy = _pair(x, y, standardize)
    _need_n(fx.shape[0], 2, "linear CKA")
    cx, cy = centred(fx), centred(fy)
    return _ratio(frob2_cross(cx, cy), frob2_cross(cx, cx), frob2_cross(cy, cy))


@register_metric("unbiased_cka", batched="anybind.assess.layers:batched_unbiased_cka")
def unbiased_cka(x: Any, y: Any, standardize: bool = False) -> float:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012); needs n >= 4."""
    fx, fy = _pair(x, y, standardize)
    n = fx.shape[0]
    _need_n(n, 4, "unbiased CKA")
    a, b = unbiased_stats(fx), unbiased_stats(fy)
    return _ratio(
        hsic_unbiased_from(frob2_cross(fx, fy), a, b, n),
        hsic_unbiased_from(frob2_cross(fx, fx), a, a, n),
        hsic_unbiased_from(frob2_cross(fy, fy), b, b, n),
    )


@register_metric("cknna", batched="anybind.assess.cknna:batched_cknna")
def cknna(x: Any, y: Any, k: int | str = 10, standardize: bool = False) -> float:
    """CKA restricted to mutual k-nearest-neighbour pairs (platonic-rep, unbiased HSIC)."""
    fx, fy = _pair(x, y, standardize)
    n = fx.shape[0]
    kk = knn_k(n, k)
    if kk < 2:
        raise AnybindError("CKNNA needs k >= 2 (as platonic-rep): use a larger k")
    _need_n(n, 4, "CKNNA")
    nx, ny = nearest_neighbors(fx, kk), nearest_neighbors(fy, kk)
    kmat, lmat = fx @ fx.T, fy @ fy.T
    return _ratio(
        cknna_similarity(kmat, lmat, nx, ny),
        cknna_similarity(kmat, kmat, nx, nx),
        cknna_similarity(lmat, lmat, ny, ny),
    )


@register_metric("rbf_cka", batched="anybind.assess.layers:batched_rbf_cka")
def rbf_cka(x: Any, y: Any, sigma: float | None = None, standardize: bool = False) -> float:
    """CKA (biased HSIC) with Gaussian kernels; sigma None = per-space median distance."""
    fx, fy = _pair(x, y, standardize)
    _need_n(fx.shape[0], 2, "RBF CKA")
    kc, lc = rbf_centred_kernel(fx, sigma), rbf_centred_kernel(fy, sigma)
    return _ratio(float((kc * lc).sum()), float(kc.square().sum()), float(lc.square().sum()))
