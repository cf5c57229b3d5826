"""A loaded bundle: frozen encoders + projectors (+ blend, + retrieval correction) behind one API.

    model = anybind.load("bundles/openclipart")
    z = model.encode_text(["a red bird"])                 # [1, D], L2-normalised
    probs = model.classify(["cat.png"], ["cat", "dog"])    # [1, 2]

Encoders are created on first use (a text-only user never loads the image encoder), at the
layers, pooling and compute precision the projectors were trained on, so the embeddings are the
ones the bundle was evaluated with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import AnybindError

BUNDLE_FORMAT = "anybind.bundle/1"


class BundleError(AnybindError):
    """A folder that is not a readable bundle, or a request the bundle cannot serve."""


class BoundEncoders:
    """Encode raw items of any bound modality into the shared space."""

    def __init__(self, path: Path, info: dict, space, correction=None, card: dict | None = None, device: str = "cpu"):
        self.path, self.info, self.space, self.correction = path, info, space, correction
        self.card = card or {}
        self.device = torch.device(device)
        self._encoders: dict[str, Any] = {}

    # ---- what it is ----------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.info["modalities"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def default_labels(self) -> list[str]:
        """The classes the bundle was evaluated on (zero-shot), for a label set nobody gave."""
        return list(self.card.get("zeroshot_classes") or [])

    def __repr__(self) -> str:
        enc = ", ".join(f"{m}={v['encoder']}" for m, v in self.info["modalities"].items())
        return f"BoundEncoders({self.path}, {enc}, dim={self.dim})"

    # ---- encoding ------------------------------------------------------------------------------
    def encoder(self, modality: str):
        if modality not in self.info["modalities"]:
            raise BundleError(f"this bundle binds {', '.join(self.modalities)}, not '{modality}'")
        if modality not in self._encoders:
            from ..encoders import create_encoder

            self._encoders[modality] = create_encoder(self.info["modalities"][modality]["encoder"]).to(self.device)
        return self._encoders[modality]

    def features(self, modality: str, items: Sequence[Any], batch_size: int = 64) -> list[torch.Tensor]:
        """The frozen encoder's features of raw items, per layer, as the stores held them."""
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) and not hasattr(items, "__len__"):
            items = [items]
        items = list(items)
        if not items:
            raise BundleError(f"no {modality} items to encode")
        enc = self.encoder(modality)  # refuses a modality the bundle does not bind
        side = self.info["modalities"][modality]
        layers, pooling = side["layers"], side.get("pooling")
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if side.get("precision") == "bf16"
               else nullcontext())
        out: list[list[torch.Tensor]] = [[] for _ in layers]
        with torch.inference_mode(), ctx:
            for lo in range(0, len(items), batch_size):
                got = enc.embed(items[lo : lo + batch_size], layers, pooling)
                for i, lay in enumerate(layers):
                    # the stores keep fp16: round the same way so a bundle reproduces its evaluation
                    out[i].append(got[lay].float().cpu().to(torch.float16).float())
        return [torch.cat(o) for o in out]

    def encode(self, modality: str, items: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """Shared-space embeddings [n, dim], L2-normalised: images as paths, PIL images or arrays;
        texts as strings."""
        with torch.inference_mode():
            z = self.space.encode(modality, self.features(modality, items, batch_size))
        return F.normalize(z.float(), dim=1)

    def encode_image(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        return self.encode("image", images, batch_size)

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return self.encode("text", texts, batch_size)

    # ---- zero-shot -----------------------------------------------------------------------------
    def class_embeddings(self, labels: Sequence[str], templates: str | Sequence[str] | None = None) -> torch.Tensor:
        from ..evaluate.zeroshot import class_embeddings, load_templates

        templates = templates or self.card.get("templates") or "default"
        tmpl = load_templates(templates) if isinstance(templates, str) else list(templates)
        return class_embeddings(list(labels), self.encode_text, tmpl)

    def classify(self, images: Sequence[Any], labels: Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None, scale: float = 100.0) -> torch.Tensor:
        """Zero-shot class probabilities [n images, n labels]: softmax of `scale` x cosine."""
        labels = list(labels or self.default_labels)
        if not labels:
            raise BundleError("give the labels to classify into (this bundle names no default classes)")
        cls = self.class_embeddings(labels, templates)
        return torch.softmax(scale * self.encode_image(images) @ cls.T, dim=1)

    # ---- retrieval corrections (what the index applies to its gallery) -------------------------
    def gallery(self, modality: str, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gallery embeddings as the evaluated model ranked them, and a per-item score offset
        (subtract it from every query's cosine); (emb, None) without a correction."""
        if self.correction is None:
            return emb, None
        return self.correction.gallery(modality, emb)


def load(path: str | os.PathLike, device: str = "cpu") -> BoundEncoders:
    """Load a bundle folder written by `anybind export` (no pickles; offline with packaged encoders).

    >>> model = load("bundles/openclipart")  # doctest: +SKIP
    >>> model.encode_text(["a red bird"]).shape  # doctest: +SKIP
    torch.Size([1, 896])
    """
    path = Path(path)
    try:
        info = json.loads((path / "bundle.json").read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not an anybind bundle (bundle.json unreadable: {e}); "
                          "make one with `anybind export`") from e
    if info.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: bundle format {info.get('format')!r}; this anybind reads {BUNDLE_FORMAT}")
    from ..align.model import BoundModel

    space = BoundModel.load(path / "projectors")
    blend = info.get("blend") or {}
    if blend.get("name", "none") != "none":
        from ..align.baselines import Baseline
        from ..evaluate.suite import BaselineEmbedder, BlendEmbedder

        base = BaselineEmbedder(Baseline.load(path / "blend"), {m: m for m in info["modalities"]})
        space = BlendEmbedder(space, base, blend["weight"])
    correction = None
    if (info.get("correction") or {}).get("name", "none") != "none":
        from ..align.corrections import RetrievalCorrection

        correction = RetrievalCorrection.load(path / "correction")
    card = json.loads((path / "card.json").read_text()) if (path / "card.json").exists() else {}
    return BoundEncoders(path, info, space, correction, card, device)
