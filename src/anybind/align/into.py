"""Training-free maps of a new modality *into a fixed, already-bound space*.

Progressive binding adds a modality (e.g. audio) to a bound model by mapping the new encoder's
features X [n, dx] onto FIXED targets Y [n, D]: the bound model's L2-normalised embeddings of the
paired items (e.g. the captions' text embeddings). Unlike `align.baselines` (two-sided: each
baseline builds its own space and moves both modalities), these maps move only the new side; the
target space never changes, so the new modality lands in the space the bound model already
serves. They are the baselines a trained projector must beat, and usable modalities on their own.

- ``ridge``: affine least squares with an L2 penalty, closed form (primal or dual solve).
- ``procrustes``: orthogonal Procrustes with translation and scale (Schönemann & Carroll 1970).
- ``nn-transfer``: the mean target of the k nearest training items.
- ``asif``: ASIF-style sparse similarity weights (Norelli et al. 2023) over the training targets.

Several X rows may share one item (``item``: rows with equal item are the same item, e.g. several
recordings of one caption); the neighbour maps then count each item once.

Example::

    m = build_into_map("ridge", alpha=0.1).fit(audio_feats, text_emb_of_their_captions, item=caption_id)
    z = m.encode("audio", new_audio_feats)     # [m, D] float32, L2-normalised, in the bound space
    scores = z @ text_emb.T
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .. import checks, saving
from ..errors import AnybindError
from ..registry import Registry, RegistryError
from .linalg import fix_signs
from .topk import top_k

__all__ = [
    "INTO_MAPS",
    "ASIFInto",
    "IntoMap",
    "IntoMapError",
    "NNTransferInto",
    "ProcrustesInto",
    "RidgeInto",
    "build_into_map",
    "into_map_options",
    "register_into_map",
]

KIND = "into-map"  # the saved-part kind
_TINY = 1e-12


class IntoMapError(AnybindError, ValueError):
    """An unknown map or option, bad training rows, or bad input to ``encode``."""


# --------------------------------------------------------------------------------------------
# input checks


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64 if x.dtype == torch.float64 else torch.float32).numpy()
    return np.asarray(x)


def _check_matrix(x: Any, what: str, *, allow_empty: bool = False) -> np.ndarray:
    """A 2-D finite float array (float32, or float64 when given so), or a clear error."""
    arr = _to_numpy(x)
    if arr.ndim != 2:
        raise IntoMapError(f"{what} must be a 2-D array [rows, dim], got shape {arr.shape}")
    if arr.shape[1] == 0 or (arr.shape[0] == 0 and not allow_empty):
        raise IntoMapError(f"{what} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise IntoMapError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    arr = arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise IntoMapError(f"{what} has {len(bad)} row(s) with NaN or inf values (first: row {bad[0]}); "
                           "drop or re-extract those rows")
    return arr


def _check_items(item: Any, n: int) -> np.ndarray:
    """[n] item index of each row, renumbered 0..n_items-1 (sorted by item id)."""
    if item is None:
        return np.arange(n, dtype=np.int64)
    arr = _to_numpy(item)
    if arr.ndim != 1 or len(arr) != n:
        raise IntoMapError(f"item must hold one entry per row: got shape {arr.shape} for {n} rows")
    if not np.issubdtype(arr.dtype, np.integer):
        raise IntoMapError(f"item must hold integers (rows with equal item are one item), got dtype {arr.dtype}")
    return np.unique(arr, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _check_pairs(x: Any, y: Any, item: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x float64, y float64 with unit rows, item index) from the training rows, or a clear error."""
    x = _check_matrix(x, "x (features of the new modality)").astype(np.float64)
    y = _check_matrix(y, "y (target embeddings)").astype(np.float64)
    if len(x) != len(y):
        raise IntoMapError(f"x and y must have one row per pair: got {len(x)} x rows and {len(y)} y rows")
    if len(x) < 2:
        raise IntoMapError(f"fitting needs at least 2 training rows, got {len(x)}")
    norms = np.linalg.norm(y, axis=1)
    if (norms <= _TINY).any():
        bad = np.flatnonzero(norms <= _TINY)
        raise IntoMapError(f"y has {len(bad)} all-zero row(s) (first: row {bad[0]}): a target embedding "
                           "has a direction; drop those rows")
    return x, y / norms[:, None], _check_items(item, len(x))


def _last_layer(feats: Any) -> Any:
    """The features to encode: a tensor/array, or the last of a list of per-layer tensors."""
    if isinstance(feats, (list, tuple)):
        if not feats:
            raise IntoMapError("encode got an empty list of layers: pass a tensor or a list of per-layer tensors")
        return feats[-1]
    return feats


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _TINY)


def _f32(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# --------------------------------------------------------------------------------------------
# the interface and the registry

#: name -> map class; filled by `register_into_map`.
INTO_MAPS = Registry("map into a fixed space", plural="maps into a fixed space")

M = TypeVar("M", bound="IntoMap")


def register_into_map(name: str, *, help: str = "") -> Callable[[type[M]], type[M]]:
    """Class decorator: make a map (a dataclass whose fields are its options) available to
    :func:`build_into_map` under ``name``."""
    return INTO_MAPS.subclass_decorator(name, IntoMap, help=help, error=IntoMapError, dataclass=True,
                                        decorator="register_into_map")


def build_into_map(name: str, **options: Any) -> IntoMap:
    """A map by registered name, with options (checked against its dataclass fields).

    >>> build_into_map("nn-transfer", k=5).k
    5
    """
    try:
        return INTO_MAPS.build(name, **options)
    except RegistryError as e:  # one error type for every bad request to this module
        raise IntoMapError(str(e)) from None


def into_map_options(name: str) -> dict[str, Any]:
    """The options a registered map accepts (its dataclass fields), with their defaults."""
    try:
        return INTO_MAPS.options(name)
    except RegistryError as e:
        raise IntoMapError(str(e)) from None


class IntoMap(ABC):
    """A closed-form map of one modality's features into a fixed embedding space.

    Subclasses are dataclasses whose fields are their options (checked in ``__post_init__``);
    ``_fit`` sets the fitted tensors named in ``_STATE`` (what `save` writes). Encoding runs on
    the CPU in chunks of ``batch_size`` rows and returns to the features' device.
    """

    name: ClassVar[str] = ""
    _STATE: ClassVar[tuple[str, ...]] = ()
    batch_size: int

    def fit(self, x: Any, y: Any, item: Any = None) -> IntoMap:
        """Fit on x [n, dx] (the new modality) and y [n, D] (the fixed targets; rows are
        normalised here); ``item`` [n]: rows with equal item are one item. Returns ``self``."""
        x, y, item = _check_pairs(x, y, item)
        with torch.no_grad():
            self._fit(x, y, item)
        self._fitted = {"n": len(x), "n_items": int(item.max()) + 1, "in_dim": x.shape[1], "out_dim": y.shape[1]}
        return self

    def encode(self, modality: str, feats: Any) -> torch.Tensor:
        """[m, D] float32 L2-normalised rows in the fixed space. ``modality`` is ignored: it keeps
        the signature of ``ProjectorSpace.encode`` so a bound model calls both alike."""
        self._require_fitted("encode")
        feats = _last_layer(feats)
        device = feats.device if isinstance(feats, torch.Tensor) else torch.device("cpu")
        arr = _to_numpy(feats)
        arr = _check_matrix(arr[None, :] if arr.ndim == 1 else arr, "features to encode", allow_empty=True)
        if arr.shape[1] != self._fitted["in_dim"]:
            raise IntoMapError(f"features to encode have dimension {arr.shape[1]}, but this {self.name!r} map was "
                               f"fitted on features of dimension {self._fitted['in_dim']}")
        q = _f32(arr)
        out = torch.zeros(len(q), self.out_dim)
        with torch.no_grad():
            for part in _chunks(len(q), self.batch_size):
                out[part] = F.normalize(self._encode(q[part]), dim=1)
        return out.to(device)

    @property
    def out_dim(self) -> int:
        """The dimension of the fixed space (after fitting)."""
        self._require_fitted("out_dim")
        return int(self._fitted["out_dim"])

    def save(self, directory: str | os.PathLike) -> Path:
        """The saved part (kind ``into-map``): name, options and fit sizes in config.json, the
        fitted tensors in weights.safetensors; atomic, the same bytes for the same fit."""
        self._require_fitted("save")
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        tensors = {k: getattr(self, k) for k in self._STATE}
        return saving.save_part(directory, KIND, self.name, options=options, tensors=tensors, fitted=self._fitted)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> IntoMap:
        """A fitted map saved by `save`."""
        config, tensors = saving.read_part(directory, KIND)
        try:
            model = build_into_map(config["name"], **config["options"])
            for k in model._STATE:
                setattr(model, k, tensors[k])
            model._fitted = {k: int(config["fitted"][k]) for k in ("n", "n_items", "in_dim", "out_dim")}
        except (KeyError, TypeError, ValueError) as e:
            raise IntoMapError(f"{directory} holds a damaged saved map ({e!r}): fit and save it again") from e
        if cls is not IntoMap and not isinstance(model, cls):
            raise IntoMapError(f"{directory} holds a {config['name']!r} map, not a {cls.__qualname__}: "
                               "load it with IntoMap.load")
        return model

    def _require_fitted(self, what: str) -> None:
        if not hasattr(self, "_fitted"):
            raise IntoMapError(f"map {self.name!r} is not fitted: call fit(x, y) before {what}")

    @abstractmethod
    def _fit(self, x: np.ndarray, y: np.ndarray, item: np.ndarray) -> None: ...

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------
# ridge


def _ridge_weights(xc: np.ndarray, yc: np.ndarray, lam: float, dual: bool | None = None) -> np.ndarray:
    """argmin ||xc W - yc||^2 + lam ||W||^2: primal (dx x dx) or dual (n x n), whichever is
    smaller unless `dual` says; lam = 0 is the minimum-norm least-squares solution."""
    n, dx = xc.shape
    if lam == 0.0:
        return np.linalg.lstsq(xc, yc, rcond=None)[0]
    if dual is None:
        dual = n < dx
    if dual:  # W = Xc^T (Xc Xc^T + lam I)^-1 Yc
        return xc.T @ np.linalg.solve(xc @ xc.T + lam * np.eye(n), yc)
    return np.linalg.solve(xc.T @ xc + lam * np.eye(dx), xc.T @ yc)


@register_into_map("ridge")
@dataclass(eq=False)
class RidgeInto(IntoMap):
    """Ridge regression (Hoerl & Kennard 1970) with an unpenalised intercept.

    x -> ybar + (x - xbar) W, W = argmin ||Xc W - Yc||^2 + lam ||W||^2, closed form:
    (Xc^T Xc + lam I)^-1 Xc^T Yc, or Xc^T (Xc Xc^T + lam I)^-1 Yc when n < dx (same W).
    ``alpha`` is relative to the mean eigenvalue of Xc^T Xc (lam = alpha * trace / dx), so it does
    not depend on the feature scale; 0 is least squares (minimum norm when underdetermined).
    """

    alpha: float = 0.1
    batch_size: int = 4096

    _STATE: ClassVar[tuple[str, ...]] = ("mean", "weight", "bias")

    def __post_init__(self) -> None:
        checks.number("ridge: alpha", self.alpha, minimum=0.0, error=IntoMapError)
        checks.integer("ridge: batch_size", self.batch_size, minimum=1, error=IntoMapError)

    def _fit(self, x: np.ndarray, y: np.ndarray, item: np.ndarray) -> None:
        xbar, ybar = x.mean(axis=0), y.mean(axis=0)
        xc = x - xbar
        # floored so a constant x (trace 0) still gets a well-posed solve (W = 0)
        lam = self.alpha * max(float(np.einsum("ij,ij->", xc, xc)) / x.shape[1], _TINY)
        w = _ridge_weights(xc, y - ybar, lam if self.alpha else 0.0)
        self.mean, self.weight, self.bias = _f32(xbar), _f32(w), _f32(ybar)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.weight + self.bias


# --------------------------------------------------------------------------------------------
# procrustes


def _pca_basis(xc: np.ndarray, d: int) -> np.ndarray:
    """[dx, d]: the top-d principal directions of centred rows (descending; each column's
    largest-magnitude entry positive, so the basis is deterministic)."""
    _, vecs = np.linalg.eigh(xc.T @ xc)
    return fix_signs(vecs[:, ::-1][:, :d])


@register_into_map("procrustes")
@dataclass(eq=False)
class ProcrustesInto(IntoMap):
    """Orthogonal Procrustes onto the fixed space, with translation and scale.

    X rows are L2-normalised and centred, then PCA'd to D dims when dx > D (when dx <= D they
    stay as they are, which equals padding with zeros). W [d, D] with orthonormal rows maximises
    tr(W^T Xp^T Yc): W = U V^T from the SVD of Xp^T Yc (Schönemann 1966). The fixed space is not
    centred (a rotation cannot make its common offset), so Y is centred and its mean added back,
    with the least-squares scale s = tr(Sigma) / ||Xp||^2 (Schönemann & Carroll 1970):
    x -> normalise(s * Xp(x) W + ybar). Fitted ``rotation`` [d, D] is W.
    """

    batch_size: int = 4096

    _STATE: ClassVar[tuple[str, ...]] = ("mean", "matrix", "bias", "rotation")

    def __post_init__(self) -> None:
        checks.integer("procrustes: batch_size", self.batch_size, minimum=1, error=IntoMapError)

    def _fit(self, x: np.ndarray, y: np.ndarray, item: np.ndarray) -> None:
        xn = _l2_rows(x)
        xbar, ybar = xn.mean(axis=0), y.mean(axis=0)
        xc, yc = xn - xbar, y - ybar
        dx, dy = x.shape[1], y.shape[1]
        proj = _pca_basis(xc, dy) if dx > dy else np.eye(dx)
        xp = xc @ proj
        u, s, vt = np.linalg.svd(xp.T @ yc, full_matrices=False)
        rotation = u @ vt  # [d, D], orthonormal rows
        scale = s.sum() / max(float(np.einsum("ij,ij->", xp, xp)), _TINY)
        self.mean, self.bias, self.rotation = _f32(xbar), _f32(ybar), _f32(rotation)
        self.matrix = _f32(proj @ rotation * scale)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x, dim=1) - self.mean) @ self.matrix + self.bias


# --------------------------------------------------------------------------------------------
# neighbour maps: nn-transfer and asif


class _NeighbourMap(IntoMap):
    """Shared by the neighbour maps: the training rows in a centred cosine space, each row's
    item, and each item's target (the normalised mean of its rows' targets)."""

    _STATE: ClassVar[tuple[str, ...]] = ("mean", "anchors", "row_item", "targets")
    k: int

    def _fit(self, x: np.ndarray, y: np.ndarray, item: np.ndarray) -> None:
        self.mean = _f32(_l2_rows(x).mean(axis=0))
        self.anchors = self._space(_f32(x))  # the same float32 path as encode: a training row finds itself
        self.row_item = torch.from_numpy(item)
        n_items = int(item.max()) + 1
        sums = np.zeros((n_items, y.shape[1]))
        np.add.at(sums, item, y)
        self.targets = _f32(_l2_rows(sums))

    def _space(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine space centred on the training rows: l2, minus their mean, l2."""
        return F.normalize(F.normalize(x, dim=1) - self.mean, dim=1)

    def _top_items(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, item indices) of the k most similar items, descending; an item's
        similarity is that of its closest row, so each item counts once."""
        sims = self._space(x) @ self.anchors.T  # [b, n]
        n_items = len(self.targets)
        if n_items < len(self.anchors):
            index = self.row_item.expand_as(sims)
            per_item = torch.zeros(len(sims), n_items, dtype=sims.dtype)
            sims = per_item.scatter_reduce_(1, index, sims, reduce="amax", include_self=False)
        return top_k(sims, min(self.k, n_items))


@register_into_map("nn-transfer")
@dataclass(eq=False)
class NNTransferInto(_NeighbourMap):
    """Nearest-neighbour transfer: a row is the normalised mean target of its ``k`` nearest
    training items (cosine in the centred, normalised x space; the nearest row of an item stands
    for it). A training row finds itself first: evaluate on held-out rows."""

    k: int = 10
    batch_size: int = 1024

    def __post_init__(self) -> None:
        checks.integer("nn-transfer: k", self.k, minimum=1, error=IntoMapError)
        checks.integer("nn-transfer: batch_size", self.batch_size, minimum=1, error=IntoMapError)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        _, idx = self._top_items(x)
        return self.targets[idx].mean(dim=1)


@register_into_map("asif")
@dataclass(eq=False)
class ASIFInto(_NeighbourMap):
    """ASIF relative representations (Norelli et al. 2023, "ASIF: coupled data turns unimodal
    models to multimodal without training"), read out in the fixed space.

    ASIF represents a row by its cosine similarities to the anchors, keeps the top ``k``, clips
    them at zero and raises them to the power ``p`` (8 in the paper). Here the anchors' targets
    are already in the fixed space, so the row is the normalised sum of its top-k items' targets
    weighted by those sparse similarities. Similarities are divided by the row's best one before
    the power (same direction, no underflow); when no similarity is positive the best item alone
    is kept. With k=1 this is nn-transfer with k=1.
    """

    k: int = 64
    p: float = 8.0
    batch_size: int = 1024

    def __post_init__(self) -> None:
        checks.integer("asif: k", self.k, minimum=1, error=IntoMapError)
        checks.number("asif: p", self.p, minimum=0.0, strict=True, error=IntoMapError)
        checks.integer("asif: batch_size", self.batch_size, minimum=1, error=IntoMapError)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        sims, idx = self._top_items(x)
        weights = sims.clamp(min=0.0) / sims[:, :1].clamp(min=_TINY)
        weights[:, 0] = 1.0
        return torch.einsum("bk,bkd->bd", weights.pow(self.p), self.targets[idx])
