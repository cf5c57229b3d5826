"""The Encoder contract every backend adapter meets.

An encoder turns a batch of items of one modality into features at named layers:
``layer.0`` (embeddings) ... ``layer.L`` (last block) and ``final`` (the model's own output
embedding). Backend node names never leak out of the adapter.

Work is split so extraction can overlap decoding with the forward pass:
``load_item`` + ``preprocess`` run per item in worker processes, ``collate`` builds a batch,
``encode`` runs the model on the batch (in the main process, under autocast if allowed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..checks import did_you_mean
from ..errors import AnybindError, DataError
from .layers import LayerText, parse_layers
from .spec import EncoderSpec

POOLINGS = ("cls", "mean", "cls+mean")
#: poolings over time for audio (frames, not tokens: no CLS); the first is the default
AUDIO_POOLINGS = ("mean", "mean+max")


class Encoder(ABC):
    """A frozen pretrained model of one modality, with canonical layer names."""

    spec: EncoderSpec
    modality: str
    #: poolings this encoder accepts; the first is the default
    poolings: tuple[str, ...] = POOLINGS
    #: True when `encode` runs torch ops that can use bf16 autocast (False for ONNX, C engines)
    supports_autocast: bool = True
    #: convolutional nets run faster in channels_last on CPU
    channels_last: bool = False
    #: SPDX-ish licence of the weights, shown in `anybind encoders` and model cards
    licence: str | None = None
    device: torch.device = torch.device("cpu")
    #: audio encoders: the sample rate (Hz) `load_item` decodes clips to (mono float32)
    sample_rate: int = 16000

    # ---- what the encoder has -------------------------------------------------------------
    @property
    @abstractmethod
    def layer_dims(self) -> dict[str, int]:
        """Ordered {canonical layer name: hidden size}, ``layer.0`` ... ``layer.L``, then ``final``."""

    @property
    def layer_names(self) -> list[str]:
        return list(self.layer_dims)

    @property
    def num_blocks(self) -> int:
        """L: the index of the last block (``layer.L``)."""
        return max((int(n.split(".")[1]) for n in self.layer_dims if n.startswith("layer.")), default=0)

    @property
    def default_pooling(self) -> str:
        return self.poolings[0]

    def output_dim(self, layer: str, pooling: str | None = None) -> int:
        """Dimension of the stored feature: pooled ``cls+mean`` (or ``mean+max``) concatenates two
        vectors; ``final`` is the model's own embedding, never concatenated."""
        pooling = pooling or self.default_pooling
        d = self.layer_dims[layer]
        return 2 * d if ("+" in pooling and layer != "final") else d

    def resolve_layers(self, layers: LayerText) -> list[str]:
        """Canonical layer names from user text ('7,8,final', 'all', 'last', '-1', ints, None =
        final), checked against this encoder's layers (`anybind.encoders.layers.parse_layers`)."""
        return parse_layers(layers, self.layer_names, encoder=str(self.spec))

    def check_pooling(self, pooling: str | None) -> str:
        pooling = pooling or self.default_pooling
        if pooling not in self.poolings:
            raise AnybindError(
                f"{self.spec} does not support pooling '{pooling}': choose one of {', '.join(self.poolings)}"
            )
        return pooling

    # ---- per item (runs in worker processes) ------------------------------------------------
    def load_item(self, ref: Any) -> Any:
        """Read one raw item from its reference (an image path, a caption, an audio file or a
        decoded clip, ...); DataError if bad."""
        if self.modality == "text":
            if not isinstance(ref, str) or not ref.strip():
                raise DataError("empty caption")
            return ref.strip()
        if self.modality == "image":
            from ..data.images import load_image

            pre = getattr(self, "image_preprocess", None)
            return load_image(ref, min_side=getattr(pre, "resize", None))
        if self.modality == "audio":
            from ..data.audio import load_audio

            return load_audio(ref, sample_rate=self.sample_rate)
        return ref

    def preprocess(self, raw: Any) -> Any:
        """Per-item transform to model input (image -> array); identity by default."""
        pre = getattr(self, "image_preprocess", None)
        return pre(raw) if pre is not None else raw

    def collate(self, items: list[Any]) -> Any:
        """Items -> one batch (arrays are stacked; text stays a list to be tokenised in `encode`;
        audio stays a list of variable-length clips, which each encoder pads or trims as it needs)."""
        if self.modality == "audio":
            return list(items)
        if items and isinstance(items[0], np.ndarray):
            batch = torch.from_numpy(np.stack(items))
            return batch.contiguous(memory_format=torch.channels_last) if self.channels_last and batch.ndim == 4 else batch
        return list(items)

    # ---- the model ----------------------------------------------------------------------------
    @abstractmethod
    def encode(self, batch: Any, layers: Sequence[str], pooling: str | None = None) -> dict[str, torch.Tensor]:
        """Features of a collated batch at each layer: {layer: float Tensor [B, D]}."""

    def embed(self, items: Sequence[Any], layers: Sequence[str] | str | None = None, pooling: str | None = None) -> dict[str, torch.Tensor]:
        """Convenience for raw items (paths, PIL images, strings): load, preprocess, collate, encode."""
        layers = self.resolve_layers(layers)
        batch = self.collate([self.preprocess(self.load_item(x)) for x in items])
        with torch.inference_mode():
            return {k: v.float().cpu() for k, v in self.encode(batch, layers, self.check_pooling(pooling)).items()}

    def to(self, device: str | torch.device) -> Encoder:
        self.device = torch.device(device)
        for m in self._modules():
            m.to(self.device)
        return self

    def _modules(self) -> list[torch.nn.Module]:
        """The torch modules to move between devices (override in adapters)."""
        return [v for v in vars(self).values() if isinstance(v, torch.nn.Module)]

    # ---- identity -----------------------------------------------------------------------------
    @abstractmethod
    def weights_hash(self) -> str:
        """A hash of the weights' content: a changed checkpoint must never hit an old cache."""

    def preprocess_config(self) -> dict:
        pre = getattr(self, "image_preprocess", None)
        return pre.config() if pre is not None else {}

    def fingerprint(self, pooling: str | None = None, precision: str = "fp32") -> dict:
        """What keys the feature cache: spec, weights, preprocessing, pooling, compute precision."""
        return {
            "spec": str(self.spec),
            "modality": self.modality,
            "weights": self.weights_hash(),
            "preprocess": self.preprocess_config(),
            "pooling": self.check_pooling(pooling),
            "precision": precision,
        }

    def describe(self) -> dict:
        return {
            "spec": str(self.spec),
            "modality": self.modality,
            "layers": self.layer_dims,
            "poolings": list(self.poolings),
            "licence": self.licence,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} {self.modality} layers=0..{self.num_blocks}+final>"


class LazyHashEncoder(Encoder):
    """An adapter whose weights hash is computed on first use, from `_weights_fn`.

    Hashing a checkpoint costs seconds, so it waits until a cache key is needed; the creation
    `options` (image size overrides, ...) change the features, so they are part of the key.
    """

    _weights: str | None = None
    _weights_fn = None
    options: dict = {}

    def weights_hash(self) -> str:
        if self._weights is None:
            self._weights = self._weights_fn()
        return self._weights

    def __getstate__(self) -> dict:
        """Picklable for spawned workers: the weights hash is resolved, its closure dropped."""
        state = dict(self.__dict__)
        state["_weights"], state["_weights_fn"] = self.weights_hash(), None
        return state

    def fingerprint(self, pooling: str | None = None, precision: str = "fp32") -> dict:
        fp = super().fingerprint(pooling, precision)
        if self.options:
            fp["options"] = dict(self.options)
        return fp


def check_options(spec, options: dict, allowed, who: str = "it") -> None:
    """Refuse creation options an adapter does not know, naming the ones it takes."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise AnybindError(
            f"unknown option(s) {', '.join(unknown)}{did_you_mean(unknown[0], allowed)} for {spec}: "
            f"{who} takes " + ", ".join(allowed)
        )


# ---- pooling helpers shared by the adapters ------------------------------------------------------
def pool_tokens(hidden: torch.Tensor, pooling: str, mask: torch.Tensor | None = None, num_prefix: int = 1) -> torch.Tensor:
    """[B, T, D] token states -> [B, D] (or [B, 2D] for cls+mean).

    cls: the first token. mean: the mean over tokens after the `num_prefix` prefix tokens (the
    CLS and register tokens of a ViT), masked by `mask` [B, T] when given (text padding).
    """
    cls = hidden[:, 0]
    body = hidden[:, num_prefix:]
    if mask is not None:
        m = mask[:, num_prefix:].to(body.dtype).unsqueeze(-1)
        mean = (body * m).sum(1) / m.sum(1).clamp_min(1e-9)
    else:
        mean = body.mean(1)
    if pooling == "cls":
        return cls
    if pooling == "mean":
        return mean
    if pooling == "cls+mean":
        return torch.cat([cls, mean], dim=-1)
    if pooling == "mean+max":
        peak = body.masked_fill(m == 0, float("-inf")).amax(1) if mask is not None else body.amax(1)
        return torch.cat([mean, peak], dim=-1)
    raise AnybindError(f"unknown pooling '{pooling}': choose one of {', '.join(POOLINGS)}")


def pool_feature_map(fmap: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C] global average (CNN layers have no CLS token)."""
    return fmap.float().mean(dim=(2, 3)) if fmap.ndim == 4 else fmap


def module_weights_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): 16 hex digits.

    For weights that are no file of their own: hub downloads whose file cannot be found, one
    tower of a bigger checkpoint, random initialisation in tests.
    """
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:16]
