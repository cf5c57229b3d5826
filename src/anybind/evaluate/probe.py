"""Linear probe: multinomial logistic regression on fixed features, fitted in torch.

How much of what an encoder knows is linearly readable from its features (frozen encoder
features, or the same after a projection): fit a softmax classifier on train features, report
accuracy on test features.

The model, as fitted by `fit_linear_probe`:

- features are standardised with the train mean and standard deviation (``standardize=True``;
  a constant feature gets sd 1), which are part of the model and applied again at prediction;
- loss: mean cross-entropy over the train rows + ``weight_decay / 2 * ||W||^2`` (the bias is not
  penalised). This `weight_decay` is per-sample: it equals scikit-learn's ``C = 1 / (weight_decay
  * N)``;
- full-batch L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search) from zero weights, float32
  on CPU. No randomness is involved, so the same inputs give the same probe (`seed` is recorded
  and seeds torch for the duration of the fit, for safety).
- L2 strength: with a validation set, every value of `weight_decays` is fitted on train and the
  one with the highest validation top-1 wins (ties go to the larger value, the simpler model);
  the returned probe is that train-only fit, so validation rows are only ever used for the choice
  (CLIP_benchmark-style selection; CLIP_benchmark then refits on train+val: pass the concatenation
  as train with a fixed `weight_decay` if you want that). Without a validation set, `weight_decay`
  (default 1e-4) is used as is.

Memory: one standardised float32 copy of the train features (N x D x 4 bytes: 100k x 1280 is
about 0.5 GB) plus O(N x C) logits and gradients and an L-BFGS history of 10 x D x C; full batch
is fine at that size. Prediction runs in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import integer, number
from ..errors import AnybindError

ArrayLike = Any  # numpy array or torch tensor

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_WEIGHT_DECAY = 1e-4
_PREDICT_CHUNK = 65536


@dataclass
class LinearProbe:
    """A fitted linear probe: ``scores = ((x - mean) / std) @ weight + bias``.

    `mean` and `std` are the train standardisation statistics ([D]; zeros and ones when
    ``standardize=False``); `weight` is [D, C], `bias` [C]. `class_counts` [C] are the train label
    counts (for the majority-class baseline). `search` lists, per weight decay tried, its
    validation top-1 (empty without a validation set).
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    class_counts: Tensor
    weight_decay: float
    n_iter: int
    standardize: bool
    max_iter: int
    seed: int
    final_loss: float
    search: list[dict[str, float]] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.weight.shape[0])

    def predict_scores(self, x: ArrayLike) -> Tensor:
        """Class scores (logits) [n, C], float32, for features `x` [n, D]."""
        xt = _as_features("x", x, n_features=self.n_features)
        out = [
            ((xt[i : i + _PREDICT_CHUNK] - self.mean) / self.std) @ self.weight + self.bias
            for i in range(0, xt.shape[0], _PREDICT_CHUNK)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.n_classes)

    def predict(self, x: ArrayLike) -> Tensor:
        """Predicted class index [n] (int64); ties go to the lower index."""
        return self.predict_scores(x).argmax(dim=1)

    def config(self) -> dict[str, Any]:
        """The hyperparameters and fit facts, JSON-safe (the tensors are the fields)."""
        return {
            "model": "multinomial logistic regression (linear probe)",
            "weight_decay": self.weight_decay,
            "n_iter": self.n_iter,
            "max_iter": self.max_iter,
            "converged": self.n_iter < self.max_iter,
            "final_loss": self.final_loss,
            "standardize": self.standardize,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "n_train": int(self.class_counts.sum()),
            "seed": self.seed,
            "search": [dict(s) for s in self.search],
        }


def fit_linear_probe(
    x_train: ArrayLike,
    y_train: ArrayLike,
    x_val: ArrayLike | None = None,
    y_val: ArrayLike | None = None,
    *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    weight_decay: float | None = None,
    n_classes: int | None = None,
    max_iter: int = 300,
    standardize: bool = True,
    seed: int = 0,
) -> LinearProbe:
    """Fit a multinomial logistic-regression probe (see the module docstring for the model).

    `x_train` [N, D] float features, `y_train` [N] integer labels in ``0..n_classes-1``
    (`n_classes` defaults to ``max(label) + 1``). With `x_val`/`y_val`, the L2 strength is
    chosen from `weight_decays` on validation top-1; otherwise `weight_decay` (default 1e-4) is
    used. Passing `weight_decay` explicitly skips the search even with a validation set.
    `max_iter` bounds the L-BFGS iterations per fit.
    """
    x = _as_features("x_train", x_train)
    integer("max_iter", max_iter, minimum=1, error=AnybindError)
    y = _as_labels("y_train", y_train, n_rows=x.shape[0], x_name="x_train")
    n_classes = _checked_classes(y, n_classes)
    if (x_val is None) != (y_val is None):
        raise AnybindError("give both x_val and y_val, or neither")
    grid = _decay_grid(weight_decay, weight_decays, has_val=x_val is not None)
    if weight_decay is not None:
        x_val = y_val = None  # nothing to choose
    mean, std = _standardisation(x, standardize)
    xs = (x - mean) / std  # a copy: the caller's array is never modified
    val = None
    if x_val is not None:
        xv = (_as_features("x_val", x_val, n_features=x.shape[1]) - mean) / std
        yv = _as_labels("y_val", y_val, n_rows=xv.shape[0], x_name="x_val")
        _check_range("y_val", yv, n_classes)
        val = (xv, yv)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wd, fit, search = _choose_decay(xs, y, n_classes, grid, max_iter, val)
    return LinearProbe(
        weight=fit["weight"],
        bias=fit["bias"],
        mean=mean,
        std=std,
        class_counts=torch.bincount(y, minlength=n_classes),
        weight_decay=wd,
        n_iter=fit["n_iter"],
        standardize=standardize,
        max_iter=max_iter,
        seed=seed,
        final_loss=fit["loss"],
        search=search,
    )


def probe_metrics(probe: LinearProbe, x_test: ArrayLike, y_test: ArrayLike) -> dict[str, Any]:
    """Test metrics of a probe, with the majority-class baseline and chance beside them.

    ``top1``: accuracy. ``mean_per_class_recall``: balanced accuracy, the mean over the classes
    present in `y_test` of their recall. ``majority_top1`` / ``majority_mean_per_class_recall``:
    the same for always predicting the most frequent train class. ``chance_top1``: 1 / C. ``n``:
    test rows. ``n_classes``.
    """
    if not isinstance(probe, LinearProbe):
        raise AnybindError(f"probe must be a LinearProbe from fit_linear_probe, got {type(probe)}")
    x = _as_features("x_test", x_test, n_features=probe.n_features)
    y = _as_labels("y_test", y_test, n_rows=x.shape[0], x_name="x_test")
    _check_range("y_test", y, probe.n_classes)
    pred = probe.predict(x)
    majority = torch.full_like(y, int(probe.class_counts.argmax()))
    return {
        "top1": float((pred == y).double().mean()),
        "mean_per_class_recall": mean_per_class_recall(y, pred),
        "majority_top1": float((majority == y).double().mean()),
        "majority_mean_per_class_recall": mean_per_class_recall(y, majority),
        "chance_top1": 1.0 / probe.n_classes,
        "n": int(y.shape[0]),
        "n_classes": probe.n_classes,
    }


def mean_per_class_recall(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Balanced accuracy: the mean over classes present in `y_true` of the share predicted right."""
    yt = _as_labels("y_true", y_true)
    yp = _as_labels("y_pred", y_pred, n_rows=yt.shape[0], x_name="y_true")
    classes = torch.unique(yt)
    recalls = [float((yp[yt == c] == c).double().mean()) for c in classes]
    return float(np.mean(recalls))


def _checked_classes(y: Tensor, n_classes: int | None) -> int:
    """The number of classes (given, or max label + 1), with train holding at least two."""
    if n_classes is None:
        n_classes = int(y.max()) + 1
    else:
        integer("n_classes", n_classes, minimum=2, error=AnybindError)
    _check_range("y_train", y, n_classes)
    if int(torch.unique(y).numel()) < 2:
        raise AnybindError(
            f"y_train has a single class ({int(y[0])}): a probe needs at least two classes in "
            "train; check the split (a group split can put a whole class on one side)"
        )
    return n_classes


def _decay_grid(weight_decay: float | None, weight_decays: Sequence[float], has_val: bool) -> list[float]:
    """The L2 strengths to fit: the one given, the default without validation, or the grid (ascending)."""
    if weight_decay is not None:
        return [_check_decay(weight_decay)]
    if not has_val:
        return [DEFAULT_WEIGHT_DECAY]
    grid = sorted({_check_decay(w) for w in weight_decays})
    if not grid:
        raise AnybindError("weight_decays is empty: give at least one L2 strength to try")
    return grid


def _standardisation(x: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    """Train mean and sd per feature (a constant feature gets sd 1), or 0 and 1 when off."""
    if not standardize:
        return torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    std = x.std(dim=0, unbiased=False)
    return x.mean(dim=0), torch.where(std > 1e-12, std, torch.ones_like(std))


def _choose_decay(xs: Tensor, y: Tensor, n_classes: int, grid: list[float], max_iter: int,
                  val: tuple[Tensor, Tensor] | None) -> tuple[float, dict[str, Any], list[dict[str, float]]]:
    """Fit each L2 strength on train; keep the best validation top-1 (ties: the larger strength).

    Without validation, the grid's single value. Returns (strength, fit, search record).
    """
    if val is None:
        return grid[0], _lbfgs(xs, y, n_classes, grid[0], max_iter), []
    xv, yv = val
    best: tuple[float, float, dict[str, Any]] | None = None
    search: list[dict[str, float]] = []
    for wd in grid:
        fit = _lbfgs(xs, y, n_classes, wd, max_iter)
        acc = float(((xv @ fit["weight"] + fit["bias"]).argmax(dim=1) == yv).double().mean())
        search.append({"weight_decay": wd, "val_top1": acc, "n_iter": fit["n_iter"]})
        if best is None or acc >= best[0]:  # grid ascending: ties go to the larger decay
            best = (acc, wd, fit)
    assert best is not None
    return best[1], best[2], search


def _lbfgs(x: Tensor, y: Tensor, n_classes: int, wd: float, max_iter: int) -> dict[str, Any]:
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    onehot = F.one_hot(y, n_classes).to(x.dtype)
    n = x.shape[0]
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        # The gradient by hand, not autograd: softmax probabilities of confidently wrong classes
        # underflow to subnormal floats, which make the X^T G matmul ~15x slower on CPU; they
        # are flushed to zero here (below 1e-30 they change nothing).
        with torch.no_grad():
            logp = torch.log_softmax(x @ w + b, dim=1)
            loss = -logp.gather(1, y[:, None]).mean() + 0.5 * wd * (w * w).sum()
            p = logp.exp()
            g = (torch.where(p > 1e-30, p, torch.zeros_like(p)) - onehot) / n
            w.grad = x.T @ g + wd * w
            b.grad = g.sum(dim=0)
        return loss

    opt.step(closure)
    loss = float(closure())
    n_iter = int(opt.state[w].get("n_iter", 0))
    return {
        "weight": w.detach().clone(),
        "bias": b.detach().clone(),
        "n_iter": n_iter,
        "loss": loss,
    }


def _as_features(name: str, x: ArrayLike, n_features: int | None = None) -> Tensor:
    t = x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2 or t.dtype == torch.bool or t.is_complex():
        raise AnybindError(
            f"{name} must be a 2-D numeric array [N, D], got shape {tuple(t.shape)} of {t.dtype}"
        )
    t = t.float()
    if t.shape[0] == 0:
        raise AnybindError(f"{name} has no rows: the probe needs labelled examples")
    if n_features is not None and t.shape[1] != n_features:
        raise AnybindError(
            f"{name} has {t.shape[1]} features but the probe was fitted on {n_features}: "
            "use features from the same encoder layer (and projection) as for training"
        )
    if not bool(torch.isfinite(t).all()):
        rows = torch.nonzero(~torch.isfinite(t).all(dim=1)).flatten()[:5].tolist()
        raise AnybindError(
            f"{name} contains NaN or infinite values (rows {rows}...): re-extract those "
            "features or drop the rows"
        )
    return t


def _as_labels(
    name: str, y: ArrayLike, n_rows: int | None = None, x_name: str | None = None
) -> Tensor:
    t = y.detach().cpu() if isinstance(y, Tensor) else torch.as_tensor(np.asarray(y))
    if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise AnybindError(
            f"{name} must be a 1-D integer array of class indices, got shape {tuple(t.shape)} of "
            f"{t.dtype}: map other labels to 0..C-1 first (np.unique(labels, return_inverse=True))"
        )
    if n_rows is not None and t.shape[0] != n_rows:
        raise AnybindError(
            f"{name} has {t.shape[0]} labels but {x_name} has {n_rows} rows: one label per row"
        )
    if t.shape[0] == 0:
        raise AnybindError(f"{name} is empty")
    return t.long()


def _check_range(name: str, y: Tensor, n_classes: int) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        raise AnybindError(
            f"{name} has labels in [{lo}, {hi}] but classes are 0..{n_classes - 1}: labels must "
            "be class indices from 0 (pass n_classes=, or remap the labels)"
        )


def _check_decay(w: Any) -> float:
    try:
        v = float(w)  # numpy scalars and the like (np.logspace grids)
    except (TypeError, ValueError) as e:
        raise AnybindError(f"weight decay must be a number >= 0, got {w!r}") from e
    return number("weight decay", v, minimum=0, error=AnybindError)
