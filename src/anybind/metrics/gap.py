"""The modality gap of a shared space and how much it splits a mixed-modality index.

    modality_gap(z_image, z_text)                 # ||mean of normalised images - mean of normalised texts||
    own_modality_share(z_all, labels, k=10)       # per modality: share of a query's top-k from its own modality
    expected_own_share(labels)                    # the same share if modality did not matter
    null_gap(z_image, z_text)                     # the gap of paired rows if modality did not matter

The gap follows Liang et al. 2022 ("Mind the Gap", NeurIPS), section 4: embeddings are L2-normalised,
the gap vector is the difference of the two modalities' centroids, and the gap is its Euclidean norm
(0 when the centroids coincide, at most 2). Pure numpy functions on arrays: no model, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np

from ..errors import AnybindError


class GapError(AnybindError, ValueError):
    """Embeddings the gap or the own-modality share cannot be computed on."""


def _rows(emb, name: str) -> np.ndarray:
    arr = np.asarray(emb, dtype=np.float64)
    if arr.ndim != 2 or len(arr) == 0:
        raise GapError(f"{name} must be a non-empty [n, dim] array, not shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise GapError(f"{name} holds non-finite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise GapError(f"{name} holds an all-zero row, which has no direction")
    return arr / norms


def gap_vector(a, b) -> np.ndarray:
    """Centroid of `a`'s L2-normalised rows minus that of `b`'s (Liang et al. 2022's gap vector)."""
    a, b = _rows(a, "the first modality's embeddings"), _rows(b, "the second modality's embeddings")
    if a.shape[1] != b.shape[1]:
        raise GapError(f"the two modalities' embeddings have dims {a.shape[1]} and {b.shape[1]}: not one space")
    return a.mean(axis=0) - b.mean(axis=0)


def modality_gap(a, b) -> float:
    """The modality gap: the Euclidean norm of `gap_vector(a, b)`."""
    return float(np.linalg.norm(gap_vector(a, b)))


def null_gap(a, b, permutations: int = 100, seed: int = 0) -> float:
    """The gap expected if modality did not matter, for paired rows (row i of `a` and of `b` are
    the same item): the mean gap after swapping each item's two rows with probability 1/2, over
    `permutations` seeded draws. A measured gap near it is sampling noise, not a modality gap."""
    a, b = _rows(a, "the first modality's embeddings"), _rows(b, "the second modality's embeddings")
    if a.shape != b.shape:
        raise GapError(f"paired rows need equal shapes, not {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(permutations):
        swap = rng.random(len(a)) < 0.5
        gaps.append(np.linalg.norm(np.where(swap[:, None], b, a).mean(0) - np.where(swap[:, None], a, b).mean(0)))
    return float(np.mean(gaps))


def pairwise_gaps(embeddings: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The gap of every pair of modalities, keyed "a-b" in the mapping's order."""
    return {f"{a}-{b}": modality_gap(embeddings[a], embeddings[b]) for a, b in combinations(embeddings, 2)}


def _labels(labels: Sequence[str], n: int) -> np.ndarray:
    labels = np.asarray(labels).astype(str)
    if labels.shape != (n,):
        raise GapError(f"{len(labels)} modality labels for {n} rows: one label per row")
    return labels


def own_modality_share(emb, labels: Sequence[str], k: int = 10, chunk: int = 2048) -> dict[str, float]:
    """Each row as a query against all the others (itself left out), ranked by dot product (cosine
    for unit rows; ties broken by row order): the mean share of its top-k that has its own label,
    per label and over every query ("all")."""
    z = np.asarray(emb, dtype=np.float64)
    if z.ndim != 2 or len(z) < 2 or not np.isfinite(z).all():
        raise GapError(f"a mixed index needs at least 2 finite [n, dim] rows, not shape {z.shape}")
    labels = _labels(labels, len(z))
    if not 1 <= k < len(z):
        raise GapError(f"k must be between 1 and {len(z) - 1} (the other rows), not {k}")
    own = np.empty(len(z))
    for lo in range(0, len(z), chunk):
        scores = z[lo : lo + chunk] @ z.T
        scores[np.arange(len(scores)), np.arange(lo, lo + len(scores))] = -np.inf  # not itself
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        own[lo : lo + chunk] = (labels[top] == labels[lo : lo + chunk, None]).mean(axis=1)
    out = {str(m): float(own[labels == m].mean()) for m in dict.fromkeys(labels)}
    return {**out, "all": float(own.mean())}


def expected_own_share(labels: Sequence[str]) -> dict[str, float]:
    """The own-modality share if modality did not matter (any top-k drawn at random from the other
    rows): (n_m - 1) / (n - 1) per label, and its mean over every query ("all")."""
    labels = np.asarray(labels).astype(str)
    if len(labels) < 2:
        raise GapError(f"a mixed index of {len(labels)} rows has no other rows to rank")
    names, counts = np.unique(labels, return_counts=True)
    share = {str(m): (c - 1) / (len(labels) - 1) for m, c in zip(names, counts)}
    out = {m: share[m] for m in dict.fromkeys(labels.tolist())}
    return {**out, "all": float(sum(c * share[str(m)] for m, c in zip(names, counts)) / len(labels))}
