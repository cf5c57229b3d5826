"""A bundle behind the open_clip loader interface, so CLIP_benchmark-style code runs it unchanged.

    model, preprocess, tokenizer = create_model_and_transforms("bundles/clipart")
    images = torch.stack([preprocess(Image.open(p)) for p in paths])      # the encoder's own preprocessing
    img = model.encode_image(images)                                      # [n, dim], L2-normalised
    txt = model.encode_text(tokenizer(["a photo of a cat", "a photo of a dog"]))

The image path is the bundle's, step by step: `preprocess` is the image encoder's own decode
(`load_item`, reduced like a file) and transform; `encode_image` collates the batch as the
encoder does, runs its forward at the bundle's layers and pooling (under bf16 autocast when the
bundle was extracted so), rounds the features to fp16 as the feature stores hold them
(`anybind.features.encode`, the bundle's own path), then projects with the bundle's bound model
and L2-normalises. So the
numbers equal ``bundle.encode_image`` of the same images. Text needs no tensor form: the
"tokenizer" carries the strings to the bundle's text encoder.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch


class TextBatch(list):
    """What the tokenizer returns: the strings themselves; `.to(device)` is a no-op (CLIP_benchmark calls it)."""

    def to(self, *args, **kwargs) -> TextBatch:
        return self


class Tokenizer:
    """open_clip-style tokenizer: ``tokenizer(texts) -> batch`` (a str is one text)."""

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> TextBatch:
        return TextBatch([texts] if isinstance(texts, str) else list(texts))


class Preprocess:
    """``preprocess(PIL image) -> tensor``: the bundle's image encoder's own per-item transform."""

    def __init__(self, bundle):
        self.bundle = bundle

    def __call__(self, image: Any) -> Any:
        enc = self.bundle.encoder("image")
        x = enc.preprocess(enc.load_item(image))
        return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


class ClipStyleModel:
    """``encode_image(batch)`` / ``encode_text(tokens)`` -> the bundle's normalised embeddings."""

    def __init__(self, bundle):
        self.bundle = bundle

    # torch.nn.Module-ish no-ops: the encoders are frozen and the bundle picks its device
    def eval(self) -> ClipStyleModel:
        return self

    def train(self, mode: bool = True) -> ClipStyleModel:
        return self

    def to(self, *args, **kwargs) -> ClipStyleModel:
        return self

    def __call__(self, image=None, text=None):
        return (None if image is None else self.encode_image(image), None if text is None else self.encode_text(text))

    def encode_image(self, images, normalize: bool = True) -> torch.Tensor:
        """[n, dim] embeddings of a batch of preprocessed images (a stacked tensor or a list)."""
        from ..features.encode import encode_batch_as_stored

        b = self.bundle
        enc = b.encoder("image")
        side = b.info["modalities"]["image"]
        items = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in images]
        feats = encode_batch_as_stored(enc, enc.collate(items), side["layers"], side.get("pooling"),
                                       side.get("precision"), side.get("dtype", "float16"))
        z = b.project("image", feats)
        return z if normalize else b.bound.encode("image", feats).float()

    def encode_text(self, tokens, normalize: bool = True) -> torch.Tensor:
        """[n, dim] embeddings of a tokenizer batch (or a list of strings)."""
        return self.bundle.encode_text(list(tokens))


def create_model_and_transforms(bundle_path: str | os.PathLike, device: str = "cpu"):
    """``(model, preprocess, tokenizer)`` for a bundle folder, like open_clip's loader of the same name.

    >>> model, preprocess, tokenizer = create_model_and_transforms("bundles/clipart")  # doctest: +SKIP
    """
    from ..bundle import load

    bundle = load(bundle_path, device)
    return ClipStyleModel(bundle), Preprocess(bundle), Tokenizer()


def get_tokenizer(bundle_path: str | os.PathLike | None = None) -> Tokenizer:
    """open_clip's ``get_tokenizer``: the strings pass through to the bundle's text encoder."""
    return Tokenizer()


__all__ = ["ClipStyleModel", "Preprocess", "TextBatch", "Tokenizer", "create_model_and_transforms", "get_tokenizer"]
