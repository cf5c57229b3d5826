"""The blend's training-free baseline in numpy: the bundle's ``model/baseline`` folder, read as saved.

The same maps as `anybind.align.baselines` (procrustes, cca, nn-transfer, asif), from the same
``config.json`` + ``weights.safetensors``, in float32. A caption-transfer bank stays an array
here: it is data the map searches, not a computation a graph should hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnybindError
from .safetensors_np import load_arrays


def l2(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (as torch's F.normalize: eps 1e-12)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def read_saved_part(directory: Path, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, arrays) of a saved part (`anybind.saving` format 2)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise AnybindError(f"{directory} is not a readable saved {kind} ({e}): export the bundle again") from e
    if config.get("kind") != kind or config.get("format") != 2:
        raise AnybindError(f"{directory} holds a {config.get('kind')!r} of format {config.get('format')!r}, not a "
                           f"{kind} of format 2: export the bundle again with this anybind")
    weights = directory / "weights.safetensors"
    return config, (load_arrays(weights) if weights.exists() else {})


def _unflatten(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The fitted state as saved by `align.baselines._flatten` ($tensor, $numpy, $dict, $object)."""
    if isinstance(value, dict) and ("$tensor" in value or "$numpy" in value):
        arr = arrays[value.get("$tensor") or value["$numpy"]]
        return arr.astype(np.float32, copy=False) if arr.dtype.kind == "f" else arr
    if isinstance(value, dict) and "$dict" in value:
        return {k: _unflatten(v, arrays) for k, v in value["$dict"].items()}
    if isinstance(value, dict) and "$object" in value:
        return {k: _unflatten(v, arrays) for k, v in value["fields"].items()}
    return value


class Baseline:
    """A fitted baseline: `encode(side, x)` -> L2-normalised rows in its shared space."""

    def __init__(self, directory: Path):
        config, arrays = read_saved_part(directory, "baseline")
        self.name, self.options = config["name"], config.get("options", {})
        self.state = {k: _unflatten(v, arrays) for k, v in config.get("state", {}).items()}
        self.cache: dict = {}  # derived from the state on first use
        if self.name not in _ENCODERS:
            raise AnybindError(f"the bundle blends with the '{self.name}' baseline, which anybind.runtime does not "
                               f"run (it runs {', '.join(_ENCODERS)})")

    def encode(self, side: str, x: np.ndarray) -> np.ndarray:
        want = self.state["_input_dims"][side]
        if x.ndim != 2 or x.shape[1] != want:
            raise AnybindError(f"{side} features of shape {x.shape} for the '{self.name}' baseline, fitted on "
                               f"dimension {want}")
        return l2(_ENCODERS[self.name](self, side, x.astype(np.float32)).astype(np.float32))


def _affine(b: Baseline, side: str, x: np.ndarray) -> np.ndarray:
    m = b.state["_maps"][side]
    return ((l2(x) if m["normalize"] else x) - m["mean"]) @ m["matrix"]


def _cosine_space(b: Baseline, side: str, x: np.ndarray) -> np.ndarray:
    mean = b.state["_spaces"][side]["mean"]
    x = l2(x)
    return x if mean is None else l2(x - mean)


def _top_k(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of each row, largest first, and their columns; among equal values the lowest
    column first (the rule of `anybind.align.topk.top_k`: a bank's duplicate images tie exactly)."""
    if k >= sims.shape[1]:
        idx = np.tile(np.arange(sims.shape[1]), (len(sims), 1))
    else:
        idx = np.argpartition(-sims, k, axis=1)[:, : k + 1]  # the k + 1 largest, unordered
    vals = np.take_along_axis(sims, idx, 1)
    order = np.lexsort((idx, -vals), axis=1)
    vals, idx = np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1)
    if k < sims.shape[1]:
        for row in np.flatnonzero(vals[:, k - 1] == vals[:, k]):  # the k-th place is contested
            idx[row] = np.lexsort((np.arange(sims.shape[1]), -sims[row]))[: k + 1]
            vals[row] = sims[row, idx[row]]
    return vals[:, :k], idx[:, :k]


def _bank_scores(b: Baseline, q: np.ndarray, attribute: str) -> np.ndarray:
    """Queries against every row of a bank; exact copies get the very same score (a matrix product
    can give two equal rows scores one ulp apart, and the tie rule must see them tie)."""
    if attribute not in b.cache:
        unique, inverse = np.unique(b.state[attribute], axis=0, return_inverse=True)
        b.cache[attribute] = (unique, inverse.ravel())
    unique, inverse = b.cache[attribute]
    return (q @ unique.T)[:, inverse]


def _nn_transfer(b: Baseline, side: str, x: np.ndarray) -> np.ndarray:
    q = _cosine_space(b, side, x)
    if side == "text":
        return q
    anchors, texts = b.state["_anchor_image"], b.state["_anchor_text"]
    sims, idx = _top_k(_bank_scores(b, q, "_anchor_image"), min(int(b.options["k"]), len(anchors)))
    if b.options["weighting"] == "softmax":
        logits = sims / float(b.options["temperature"])
        if b.options.get("member_weighted") and "_anchor_members" in b.state:  # a reduced bank's centroids
            logits = logits + np.log(b.state["_anchor_members"])[idx]
        weights = np.exp(logits - logits.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
    else:
        weights = np.full_like(sims, 1.0 / sims.shape[1])
    return np.einsum("bk,bkd->bd", weights, texts[idx])


def _asif(b: Baseline, side: str, x: np.ndarray) -> np.ndarray:
    q = _cosine_space(b, side, x)
    n = int(b.state["_n_anchors"])
    if side == "image":
        sims = _bank_scores(b, q, "_anchor_image")
    else:  # each anchor image: the max (or mean) over its captions
        per_caption, owner = q @ b.state["_anchor_text"].T, b.state["_anchor_of_text"].astype(np.int64)
        sims = np.zeros((len(q), n), np.float32)
        if b.options["caption_aggregate"] == "max":
            sims[:] = -np.inf
            np.maximum.at(sims.T, owner, per_caption.T)
        else:
            np.add.at(sims.T, owner, per_caption.T)
            sims /= np.maximum(np.bincount(owner, minlength=n), 1)
    vals, idx = _top_k(sims, min(int(b.options["k"]), n))
    vals = np.clip(vals, 0.0, None)
    vals = (vals / np.maximum(vals[:, :1], 1e-12)) ** float(b.options["power"])
    out = np.zeros((len(q), n), np.float32)
    np.put_along_axis(out, idx, vals, 1)
    return out


_ENCODERS = {"procrustes": _affine, "cca": _affine, "nn-transfer": _nn_transfer, "asif": _asif}
