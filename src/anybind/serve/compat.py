"""A bundle behind the open_clip loader interface, so CLIP_benchmark-style code runs it unchanged.

    model, _, preprocess = create_model_and_transforms("bundles/clipart")   # open_clip's order
    tokenizer = get_tokenizer("bundles/clipart")
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


def create_model_and_transforms(model_name: str | os.PathLike, pretrained: str | None = None, *,
                                precision: str = "fp32", device: str = "cpu", **open_clip_options: Any):
    """open_clip's loader: ``(model, preprocess_train, preprocess_val)`` for the bundle folder `model_name`.

    Both transforms are the encoder's own preprocessing (projectors train on cached features, so there
    is no training augmentation). `pretrained`, `precision` and open_clip's other options
    (`cache_dir`, `jit`, `force_*`, ...) are accepted so open_clip calls run unchanged, and do not
    apply: the bundle fixes its weights, preprocessing and precision. Past `pretrained` they are
    keyword-only, so a positional call can never put a value in the wrong place.

    >>> model, _, preprocess = create_model_and_transforms("bundles/clipart")  # doctest: +SKIP
    """
    model, preprocess = create_model_from_pretrained(model_name, device=device)
    return model, preprocess, preprocess


def create_model_from_pretrained(model_name: str | os.PathLike, pretrained: str | None = None, *,
                                 precision: str = "fp32", device: str = "cpu", return_transform: bool = True,
                                 **open_clip_options: Any):
    """open_clip's ``create_model_from_pretrained``: ``(model, preprocess)``, or the model alone when
    `return_transform` is false. Options as `create_model_and_transforms`."""
    from ..bundle import load

    bundle = load(model_name, device)
    model = ClipStyleModel(bundle)
    return (model, Preprocess(bundle)) if return_transform else model


def get_tokenizer(model_name: str | os.PathLike = "", context_length: int | None = None, **kwargs: Any) -> Tokenizer:
    """open_clip's ``get_tokenizer``: the strings pass through to the bundle's text encoder, so the
    bundle is not needed here and `context_length` does not apply (the encoder truncates)."""
    return Tokenizer()
