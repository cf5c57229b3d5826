"""Cross-validation splits from the dataset index's group folds.

A single ~1k test split cannot separate methods two points apart, so evaluation repeats over
the index's 5 group folds. For fold ``f``:

- test  = the items of fold ``f``;
- val   = half of the groups of fold ``f + 1`` (by a stable group hash): early stopping and
  tuning read only this, never the test fold;
- train = everything else.

Near-duplicates share a group and groups never straddle folds, so no test item has its twin in
train. Groups holding more than `max_group_share` of the items (the star set, the big icon
themes) always go to train, by the same rule the listers use for the fixed split: in a test fold
they would be most of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .groups import oversized_groups
from .index import NUM_FOLDS, _unit_hash

MAX_GROUP_SHARE = 0.025


def fold_splits(
    groups: Sequence[str],
    folds: Sequence[int],
    fold: int,
    num_folds: int = NUM_FOLDS,
    max_group_share: float = MAX_GROUP_SHARE,
) -> np.ndarray:
    """"train" / "val" / "test" per item for cross-validation fold `fold` (see the module doc).

    >>> fold_splits(["a", "b", "c"], [0, 1, 2], fold=0).tolist()[0]
    'test'
    """
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1}, not {fold}")
    groups = [str(g) for g in groups]
    folds = np.asarray(folds, dtype=np.int64)
    if len(folds) != len(groups):
        raise ValueError(f"{len(groups)} groups but {len(folds)} folds")
    train_only = oversized_groups(groups, max_group_share)
    val_fold = (fold + 1) % num_folds
    out = np.full(len(groups), "train", dtype=object)
    half: dict[str, bool] = {}
    for i, (g, f) in enumerate(zip(groups, folds, strict=True)):
        if g in train_only:
            continue
        if f == fold:
            out[i] = "test"
        elif f == val_fold:
            if g not in half:
                half[g] = _unit_hash(g, "cv-val") < 0.5
            if half[g]:
                out[i] = "val"
    return out.astype(str)
