"""Small float64 linear algebra shared by the maps and projectors that fit principal directions:
one covariance, one descending eigendecomposition, one sign convention (so fits are reproducible)."""

from __future__ import annotations

import numpy as np


def covariance(xc: np.ndarray) -> np.ndarray:
    """Sample covariance of centred rows."""
    return (xc.T @ xc) / max(len(xc) - 1, 1)


def fix_signs(vecs: np.ndarray, *others: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
    """Flip columns so each one's largest-magnitude entry is positive (deterministic output).

    Columns of ``others`` are flipped together with those of ``vecs`` (paired directions).
    """
    idx = np.abs(vecs).argmax(axis=0)
    signs = np.sign(vecs[idx, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    if not others:
        return vecs * signs
    return (vecs * signs, *(o * signs for o in others))


def eig_desc(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, floored at zero) and eigenvectors of a symmetric matrix, signs fixed."""
    vals, vecs = np.linalg.eigh(c)
    vals, vecs = vals[::-1].clip(min=0.0), vecs[:, ::-1]
    return vals, fix_signs(vecs)
