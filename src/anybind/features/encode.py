"""Encoding new raw items exactly as a feature store holds them.

Zero-shot prompts, a bundle's queries and the open_clip adapter all need the features a store
would have held for items it never saw: the same encoder, layers, pooling and compute precision,
rounded to the store's dtype. One function does it, so a bundle reproduces its evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

STORED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def as_stored(feats: dict[str, torch.Tensor], layers: Sequence[str], dtype: str = "float16") -> list[torch.Tensor]:
    """Per-layer float32 CPU tensors, rounded through the stored dtype."""
    stored = STORED_DTYPES[dtype]
    return [feats[lay].float().cpu().to(stored).float() for lay in layers]


def compute_context(precision: str | None, device: torch.device):
    """bf16 autocast when the store was extracted in bf16, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def encode_batch_as_stored(encoder, batch: Any, layers: Sequence[str], pooling: str | None,
                           precision: str | None, dtype: str = "float16") -> list[torch.Tensor]:
    """Features of one collated batch (what `encoder.collate` returns), as a store holds them."""
    device = getattr(encoder, "device", None) or torch.device("cpu")
    with torch.inference_mode(), compute_context(precision, torch.device(device)):
        got = encoder.encode(batch, encoder.resolve_layers(list(layers)), encoder.check_pooling(pooling))
    return as_stored(got, layers, dtype)


def encode_as_stored(encoder, items: Sequence[Any], layers: Sequence[str], pooling: str | None,
                     precision: str | None, dtype: str = "float16", batch_size: int = 64) -> list[torch.Tensor]:
    """Features of raw items (paths, PIL images, arrays, strings), per layer, as a store holds them."""
    out: list[list[torch.Tensor]] = [[] for _ in layers]
    for lo in range(0, len(items), batch_size):
        chunk = [encoder.preprocess(encoder.load_item(x)) for x in items[lo : lo + batch_size]]
        for i, t in enumerate(encode_batch_as_stored(encoder, encoder.collate(chunk), layers, pooling,
                                                     precision, dtype)):
            out[i].append(t)
    return [torch.cat(o) for o in out]


def store_encoding(store) -> dict:
    """The settings a store's features were computed with: spec, pooling, precision, dtype."""
    key = store.key["encoder"]
    return {"encoder": key["spec"], "pooling": key.get("pooling"), "precision": key.get("precision"),
            "dtype": store.dtype}
