"""Train/test leakage check: the share of test items with a near-duplicate in train.

A test item is *leaked* when its highest cosine similarity to any train item is strictly greater
than ``threshold`` (default 0.9). Retrieval and zero-shot figures on a split where many test items
have such a twin in train are inflated: the model is partly recalling, not generalising. The fix
is upstream: group near-duplicates in the dataset index so a group stays on one side of a split.

Computed in blocks of ``chunk_size x chunk_size`` cosine scores, keeping per test item only its
running maximum, so memory is O(chunk_size^2 + Ns) whatever the sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import integer, number
from ..errors import AnybindError

ArrayLike = Any  # numpy array or torch tensor


def near_duplicate_share(
    train_emb: ArrayLike,
    test_emb: ArrayLike,
    threshold: float = 0.9,
    chunk_size: int = 4096,
) -> dict[str, Any]:
    """How many test items have a near-duplicate (cosine > `threshold`) in train.

    `train_emb` is [Nt, D], `test_emb` [Ns, D] (numpy or torch; they need not be normalised:
    rows are L2-normalised here, and an all-zero row has cosine 0 to everything). The comparison
    is strict: a cosine exactly equal to `threshold` does not count.

    Returns a dict:

    - ``share``: fraction of test items whose max cosine to train is > `threshold`;
    - ``count``: how many such test items; ``n_test``, ``n_train``; ``threshold``;
    - ``max_cosine``: numpy float32 [Ns], each test item's highest cosine to any train item
      (for histograms);
    - ``nearest_train``: numpy int64 [Ns], the train row reaching it (to inspect the pairs).
    """
    train = _as_matrix("train_emb", train_emb)
    test = _as_matrix("test_emb", test_emb)
    if train.shape[1] != test.shape[1]:
        raise AnybindError(
            f"train_emb and test_emb must have the same width, got {train.shape[1]} and "
            f"{test.shape[1]}: embed both sides with the same model (and the same projection)"
        )
    # float() first: numpy scalars are welcome; the threshold is a cosine
    threshold = number("threshold (a cosine)", float(threshold), minimum=-1.0, maximum=1.0,
                       error=AnybindError)
    integer("chunk_size", chunk_size, minimum=1, error=AnybindError)

    n_test, n_train = test.shape[0], train.shape[0]
    best = torch.full((n_test,), float("-inf"), dtype=torch.float32)
    arg = torch.zeros(n_test, dtype=torch.int64)
    for i in range(0, n_test, chunk_size):
        q = F.normalize(test[i : i + chunk_size].float(), dim=1)
        q_best = torch.full((q.shape[0],), float("-inf"), dtype=torch.float32)
        q_arg = torch.zeros(q.shape[0], dtype=torch.int64)
        for j in range(0, n_train, chunk_size):
            g = F.normalize(train[j : j + chunk_size].float(), dim=1)
            s_max, s_arg = (q @ g.T).max(dim=1)
            better = s_max > q_best  # strict: the first train row reaching the max is kept
            q_best = torch.where(better, s_max, q_best)
            q_arg = torch.where(better, s_arg + j, q_arg)
        best[i : i + q.shape[0]] = q_best
        arg[i : i + q.shape[0]] = q_arg
    # Rounding can push the cosine of identical rows a hair above 1; a cosine is at most 1.
    best = best.clamp(-1.0, 1.0)
    count = int((best.double() > threshold).sum())  # in float64: the threshold as given
    return {
        "share": count / n_test,
        "count": count,
        "n_test": n_test,
        "n_train": n_train,
        "threshold": threshold,
        "max_cosine": best.numpy(),
        "nearest_train": arg.numpy(),
    }


def leakage_warning(result: dict[str, Any], limit: float = 0.05) -> str | None:
    """A warning text when ``result["share"]`` (from `near_duplicate_share`) exceeds `limit`.

    Returns None when the share is at most `limit`, else e.g.:
    ``"12.3% of test items (123 of 1000) have a near-duplicate (cosine > 0.90) in train:
    retrieval figures are inflated; group near-duplicates in the dataset index"``.
    """
    try:
        share = float(result["share"])
        threshold = float(result["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise AnybindError(
            "leakage_warning needs the dict returned by near_duplicate_share "
            f"(with 'share' and 'threshold'): {e!r}"
        ) from e
    limit = number("limit (a share)", float(limit), minimum=0.0, maximum=1.0, error=AnybindError)
    if share <= limit:
        return None
    counts = ""
    if "count" in result and "n_test" in result:
        counts = f" ({int(result['count'])} of {int(result['n_test'])})"
    return (
        f"{share * 100:.1f}% of test items{counts} have a near-duplicate "
        f"(cosine > {threshold:.2f}) in train: retrieval figures are inflated; "
        "group near-duplicates in the dataset index"
    )


def _as_matrix(name: str, x: ArrayLike) -> Tensor:
    t = x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise AnybindError(
            f"{name} must be a 2-D float array [N, D], got shape {tuple(t.shape)} of {t.dtype}"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise AnybindError(f"{name} is empty (shape {tuple(t.shape)}): it needs rows to compare")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise AnybindError(
            f"{name} contains NaN or infinite values: re-extract those features "
            "(a failed encoder run or a corrupt cache)"
        )
    return t
