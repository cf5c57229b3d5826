"""A bundle exported with ``anybind export --onnx``, run with onnxruntime + numpy + Pillow + tokenizers.

    from anybind.runtime import load
    model = load("bundles/openclipart")           # no torch imported, here or later
    z = model.encode_text(["a red bird"])         # [1, dim] float32, L2-normalised
    g, offset = model.gallery("image", model.encode_image(["cat.png"]))

Each modality's graph (`anybind.bundle.onnx_export`) gives the projector's output and the features
the blend reads; the blend and the retrieval correction run here in numpy, from the bundle's
``model/`` folder. Graphs are opened on first use, so a text-only user never loads the image one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.model import MODEL_DIR, BundleError, read_info
from ..bundle.onnx_export import ONNX_DIR, ONNX_FORMAT, read_onnx_info
from ..errors import DataError
from .blend import Baseline, l2, read_saved_part
from .correction import Correction
from .images import open_image, pixels
from .text import Tokenize, caption

ANCHOR_SIDE, PARTNER_SIDE = "image", "text"


class RuntimeBundleError(BundleError):
    """A bundle the torch-free runtime cannot run (no graphs, a damaged graph), or a request it cannot serve."""


class RuntimeBundle:
    """Encode raw images and captions into a bundle's shared space without torch (see the module docstring)."""

    def __init__(self, path: Path, threads: int | None = None):
        self.path, self.threads = Path(path), threads
        self.info = read_info(self.path)
        self.onnx = read_onnx_info(self.path)
        if self.onnx.get("format") != ONNX_FORMAT:
            raise RuntimeBundleError(f"{self.path}/{ONNX_DIR}: format {self.onnx.get('format')!r}; this runtime reads "
                                     f"{ONNX_FORMAT}: export the bundle again with --onnx")
        self.config = json.loads((self.path / MODEL_DIR / "config.json").read_text())
        parts = set(self.config.get("parts", []))
        self.baseline = Baseline(self.path / MODEL_DIR / "baseline") if "baseline" in parts else None
        self.correction = Correction(self.path / MODEL_DIR / "correction") if "correction" in parts else None
        self.weight = float(self.config.get("weight", 1.0))
        # per-modality means subtracted before the final normalisation (`BoundModel.centred`)
        self.centres = read_saved_part(self.path / MODEL_DIR / "centring", "centring")[1] if "centring" in parts else {}
        self._sessions: dict[str, Any] = {}
        self._tokenizers: dict[str, Tokenize] = {}

    # ---- what it is ------------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.info["modalities"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def side(self, modality: str) -> str:
        """image / text: the side the blend and the correction name `modality` by (added: its target's)."""
        self._check(modality)
        to = (self.config.get("added") or {}).get(modality, {}).get("to", modality)
        return ANCHOR_SIDE if to == self.config["anchor"] else PARTNER_SIDE

    def __repr__(self) -> str:
        return f"RuntimeBundle({self.path}, {', '.join(self.modalities)}, dim={self.dim})"

    def _check(self, modality: str) -> None:
        if modality not in self.info["modalities"]:
            raise RuntimeBundleError(f"this bundle binds {', '.join(self.modalities)}, not '{modality}'")
        if modality not in self.onnx["modalities"]:
            raise RuntimeBundleError(f"{self.path} holds no ONNX graph for '{modality}': export it with --onnx")

    # ---- the graphs ---------------------------------------------------------------------------
    def session(self, modality: str):
        """The onnxruntime session of `modality`'s graph (opened once)."""
        self._check(modality)
        if modality not in self._sessions:
            import onnxruntime as ort

            path = self.path / ONNX_DIR / self.onnx["modalities"][modality]["graph"]
            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            try:
                self._sessions[modality] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for missing or corrupt files
                raise RuntimeBundleError(f"{path} is not a loadable ONNX graph ({type(e).__name__}: {e}); "
                                         "export the bundle again with --onnx") from e
        return self._sessions[modality]

    def inputs(self, modality: str, items: Sequence[Any]) -> dict[str, np.ndarray]:
        """The graph inputs of raw items: pixel arrays or token ids (a bad item raises DataError)."""
        entry = self.onnx["modalities"][modality]
        pre = entry["preprocess"]
        if pre["kind"] == "image":
            return {"pixels": np.stack([pixels(open_image(x, pre.get("min_side")), pre) for x in items])}
        if modality not in self._tokenizers:
            self._tokenizers[modality] = Tokenize(pre, self.path / ONNX_DIR, entry["inputs"])
        return self._tokenizers[modality]([caption(x) for x in items])

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, modality: str, items: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """Shared-space embeddings [n, dim] float32, L2-normalised: images as paths, bytes, PIL images
        or arrays; captions as strings."""
        self._check(modality)
        items = _as_list(items)
        if not items:
            raise RuntimeBundleError(f"no {modality} items to encode")
        session = self.session(modality)
        out = []
        for lo in range(0, len(items), batch_size):
            got = session.run(None, self.inputs(modality, items[lo : lo + batch_size]))
            out.append(self._combine(modality, dict(zip(self.onnx["modalities"][modality]["outputs"], got))))
        return np.concatenate(out)

    def encode_image(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        return self.encode("image", images, batch_size)

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        return self.encode("text", texts, batch_size)

    def _combine(self, modality: str, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The bound model's encode: projector space and blend side by side, [sqrt(w) z1, sqrt(1-w) z2]."""
        parts = []
        if "space" in outputs:
            parts.append(outputs["space"].astype(np.float32))
        if "blend_input" in outputs:
            parts.append(self.baseline.encode(self.side(modality), outputs["blend_input"]))
        if modality in self.centres:  # each normalised run centred on its own: the mean / its share's sqrt
            shares = [self.weight, 1 - self.weight] if len(parts) == 2 else [1.0]
            bounds = np.cumsum([0, *(p.shape[1] for p in parts)])
            parts = [l2(p - self.centres[modality][lo:hi] / s**0.5)
                     for p, lo, hi, s in zip(parts, bounds[:-1], bounds[1:], shares)]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([parts[0] * self.weight**0.5, parts[1] * (1 - self.weight) ** 0.5], axis=1)

    # ---- retrieval ------------------------------------------------------------------------------
    def gallery(self, modality: str, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Gallery rows as the model ranks them and a per-row offset (subtract it from each query's cosine)."""
        if self.correction is None:
            return emb, None
        return self.correction.gallery(self.side(modality), emb)

    def rank_scores(self, queries: np.ndarray, gallery: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        """[queries, gallery] ranking keys (higher first): cosine, corrected as the model ranks."""
        cosines = queries @ gallery.T
        return cosines if self.correction is None else self.correction.rank_scores(cosines, offset)


def _as_list(items: Any) -> list:
    if isinstance(items, (str, bytes, np.ndarray)) or not isinstance(items, Sequence):
        return [items]
    return list(items)


def load(path: str | os.PathLike, threads: int | None = None) -> RuntimeBundle:
    """Load a bundle exported with ``anybind export --onnx`` (`threads`: onnxruntime's intra-op threads)."""
    try:
        return RuntimeBundle(Path(path), threads)
    except DataError:
        raise
    except BundleError as e:
        raise RuntimeBundleError(str(e)) from e
