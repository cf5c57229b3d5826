"""Tiny deterministic encoders for tests: `random:image`, `random:text`, `random:audio[@seed]`.

`random:audio` reads files, bytes and (array, rate) pairs with `anybind.data.audio.load_audio`
(mono, 16 kHz); a numpy array is taken as samples already at 16 kHz.

Real computation (a small conv net / embedding bag with fixed random weights), so features
depend on the input and tests exercise the same paths as real encoders.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .base import Encoder, pool_feature_map, pool_tokens
from .preprocess import ImagePreprocess
from .spec import MODALITIES, EncoderSpec

WIDTH, BLOCKS, VOCAB = 32, 3, 4096
SAMPLE_RATE = 16000  # random:audio reads audio files at this rate, as speech encoders do


class _ImageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTH, 4, stride=4)
        self.blocks = nn.ModuleList(nn.Conv2d(WIDTH, WIDTH, 3, padding=1) for _ in range(BLOCKS))

    def forward(self, x):
        h = [torch.tanh(self.stem(x))]
        for b in self.blocks:
            h.append(torch.tanh(b(h[-1])) + h[-1])
        return h


class _TextNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(BLOCKS))

    def forward(self, ids):
        h = [self.emb(ids)]
        for b in self.blocks:
            h.append(torch.tanh(b(h[-1])) + h[-1])
        return h


def _token_ids(text: str, max_len: int = 32) -> list[int]:
    words = text.lower().split()[:max_len] or [""]
    return [int(hashlib.md5(w.encode()).hexdigest()[:8], 16) % (VOCAB - 1) + 1 for w in words]


class RandomEncoder(Encoder):
    """A small fixed-seed network: 3 blocks of width 32, layers layer.0..layer.3 and final."""

    licence = "none (random weights)"

    def __init__(self, spec: EncoderSpec, seed: int = 0):
        self.spec, self.seed = spec, seed
        self.modality = spec.modality or spec.name.partition("@")[0]
        torch.manual_seed(seed)
        if self.modality == "image":
            self.net, self.poolings = _ImageNet().eval(), ("mean",)
            self.image_preprocess = ImagePreprocess(size=32, resize=32)
        else:
            self.net, self.poolings = _TextNet().eval(), ("mean", "cls", "cls+mean")

    @property
    def layer_dims(self) -> dict[str, int]:
        return {**{f"layer.{i}": WIDTH for i in range(BLOCKS + 1)}, "final": WIDTH}

    def load_item(self, ref):
        if self.modality in ("image", "text"):
            return super().load_item(ref)
        if self.modality == "audio" and not isinstance(ref, np.ndarray):
            from ..data.audio import load_audio

            return load_audio(ref, SAMPLE_RATE)  # files, tar://, bytes, uploads, (array, rate)
        return np.asarray(ref, dtype=np.float32)  # other modalities (and decoded audio): raw arrays

    def collate(self, items):
        if self.modality in ("text",):
            ids = [_token_ids(t) for t in items]
            n = max(len(i) for i in ids)
            batch = torch.zeros(len(ids), n, dtype=torch.long)
            for r, i in enumerate(ids):
                batch[r, : len(i)] = torch.tensor(i)
            return batch
        if self.modality == "image":
            return super().collate(items)
        # other modalities: fold a 1-d signal into token ids by quantisation
        return torch.stack([torch.as_tensor(np.resize(x, 64) * 100).long().abs() % VOCAB for x in items])

    @torch.inference_mode()
    def encode(self, batch, layers: Sequence[str], pooling: str | None = None):
        pooling = self.check_pooling(pooling)
        batch = batch.to(self.device)
        hs = self.net(batch)
        out = {}
        for layer in layers:
            if self.modality == "image":
                h = pool_feature_map(hs[-1] if layer == "final" else hs[int(layer.split(".")[1])])
            else:
                mask = batch != 0
                idx = len(hs) - 1 if layer == "final" else int(layer.split(".")[1])
                h = pool_tokens(hs[idx], "mean" if layer == "final" else pooling, mask, num_prefix=0)
            if layer == "final":
                h = torch.nn.functional.normalize(h.float(), dim=-1)
            out[layer] = h.float()
        return out

    def weights_hash(self) -> str:
        return f"random-{self.modality}-seed{self.seed}-v1"


def create(spec: EncoderSpec, **options) -> RandomEncoder:
    name, _, seed = spec.name.partition("@")
    modality = spec.modality or name
    if modality not in MODALITIES:
        from ..errors import SpecError

        raise SpecError(f"random encoders exist for {', '.join(MODALITIES)}, not '{name}'")
    enc = RandomEncoder(spec, seed=int(seed or 0))
    enc.modality = modality
    return enc
