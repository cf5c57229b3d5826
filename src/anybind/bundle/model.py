"""A loaded bundle: frozen encoders + the bound model behind one API.

    model = anybind.load("bundles/openclipart")
    z = model.encode_text(["a red bird"])                 # [1, D], L2-normalised
    probs = model.classify(["cat.png"], ["cat", "dog"])    # [1, 2]
    z = model.encode_audio(["bird.wav", (samples, 44100)])  # with an audio modality (train --add)

A bundle binds any number of modalities: the jointly trained ones (image, text) and those added
onto one of them later (`anybind train --add`); `modalities` lists them all, `joint` and `added`
say which is which.

Encoders are created on first use (a text-only user never loads the image encoder), at the
layers, pooling and compute precision the bound model was trained on, and their features are
rounded as the stores held them, so the embeddings are the ones the bundle was evaluated with.
Torch is imported on first use, not when this module is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AnybindError

if TYPE_CHECKING:
    import torch

    from ..align.bound import BoundModel

BUNDLE_FORMAT = "anybind.bundle/2"  # 2: one bound model folder (model/) instead of projectors/, blend/, correction/
MODEL_DIR = "model"
#: what a bare numpy array given as audio is taken to be sampled at (Hz); give (array, rate) otherwise
AUDIO_RATE = 16000


class BundleError(AnybindError):
    """A folder that is not a readable bundle, or a request the bundle cannot serve."""


class Bundle:
    """Encode raw items of any bound modality into the shared space."""

    def __init__(self, path: Path, info: dict, bound: BoundModel, card: dict | None = None, device: str = "cpu"):
        from ..device import select_device

        self.path, self.info, self.bound = path, info, bound
        self.card = card or {}
        self.device = select_device(device)
        self._encoders: dict[str, Any] = {}

    # ---- what it is ----------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.info["modalities"])

    @property
    def joint(self) -> list[str]:
        """The modalities trained together (the rest were added onto one of them)."""
        return list(self.info.get("joint") or self.bound.layers)

    @property
    def added(self) -> dict[str, str]:
        """Each added modality -> the modality whose space it was bound into."""
        return {m: self.bound.bound_to(m) for m in self.modalities if m not in self.joint}

    def side(self, modality: str) -> str:
        """The side (image / text) `modality` ranks as: an added modality ranks as its target."""
        self._check(modality)
        return self.bound.side(modality)

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def default_labels(self) -> list[str]:
        """The classes the bundle was evaluated on (zero-shot), for a label set nobody gave."""
        return list(self.card.get("zeroshot_classes") or [])

    def __repr__(self) -> str:
        enc = ", ".join(f"{m}={v['encoder']}" for m, v in self.info["modalities"].items())
        return f"Bundle({self.path}, {enc}, dim={self.dim})"

    # ---- encoding ------------------------------------------------------------------------------
    def _check(self, modality: str) -> None:
        if modality not in self.info["modalities"]:
            raise BundleError(f"this bundle binds {', '.join(self.modalities)}, not '{modality}'"
                              + (": add it with `anybind train --add` and export that run" if modality == "audio" else ""))

    def encoder(self, modality: str):
        self._check(modality)
        if modality not in self._encoders:
            from ..encoders import create_encoder

            self._encoders[modality] = create_encoder(self.info["modalities"][modality]["encoder"]).to(self.device)
        return self._encoders[modality]

    def features(self, modality: str, items: Sequence[Any], batch_size: int = 64) -> list[torch.Tensor]:
        """The frozen encoder's features of raw items, per layer, as the stores held them."""
        from ..features.encode import encode_as_stored

        self._check(modality)
        items = _audio_items(items) if modality == "audio" else _items(items)
        if not items:
            raise BundleError(f"no {modality} items to encode")
        enc = self.encoder(modality)
        side = self.info["modalities"][modality]
        return encode_as_stored(enc, items, side["layers"], side.get("pooling"), side.get("precision"),
                                side.get("dtype", "float16"), batch_size)

    def project(self, modality: str, feats: list[torch.Tensor]) -> torch.Tensor:
        """Shared-space rows (L2-normalised by the bound model) of features the bundle's encoder
        gave (see `features`)."""
        import torch

        with torch.inference_mode():
            return self.bound.encode(modality, feats).float()

    def encode(self, modality: str, items: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """Shared-space embeddings [n, dim], L2-normalised: images as paths, PIL images or arrays;
        texts as strings; audio as paths (WAV, FLAC, OGG, MP3; tar://), bytes, ``(array, rate)``
        pairs or 1-D numpy arrays (taken as `AUDIO_RATE`, 16 kHz). A bad item raises a DataError
        with the reason (unreadable, empty, silent, clipped)."""
        return self.project(modality, self.features(modality, items, batch_size))

    def encode_image(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        return self.encode("image", images, batch_size)

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return self.encode("text", texts, batch_size)

    def encode_audio(self, clips: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
        """Audio clips (see `encode`) -> [n, dim]."""
        return self.encode("audio", clips, batch_size)

    # ---- zero-shot -----------------------------------------------------------------------------
    def class_embeddings(self, labels: Sequence[str], templates: str | Sequence[str] | None = None) -> torch.Tensor:
        from ..evaluate.zeroshot import class_embeddings, load_templates

        templates = templates or self.card.get("templates") or "default"
        tmpl = load_templates(templates) if isinstance(templates, str) else list(templates)
        return class_embeddings(list(labels), self.encode_text, tmpl)

    def classify(self, images: Sequence[Any], labels: Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None, scale: float = 100.0,
                 modality: str = "image") -> torch.Tensor:
        """Zero-shot class probabilities [n items, n labels]: softmax of `scale` x cosine with the
        labels' prompt embeddings. `modality` says what the items are (image, or audio, ...)."""
        import torch

        self._check(modality)
        labels = list(labels or self.default_labels)
        if not labels:
            raise BundleError("give the labels to classify into (this bundle names no default classes)")
        cls = self.class_embeddings(labels, templates)
        return torch.softmax(scale * self.encode(modality, images) @ cls.T, dim=1)

    # ---- retrieval corrections (what the index applies to its gallery) -------------------------
    def gallery(self, modality: str, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gallery embeddings as the evaluated model ranked them, and a per-item score offset
        (subtract it from every query's cosine); (emb, None) without a correction."""
        return self.bound.gallery(modality, emb)

    @property
    def correction(self):
        return self.bound.correction


def _items(items: Any) -> list:
    """A single item (a string, bytes) or a sequence of items, as a list."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) and not hasattr(items, "__len__"):
        return [items]
    return list(items)


def _audio_items(items: Any) -> list:
    """Audio clips as a list; one clip (a path, bytes, a 1-D array, an (array, rate) pair) counts
    as a list of one. A bare array is taken as samples at `AUDIO_RATE`, whatever rate the encoder reads."""
    import numpy as np

    one = (isinstance(items, (str, bytes, bytearray, os.PathLike, np.ndarray)) or _is_pair(items)
           or hasattr(items, "read"))
    clips = [items] if one else list(items)
    return [(x, AUDIO_RATE) if isinstance(x, np.ndarray) else x for x in clips]


def _is_pair(x: Any) -> bool:
    import numpy as np

    return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], np.ndarray)
            and isinstance(x[1], (int, np.integer)) and not isinstance(x[1], bool))


def read_info(path: str | os.PathLike) -> dict:
    """A bundle's bundle.json, checked for its format (no torch needed)."""
    path = Path(path)
    try:
        info = json.loads((path / "bundle.json").read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not an anybind bundle (bundle.json unreadable: {e}); "
                          "make one with `anybind export`") from e
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise BundleError(f"{path}: bundle format {found!r}; this anybind reads {BUNDLE_FORMAT}: train the run "
                          "again with this version, then `anybind export --run RUN --out OUT --overwrite`")
    return info


def is_bundle(path: str | os.PathLike) -> bool:
    """A folder anybind wrote as a bundle, of this format or an older one (safe to replace)."""
    try:
        info = json.loads((Path(path) / "bundle.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and str(info.get("format", "")).startswith("anybind.bundle/")


def load(path: str | os.PathLike, device: str = "cpu") -> Bundle:
    """Load a bundle folder written by `anybind export` (no pickles; offline with packaged encoders).

    >>> model = load("bundles/openclipart")  # doctest: +SKIP
    >>> model.encode_text(["a red bird"]).shape  # doctest: +SKIP
    torch.Size([1, 896])
    """
    from ..align.bound import BoundModel

    path = Path(path)
    info = read_info(path)
    bound = BoundModel.load(path / MODEL_DIR)
    card = json.loads((path / "card.json").read_text()) if (path / "card.json").exists() else {}
    return Bundle(path, info, bound, card, device)


