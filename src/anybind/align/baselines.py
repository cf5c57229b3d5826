"""Training-free baselines: bind two frozen feature spaces without gradient training.

Each baseline is fitted in closed form (or not fitted at all beyond storing anchors) on the
training pairs, and then maps either modality into one shared space, like a trained projector:

- ``procrustes``: centre each side, PCA each side to a shared dimension, then the orthogonal
  map (Procrustes) that best carries the image PCA coordinates onto the caption ones.
- ``cca``: closed-form regularised CCA (whiten each side, SVD of the whitened cross-covariance),
  canonical dimensions optionally weighted by their correlation ``rho ** power``.
- ``asif``: ASIF relative representations: an item is its sparse top-k similarities to the anchor
  pairs, in the anchor-index space that both modalities share.
- ``nn-transfer``: nearest-neighbour caption transfer: an image is the mean text embedding of the
  captions of its k nearest training images; a caption is its own text embedding. This is the
  floor a trained projector must beat.

The two sides of the pair are called ``"image"`` and ``"text"`` inside this module: the first
modality of any pair is ``"image"`` and the second ``"text"`` (``"first"``/``"second"`` and
``0``/``1`` are accepted too), so an audio-text pair uses ``"image"`` for the audio side. Only the
``side`` argument of `Baseline.encode` (and the `PairedArrays` fields) speak these names; a
caller with other modality names maps them to the two sides, and nothing saved depends on them.
Several captions per image are handled throughout (``PairedArrays.text_to_image``).

Example::

    train = PairedArrays(image=img_feats, text=cap_feats, text_to_image=cap_to_img_row)
    model = build_baseline("cca", reg=0.1).fit(train)
    zi = model.encode("image", test_img)    # [n, d] float32, L2-normalised
    zt = model.encode("text", test_caps)
    scores = zt @ zi.T
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
from ..registry import Registry
from .linalg import eig_desc as _sym_eig_desc
from .linalg import fix_signs as _fix_signs
from .topk import BLOCK_FLOATS, Bank, bank_top_k, top_k

__all__ = [
    "BASELINES",
    "MODALITIES",
    "ASIF",
    "Baseline",
    "BaselineError",
    "CCA",
    "NNTransfer",
    "PairedArrays",
    "Procrustes",
    "baseline_options",
    "build_baseline",
    "register_baseline",
    "resolve_modality",
]

KIND = "baseline"  # the saved-part kind
LEGACY_FILE = "baseline.json"  # saved-part format 1 (with state.safetensors)

MODALITIES = ("image", "text")
_MODALITY_ALIASES: dict[Any, str] = {
    "image": "image",
    "text": "text",
    "first": "image",
    "second": "text",
    0: "image",
    1: "text",
}
_EIG_FLOOR = 1e-10  # eigenvalues below this fraction of the largest are treated as this floor


class BaselineError(AnybindError, ValueError):
    """An unknown baseline or option, bad training pairs, or bad input to ``encode``."""


def resolve_modality(modality: str | int, error: type[Exception] = BaselineError) -> str:
    """``"image"`` or ``"text"`` from any accepted name (``"first"``/``"second"``, ``0``/``1``)."""
    try:
        return _MODALITY_ALIASES[modality.lower() if isinstance(modality, str) else modality]
    except (KeyError, TypeError):
        raise error(
            f"unknown modality {modality!r}: use 'image' (the first modality of the pair) or "
            "'text' (the second); 'first'/'second' and 0/1 are accepted too"
        ) from None


# --------------------------------------------------------------------------------------------
# training pairs


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x)


def _tensor(x: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``x`` (copied when ``x`` is read-only, e.g. a memory-mapped store)."""
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def _check_matrix(x: Any, what: str) -> np.ndarray:
    """A 2-D finite float32 array with at least one row and one column, or a clear error."""
    arr = _to_numpy(x)
    if arr.ndim != 2:
        raise BaselineError(f"{what} must be a 2-D array [rows, dim], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BaselineError(f"{what} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise BaselineError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise BaselineError(
            f"{what} has {len(bad)} row(s) with NaN or inf values (first: row {bad[0]}); "
            "drop or re-extract those rows"
        )
    return arr


@dataclass
class PairedArrays:
    """The training pairs, as the trainer hands them over.

    ``image``: [Ni, Di] one row per item; ``text``: [Nt, Dt] one row per caption (several
    captions per item allowed); ``text_to_image``: [Nt] the ``image`` row of each caption.
    Arrays are checked (shapes, finite values, indices in range) and converted to float32 /
    int64 on construction; a float32 memory-mapped array is not copied.
    """

    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray

    def __post_init__(self) -> None:
        self.image = _check_matrix(self.image, "image features")
        self.text = _check_matrix(self.text, "text features")
        t2i = _to_numpy(self.text_to_image)
        if t2i.ndim != 1 or len(t2i) != len(self.text):
            raise BaselineError(
                f"text_to_image must have one entry per text row: got shape {t2i.shape} for "
                f"{len(self.text)} text rows"
            )
        if not np.issubdtype(t2i.dtype, np.integer):
            raise BaselineError(f"text_to_image must hold integer row indices, got {t2i.dtype}")
        if t2i.min() < 0 or t2i.max() >= len(self.image):
            raise BaselineError(
                f"text_to_image points outside the {len(self.image)} image rows "
                f"(min {t2i.min()}, max {t2i.max()})"
            )
        self.text_to_image = t2i.astype(np.int64)

    @classmethod
    def one_to_one(cls, image: Any, text: Any) -> PairedArrays:
        """Pairs where text row i belongs to image row i."""
        n_text = len(_to_numpy(text))
        if len(_to_numpy(image)) != n_text:
            raise BaselineError(
                f"one-to-one pairs need as many image rows as text rows: got "
                f"{len(_to_numpy(image))} and {n_text}"
            )
        return cls(image, text, np.arange(n_text, dtype=np.int64))

    @property
    def n_images(self) -> int:
        return len(self.image)

    @property
    def n_texts(self) -> int:
        return len(self.text)

    def paired_image_rows(self) -> np.ndarray:
        """[Nt, Di]: the image row of every caption (one row per pair)."""
        return self.image[self.text_to_image]

    def captioned_images(self) -> tuple[np.ndarray, np.ndarray]:
        """The image rows that have at least one caption, and each caption's index among them."""
        rows, anchor_of_text = np.unique(self.text_to_image, return_inverse=True)
        return rows, anchor_of_text.astype(np.int64)


# --------------------------------------------------------------------------------------------
# the interface and the registry

#: name -> baseline class; filled by `register_baseline`.
BASELINES = Registry("baseline")

B = TypeVar("B", bound="Baseline")


def register_baseline(name: str, *, help: str = "") -> Callable[[type[B]], type[B]]:
    """Class decorator: make a baseline (a dataclass whose fields are its options) available to
    :func:`build_baseline` under ``name``."""
    return BASELINES.subclass_decorator(name, Baseline, help=help, error=BaselineError, dataclass=True)


def build_baseline(name: str, **options: Any) -> Baseline:
    """A baseline by registered name, with options (checked against its dataclass fields).

    >>> build_baseline("asif", k=400).config()["k"]
    400
    """
    return BASELINES.build(name, **options)


def baseline_options(name: str) -> dict[str, Any]:
    """The options a registered baseline accepts (its dataclass fields), with their defaults."""
    return BASELINES.options(name)


class Baseline(ABC):
    """A closed-form map of both modalities into one shared space.

    Subclasses are dataclasses whose fields are their options (checked in ``__post_init__``);
    the fitted state lives in plain attributes set by ``_fit``.
    """

    name: ClassVar[str] = ""

    def fit(self, train: PairedArrays) -> Baseline:
        """Fit on the training pairs; returns ``self``."""
        if not isinstance(train, PairedArrays):
            raise BaselineError(
                f"fit() takes a PairedArrays (image, text, text_to_image), got {type(train).__name__}"
            )
        if train.n_texts < 2:
            raise BaselineError(f"{self.name} needs at least 2 training pairs, got {train.n_texts}")
        self._input_dims = {"image": train.image.shape[1], "text": train.text.shape[1]}
        self._fitted_info = {"n_images": train.n_images, "n_texts": train.n_texts}
        with torch.no_grad():
            self._fit(train)
        return self

    def encode(self, modality: str | int, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Map rows of one modality into the shared space: [n, d] float32, L2-normalised."""
        side = resolve_modality(modality)
        if not hasattr(self, "_input_dims"):
            raise BaselineError(f"baseline {self.name!r} is not fitted: call fit(train) first")
        arr = _to_numpy(x)
        if arr.ndim == 1:
            arr = arr[None, :]
        arr = _check_matrix(arr, f"{side} input")
        want = self._input_dims[side]
        if arr.shape[1] != want:
            raise BaselineError(
                f"{side} input has dimension {arr.shape[1]}, but {self.name!r} was fitted on "
                f"{side} features of dimension {want}"
            )
        with torch.no_grad():
            out = self._encode(side, _tensor(arr))
        return F.normalize(out.float(), dim=1).contiguous()

    def config(self) -> dict[str, Any]:
        """JSON-able settings: the name, every option, and what fitting resolved (sizes, dims)."""
        cfg: dict[str, Any] = {"name": self.name}
        cfg.update(dataclasses.asdict(self))  # type: ignore[call-overload]
        if hasattr(self, "_fitted_info"):
            cfg["fitted"] = dict(self._fitted_info)
        return cfg

    def _bank(self, attribute: str) -> Bank:
        """A bank attribute's distinct rows and copies, found once per bank (a cache: `save` skips it)."""
        bank, cache = getattr(self, attribute), self.__dict__.setdefault("_cache_distinct", {})
        if attribute not in cache or cache[attribute][0] is not bank:
            cache[attribute] = (bank, Bank.of(bank))
        return cache[attribute][1]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the saved part: the options, the fitted state's description (JSON) and its
        tensors (``weights.safetensors``); no pickles, atomic, the same bytes for the same fit."""
        if not hasattr(self, "_input_dims"):
            raise BaselineError(f"baseline {self.name!r} is not fitted: nothing to save")
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        tensors: dict[str, torch.Tensor] = {}
        state = {k: _flatten(v, k, tensors) for k, v in vars(self).items()
                 if k not in options and not k.startswith("_cache")}  # caches are rebuilt on use
        return saving.save_part(directory, KIND, self.name, options=options, tensors=tensors, state=state)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Baseline:
        """A fitted baseline saved by `save`."""
        directory = Path(directory)
        _refuse_legacy(directory)
        config, tensors = saving.read_part(directory, KIND)
        try:
            model = build_baseline(config["name"], **config["options"])
            for k, v in config["state"].items():
                setattr(model, k, _unflatten(v, tensors))
        except (KeyError, TypeError, AttributeError) as e:
            raise BaselineError(f"{directory} holds a damaged saved baseline ({e!r}): fit and save it again") from e
        if cls is not Baseline and not isinstance(model, cls):
            raise BaselineError(f"{directory} holds a {config['name']!r} baseline, not a {cls.__qualname__}: "
                                "load it with Baseline.load")
        return model

    @property
    def out_dim(self) -> int:
        """The dimension of the shared space (after fitting)."""
        if not hasattr(self, "_fitted_info") or "out_dim" not in self._fitted_info:
            raise BaselineError(f"baseline {self.name!r} is not fitted: call fit(train) first")
        return int(self._fitted_info["out_dim"])

    @abstractmethod
    def _fit(self, train: PairedArrays) -> None: ...

    @abstractmethod
    def _encode(self, side: str, x: torch.Tensor) -> torch.Tensor: ...


_STATE_CLASSES: dict[str, type] = {}  # small fitted-state holders, filled below (_AffineMap, _CosineSpace)


def _refuse_legacy(directory: Path) -> None:
    """A folder saved before the saved-part contract: say which version and what to do."""
    if (directory / LEGACY_FILE).is_file() and not (directory / saving.CONFIG_FILE).is_file():
        raise saving.SavedPartError(f"{directory} was written in saved-part format 1 ({LEGACY_FILE}); this anybind "
                                    f"reads format {saving.FORMAT}: fit the baseline (or export the bundle) "
                                    "again with this version")


def _flatten(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able description of a fitted attribute; its tensors go into `tensors` by path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu()
        return {"$tensor": path}
    if isinstance(value, np.ndarray):  # fitted arrays for inspection (CCA's correlations, ...)
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
        return {"$numpy": path}
    if isinstance(value, dict):
        return {"$dict": {k: _flatten(v, f"{path}.{k}", tensors) for k, v in value.items()}}
    if type(value).__name__ in _STATE_CLASSES:
        fields = {k: _flatten(v, f"{path}.{k}", tensors) for k, v in vars(value).items()}
        return {"$object": type(value).__name__, "fields": fields}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise BaselineError(f"cannot save fitted attribute {path} of type {type(value).__name__}")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "$tensor" in value:
        return tensors[value["$tensor"]]
    if isinstance(value, dict) and "$numpy" in value:
        return tensors[value["$numpy"]].numpy()
    if isinstance(value, dict) and "$dict" in value:
        return {k: _unflatten(v, tensors) for k, v in value["$dict"].items()}
    if isinstance(value, dict) and "$object" in value:
        obj = object.__new__(_STATE_CLASSES[value["$object"]])
        for k, v in value["fields"].items():
            setattr(obj, k, _unflatten(v, tensors))
        return obj
    return value


# --------------------------------------------------------------------------------------------
# linear algebra helpers (fitting in float64 numpy; encoding in float32 torch)


def _l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _inverse_sqrt(c: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(c)
    floor = max(vals.max(), 0.0) * _EIG_FLOOR + np.finfo(np.float64).tiny
    return (vecs / np.sqrt(np.maximum(vals, floor))) @ vecs.T


@dataclass
class _AffineMap:
    """x -> (l2(x) if normalize else x) - mean, then @ matrix: one modality's side of a map."""

    normalize: bool
    mean: torch.Tensor  # [D]
    matrix: torch.Tensor  # [D, d]

    @classmethod
    def from_numpy(cls, normalize: bool, mean: np.ndarray, matrix: np.ndarray) -> _AffineMap:
        return cls(
            normalize,
            torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = F.normalize(x, dim=1)
        return (x - self.mean) @ self.matrix


def _prepare(x: np.ndarray, normalize: bool) -> np.ndarray:
    x = x.astype(np.float64)
    return _l2_rows(x) if normalize else x


# --------------------------------------------------------------------------------------------
# procrustes


@register_baseline("procrustes")
@dataclass(eq=False)
class Procrustes(Baseline):
    """PCA each side to a shared dimension, then the orthogonal map between the two PCA spaces.

    image -> PCA_i(x) @ R, text -> PCA_t(x), with R = U V^T from the SVD of the cross-covariance
    of the paired rows (each caption paired with its image). Image PCA is fitted on every image
    row, text PCA on every caption.

    Options: ``dim`` (None: min(Di, Dt, 256, N-1)); ``normalize_input`` (L2-normalise raw rows
    before centring); ``scaling``: ``"none"`` (centre only), ``"standardize"`` (per-feature unit
    variance before PCA) or ``"whiten"`` (unit variance per PCA component).

    Measured on openclipart (val; ``benchmarks/baselines_openclipart.py --sweep``): the input
    scalings are within 1 point of each other except ``whiten`` (-2.6 points); dim 384 beats the
    default cap of 256 by ~0.3 points, 128 loses 3 points.
    """

    dim: int | None = None
    normalize_input: bool = True
    scaling: str = "none"

    def __post_init__(self) -> None:
        if self.dim is not None:
            checks.integer("procrustes: dim", self.dim, minimum=1, error=BaselineError)
        checks.flag("procrustes: normalize_input", self.normalize_input, error=BaselineError)
        checks.choice("procrustes: scaling", self.scaling, ("none", "standardize", "whiten"), error=BaselineError)

    def _projection(self, cov: np.ndarray, d: int) -> np.ndarray:
        """[D, d]: the top-d principal directions of centred rows of covariance `cov`, with the scaling."""
        scale = np.ones(len(cov))
        if self.scaling == "standardize":  # the per-feature sd (ddof 1) is the covariance's diagonal
            scale = 1.0 / np.maximum(np.sqrt(np.diag(cov)), 1e-12)
            cov = scale[:, None] * cov * scale[None, :]
        vals, vecs = _sym_eig_desc(cov)
        w = vecs[:, :d]
        if self.scaling == "whiten":
            w = w / np.sqrt(np.maximum(vals[:d], vals[0] * _EIG_FLOOR + 1e-300))
        return scale[:, None] * w

    def _fit(self, train: PairedArrays) -> None:
        di, dt = train.image.shape[1], train.text.shape[1]
        n = min(train.n_images, train.n_texts)
        d = self.dim if self.dim is not None else min(di, dt, 256, max(n - 1, 1))
        if d > min(di, dt):
            raise BaselineError(
                f"procrustes: dim={d} exceeds the smaller input dimension min({di}, {dt})"
            )
        # moments in float64 over float32 row blocks: a 10M-row fit held n x d float64 copies (> 14 GB)
        mean_x, cov_x = _row_moments(train.image, self.normalize_input)
        mean_y, cov_y = _row_moments(train.text, self.normalize_input)
        proj_x, proj_y = self._projection(cov_x, d), self._projection(cov_y, d)
        cross = proj_x.T @ _cross_products(train, mean_x, mean_y, self.normalize_input) @ proj_y  # [d, d]
        u, _, vt = np.linalg.svd(cross)
        self.rotation = u @ vt  # image PCA coordinates -> text PCA coordinates
        self._maps = {
            "image": _AffineMap.from_numpy(self.normalize_input, mean_x, proj_x @ self.rotation),
            "text": _AffineMap.from_numpy(self.normalize_input, mean_y, proj_y),
        }
        self._fitted_info["out_dim"] = d

    def _encode(self, side: str, x: torch.Tensor) -> torch.Tensor:
        return self._maps[side](x)


# --------------------------------------------------------------------------------------------
# cca


@register_baseline("cca")
@dataclass(eq=False)
class CCA(Baseline):
    """Closed-form regularised CCA on the paired rows.

    Cxx + rx I and Cyy + ry I with ``r = reg * trace(C) / D`` (so ``reg`` is relative to the
    average eigenvalue and independent of the feature scale), whitened by their inverse square
    roots; the SVD of the whitened cross-covariance gives the canonical directions and
    correlations ``rho``. The top ``dim`` dimensions (None: min(Di, Dt, 256)) are kept, each
    scaled by ``rho ** power`` (0: unweighted; 1: the usual CCA-retrieval weighting).
    ``normalize_input`` L2-normalises raw rows before centring.
    Fitted: ``correlations`` (the training canonical correlations, descending).

    Defaults measured on openclipart (efficientnet-lite0 x minilm-l6, val split,
    ``benchmarks/baselines_openclipart.py --sweep``): mean recall is flat for reg 0.2-0.5 with
    power 0.5-1 (~24%), falls to ~21% at reg 0.03 and ~10% at reg 1 (with power 4); power 0
    loses ~3 points, power 4+ loses more.
    """

    reg: float = 0.3
    dim: int | None = None
    power: float = 1.0
    normalize_input: bool = True

    def __post_init__(self) -> None:
        checks.number("cca: reg", self.reg, minimum=0.0, error=BaselineError)
        if self.dim is not None:
            checks.integer("cca: dim", self.dim, minimum=1, error=BaselineError)
        checks.number("cca: power", self.power, minimum=0.0, error=BaselineError)
        checks.flag("cca: normalize_input", self.normalize_input, error=BaselineError)

    def _regularised(self, c: np.ndarray) -> np.ndarray:
        c = c.copy()
        c[np.diag_indices_from(c)] += self.reg * np.trace(c) / len(c)
        return c

    def _fit(self, train: PairedArrays) -> None:
        di, dt = train.image.shape[1], train.text.shape[1]
        d = self.dim if self.dim is not None else min(di, dt, 256)
        if d > min(di, dt):
            raise BaselineError(f"cca: dim={d} exceeds the smaller input dimension min({di}, {dt})")
        (mean_x, mean_y), (cxx, cyy, cxy) = _paired_moments(train, self.normalize_input)
        wx = _inverse_sqrt(self._regularised(cxx))
        wy = _inverse_sqrt(self._regularised(cyy))
        cross = wx @ cxy @ wy
        u, rho, vt = np.linalg.svd(cross, full_matrices=False)
        u, v = _fix_signs(u[:, :d], vt[:d].T)
        rho = rho[:d]
        self.correlations = rho.copy()
        weight = np.power(np.maximum(rho, 0.0), self.power) if self.power else np.ones(d)
        self._maps = {
            "image": _AffineMap.from_numpy(self.normalize_input, mean_x, (wx @ u) * weight),
            "text": _AffineMap.from_numpy(self.normalize_input, mean_y, (wy @ v) * weight),
        }
        self._fitted_info["out_dim"] = d

    def _encode(self, side: str, x: torch.Tensor) -> torch.Tensor:
        return self._maps[side](x)


def _paired_moments(train: PairedArrays, normalize: bool, block_bytes: int = 4 << 20):
    """((mean_x, mean_y), (Cxx, Cyy, Cxy)) of the pairs (image row of each caption, caption), in
    float64 from float32 row blocks that stay in the cache: two passes (means, then centred
    products), never an n x d float64 copy. Sums as the unblocked formulas, in another order."""
    n, width = train.n_texts, max(train.image.shape[1], train.text.shape[1])
    blocks = _row_blocks(n, width, block_bytes)

    def rows(s: slice) -> tuple[np.ndarray, np.ndarray]:
        return (_prepare(train.image[train.text_to_image[s]], normalize), _prepare(train.text[s], normalize))

    sum_x, sum_y = 0.0, 0.0
    for s in blocks:
        x, y = rows(s)
        sum_x, sum_y = sum_x + x.sum(axis=0), sum_y + y.sum(axis=0)
    mean_x, mean_y = sum_x / n, sum_y / n
    cxx, cyy, cxy = 0.0, 0.0, 0.0
    for s in blocks:
        x, y = rows(s)
        x -= mean_x
        y -= mean_y
        cxx, cyy, cxy = cxx + x.T @ x, cyy + y.T @ y, cxy + x.T @ y
    return (mean_x, mean_y), tuple(c / max(n - 1, 1) for c in (cxx, cyy, cxy))


def _row_blocks(n: int, width: int, block_bytes: int = 4 << 20) -> list[slice]:
    """Slices of rows whose float64 copy stays in the cache."""
    return list(_chunks(n, max(256, block_bytes // (8 * width))))


def _row_moments(x: np.ndarray, normalize: bool, block_bytes: int = 4 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sample covariance) of the rows of `x` in float64, a float32 block at a time (two passes)."""
    blocks = _row_blocks(len(x), x.shape[1], block_bytes)
    total = 0.0
    for s in blocks:
        total = total + _prepare(x[s], normalize).sum(axis=0)
    mean, cov = total / len(x), 0.0
    for s in blocks:
        xc = _prepare(x[s], normalize) - mean
        cov = cov + xc.T @ xc
    return mean, cov / max(len(x) - 1, 1)


def _cross_products(train: PairedArrays, mean_x: np.ndarray, mean_y: np.ndarray, normalize: bool,
                    block_bytes: int = 4 << 20) -> np.ndarray:
    """Sum over the pairs (image row of each caption, caption) of the centred outer products."""
    out = 0.0
    for s in _row_blocks(train.n_texts, max(train.image.shape[1], train.text.shape[1]), block_bytes):
        x = _prepare(train.image[train.text_to_image[s]], normalize) - mean_x
        out = out + x.T @ (_prepare(train.text[s], normalize) - mean_y)
    return out


# --------------------------------------------------------------------------------------------
# shared by the anchor-based baselines (asif, nn-transfer)


@dataclass
class _CosineSpace:
    """x -> l2(x), optionally re-centred on the anchors' mean and l2-normalised again."""

    mean: torch.Tensor | None

    @classmethod
    def fit(cls, x: np.ndarray, center: bool) -> _CosineSpace:
        if not center:
            return cls(None)
        mean = F.normalize(_tensor(x), dim=1).mean(dim=0)
        return cls(mean)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1)
        if self.mean is not None:  # in place, F.normalize's arithmetic: a fresh 10M-row copy costs its page faults
            x.sub_(self.mean).div_(x.norm(2, 1, keepdim=True).clamp_min(1e-12))
        return x


_STATE_CLASSES.update(_AffineMap=_AffineMap, _CosineSpace=_CosineSpace)


SIMILARITY_BLOCK = BLOCK_FLOATS  # floats of one block of query x anchor similarities (128 MiB)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# --------------------------------------------------------------------------------------------
# asif


@register_baseline("asif")
@dataclass(eq=False)
class ASIF(Baseline):
    """ASIF relative representations: an item is its sparse similarities to the anchor pairs.

    Anchors are the training images that have at least one caption (one anchor per image, all
    its captions kept). An image is represented by its cosine similarities to the anchor images;
    a caption by its similarities to the anchor captions, aggregated per anchor image over that
    image's captions (``caption_aggregate``: ``"max"`` or ``"mean"``). Both live in the same
    anchor-index space ([n, n_anchors], dense). Only the top ``k`` similarities are kept, clipped
    at zero, raised to ``power``, then L2-normalised. ``center`` re-centres each side on its
    anchors' mean before the cosine (helps features that are all positive, e.g. CNN pools).
    Queries are processed ``batch_size`` rows at a time (captions: fewer where that many rows of
    similarities would pass ``SIMILARITY_BLOCK`` floats; images are scored against the anchors a
    block at a time), so memory is bounded besides the dense output.

    Defaults (k=800, power=8, as in the ASIF paper) measured on openclipart (val): power 4-8 is
    flat for any k in 50-2000 (27-28% mean recall; power 8 has the better R@1), power 1 collapses
    (9-23%); ``center`` +0.9 points; ``"max"`` beats ``"mean"`` by 0.5 points.
    """

    k: int = 800
    power: float = 8.0
    center: bool = True
    caption_aggregate: str = "max"
    batch_size: int = 1024

    def __post_init__(self) -> None:
        checks.integer("asif: k", self.k, minimum=1, error=BaselineError)
        checks.number("asif: power", self.power, minimum=0.0, strict=True, error=BaselineError)
        checks.flag("asif: center", self.center, error=BaselineError)
        checks.choice("asif: caption_aggregate", self.caption_aggregate, ("max", "mean"), error=BaselineError)
        checks.integer("asif: batch_size", self.batch_size, minimum=1, error=BaselineError)

    def _fit(self, train: PairedArrays) -> None:
        rows, anchor_of_text = _fit_anchor_spaces(self, train)
        self._anchor_text = self._spaces["text"](_tensor(train.text))
        self._anchor_of_text = _tensor(anchor_of_text)
        self._n_anchors = len(rows)
        self._fitted_info.update(out_dim=self._n_anchors, k=min(self.k, self._n_anchors))

    def _caption_similarities(self, q: torch.Tensor) -> torch.Tensor:
        sims = q @ self._anchor_text.T  # [b, Nt] -> [b, n_anchors]
        index = self._anchor_of_text.expand_as(sims)
        reduce = "amax" if self.caption_aggregate == "max" else "mean"
        out = torch.zeros(len(q), self._n_anchors, dtype=sims.dtype)
        return out.scatter_reduce_(1, index, sims, reduce=reduce, include_self=False)

    def _top(self, side: str, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if side == "image":
            return bank_top_k(q, self._bank("_anchor_image"), k, SIMILARITY_BLOCK)
        return top_k(self._caption_similarities(q), k)

    def _encode(self, side: str, x: torch.Tensor) -> torch.Tensor:
        q = self._spaces[side](x)
        k = min(self.k, self._n_anchors)
        out = torch.zeros(len(q), self._n_anchors)
        # a caption's [rows, captions] similarities at a time (an image's are scored in bank blocks)
        rows = self.batch_size if side == "image" else max(1, SIMILARITY_BLOCK // max(1, len(self._anchor_text)))
        for part in _chunks(len(q), min(self.batch_size, rows)):
            vals, idx = self._top(side, q[part], k)
            vals = vals.clamp(min=0.0)
            # divide by the row max before the power: same direction, no float underflow
            vals = (vals / vals[:, :1].clamp(min=1e-12)).pow(self.power)
            out[part].scatter_(1, idx, vals)
        return out


def _fit_anchor_spaces(model: Baseline, train: PairedArrays) -> tuple[np.ndarray, np.ndarray]:
    """Anchors = training images with a caption: fit each side's cosine space, embed the anchors."""
    rows, anchor_of_text = train.captioned_images()
    anchor_images = train.image[rows]
    model._spaces = {
        "image": _CosineSpace.fit(anchor_images, model.center),
        "text": _CosineSpace.fit(train.text, model.center),
    }
    model._anchor_image = model._spaces["image"](_tensor(anchor_images))
    return rows, anchor_of_text


# --------------------------------------------------------------------------------------------
# nearest-neighbour caption transfer


@register_baseline("nn-transfer")
@dataclass(eq=False)
class NNTransfer(Baseline):
    """Nearest-neighbour caption transfer: the shared space is the text space.

    An image is the weighted mean of the text embeddings of the captions of its ``k`` nearest
    training images (cosine in the image space; an image's captions are averaged first, so every
    neighbour image counts once). ``weighting``: ``"mean"`` (uniform) or ``"softmax"`` (of the
    neighbour similarities divided by ``temperature``). A caption is its own text embedding.
    ``center`` re-centres both spaces on the training mean before the cosine. A training image
    retrieves itself as its first neighbour; evaluate on held-out rows.

    Defaults measured on openclipart (val): softmax weighting (temperature 0.03-0.1, k 10-50)
    ~23% mean recall vs 21-22% for the plain mean at k 5-10 (15% at k=50); ``center`` +0.4.

    ``bank`` caps the rows searched (None or 0: every training image). With more training
    images than ``bank``, the bank is reduced (`_reduce_bank`, seeded by ``bank_seed``) to
    ``bank`` k-means centroids of the embedded images, each with the mean caption embedding of
    its members (``bank_reduction: kmeans``), or to the member nearest each centroid, with its
    own captions (``subsample``). ``member_weighted`` adds log(member count) to each bank row's
    softmax logit (a centroid speaks for its members). The saved state has the same shape either way.
    Chosen on openclipart's fold 0 val (`benchmarks/bounded_blend.py`; suite score, full bank 62.6):
    kmeans 59.9 / 59.9 at bank 2000 / 500, with member weights 60.7 / 59.6; subsample 58.9 / 54.1.
    """

    k: int = 10
    weighting: str = "softmax"
    temperature: float = 0.05
    center: bool = True
    batch_size: int = 1024
    bank: int | None = None
    bank_reduction: str = "kmeans"
    bank_seed: int = 0
    member_weighted: bool = False

    def __post_init__(self) -> None:
        checks.integer("nn-transfer: k", self.k, minimum=1, error=BaselineError)
        checks.choice("nn-transfer: weighting", self.weighting, ("mean", "softmax"), error=BaselineError)
        checks.number("nn-transfer: temperature", self.temperature, minimum=0.0, strict=True, error=BaselineError)
        checks.flag("nn-transfer: center", self.center, error=BaselineError)
        checks.integer("nn-transfer: batch_size", self.batch_size, minimum=1, error=BaselineError)
        if self.bank is not None:
            checks.integer("nn-transfer: bank (the most bank rows; 0 or null: all)", self.bank, minimum=0,
                           error=BaselineError)
        checks.choice("nn-transfer: bank_reduction", self.bank_reduction, BANK_REDUCTIONS, error=BaselineError)
        checks.integer("nn-transfer: bank_seed", self.bank_seed, minimum=0, error=BaselineError)
        checks.flag("nn-transfer: member_weighted", self.member_weighted, error=BaselineError)

    def _fit(self, train: PairedArrays) -> None:
        rows, anchor_of_text = _fit_anchor_spaces(self, train)
        captions = self._spaces["text"](_tensor(train.text))
        index = _tensor(anchor_of_text)
        sums = torch.zeros(len(rows), captions.shape[1]).index_add_(0, index, captions)
        counts = torch.bincount(index, minlength=len(rows)).clamp(min=1)
        self._anchor_text = sums / counts[:, None].to(sums.dtype)
        if self.bank and len(rows) > self.bank:
            images, texts, members = _reduce_bank(self._anchor_image.numpy(), self._anchor_text.numpy(),
                                                  self.bank, self.bank_reduction, self.bank_seed)
            self._anchor_image, self._anchor_text = torch.from_numpy(images), torch.from_numpy(texts)
            self._anchor_members = torch.from_numpy(members)
            self._fitted_info.update(bank=len(images), bank_from=len(rows))
        self._fitted_info.update(out_dim=train.text.shape[1], k=min(self.k, len(self._anchor_image)))

    def _logit_offsets(self) -> torch.Tensor | None:
        """log(member count) of each bank row when the softmax weighs centroids by their members."""
        members = getattr(self, "_anchor_members", None)
        if not self.member_weighted or members is None:
            return None
        return torch.log(members.to(torch.float32))

    def _encode(self, side: str, x: torch.Tensor) -> torch.Tensor:
        q = self._spaces[side](x)
        if side == "text":
            return q
        k = min(self.k, len(self._anchor_image))
        offsets = self._logit_offsets()
        out = torch.empty(len(q), self._anchor_text.shape[1])
        for part in _chunks(len(q), self.batch_size):  # the bank is scored in blocks of SIMILARITY_BLOCK
            sims, idx = bank_top_k(q[part], self._bank("_anchor_image"), k, SIMILARITY_BLOCK)
            if self.weighting == "softmax":
                logits = sims / self.temperature if offsets is None else sims / self.temperature + offsets[idx]
                weights = torch.softmax(logits, dim=1)
            else:
                weights = torch.full_like(sims, 1.0 / k)
            out[part] = torch.einsum("bk,bkd->bd", weights, self._anchor_text[idx])
        return out


# --------------------------------------------------------------------------------------------
# the bounded bank of nn-transfer: a seeded spherical k-means over the embedded training images

BANK_REDUCTIONS = ("kmeans", "subsample")
KMEANS_ITERATIONS = 20  # Lloyd passes at most (they stop early once no centroid moves)
KMEANS_SAMPLE_PER_CENTROID = 32  # rows the centroids are fitted on, per centroid: the cost is bounded, not O(n)


def _reduce_bank(images: np.ndarray, texts: np.ndarray, size: int, reduction: str,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bank images, their caption embeddings, member counts): at most `size` rows standing for
    the unit-length `images` [n, d] and their mean captions `texts` [n, dt].

    ``kmeans``: each centroid's members (every image's nearest centroid) averaged, the image
    side renormalised to unit length, each image counting once on the caption side.
    ``subsample``: the member nearest each centroid, its own captions (real rows, one per
    cluster: a sample that covers the space). A centroid left without members is dropped."""
    centroids = _spherical_kmeans(images, size, seed)
    labels, sims = _nearest_centroid(images, centroids)
    image_sums, members = _member_sums(images, labels, size)
    kept = np.flatnonzero(members)
    if reduction == "subsample":
        by_cluster = np.lexsort((-sims, labels))  # each cluster's rows, nearest first (ties: lower row)
        first = by_cluster[np.r_[0, np.flatnonzero(np.diff(labels[by_cluster])) + 1]]
        return images[first], texts[first], members[kept].astype(np.float32)
    text_sums, _ = _member_sums(texts, labels, size)
    bank_images = _l2_rows(image_sums[kept]).astype(np.float32)
    bank_texts = (text_sums[kept] / members[kept, None]).astype(np.float32)
    return bank_images, bank_texts, members[kept].astype(np.float32)


def _spherical_kmeans(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` unit-length centroids of the unit rows `x` (cosine k-means), fitted on a seeded
    sample of at most KMEANS_SAMPLE_PER_CENTROID * size rows, started from `size` of its rows."""
    rng = np.random.default_rng([seed, size])
    cap = KMEANS_SAMPLE_PER_CENTROID * size
    sample = x if len(x) <= cap else x[np.sort(rng.choice(len(x), cap, replace=False))]
    centroids = sample[np.sort(rng.choice(len(sample), size, replace=False))]
    for _ in range(KMEANS_ITERATIONS):
        labels, sims = _nearest_centroid(sample, centroids)
        sums, members = _member_sums(sample, labels, size)
        moved = _l2_rows(sums).astype(np.float32)
        empty = np.flatnonzero(members == 0)  # restarted at the rows their centroids fit worst
        moved[empty] = sample[np.argsort(sims, kind="stable")[: len(empty)]]
        if np.array_equal(moved, centroids):
            break
        centroids = moved
    return centroids


def _nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid (the lowest index on ties) and its cosine, in blocks."""
    labels, sims = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    for part in _chunks(len(x), max(1, SIMILARITY_BLOCK // len(centroids))):
        block = x[part] @ centroids.T
        labels[part] = block.argmax(axis=1)
        sims[part] = np.take_along_axis(block, labels[part, None], 1)[:, 0]
    return labels, sims


def _member_sums(x: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum of each cluster's rows in float64 [size, d], member counts [size])."""
    sums = torch.zeros(size, x.shape[1], dtype=torch.float64)
    for part in _chunks(len(x), max(1, SIMILARITY_BLOCK // max(1, x.shape[1]))):
        sums.index_add_(0, torch.from_numpy(labels[part]), torch.from_numpy(x[part]).double())
    return sums.numpy(), np.bincount(labels, minlength=size)
