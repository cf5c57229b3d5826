"""Captions -> the token tensors a bundle's text graph takes, with the `tokenizers` package.

``tokenizer``: the Hugging Face fast tokenizer the torch path used, saved as a `tokenizers` file,
with its truncation (``max_length``), right padding to the longest caption and lowercasing.
``random-words``: the test encoders' word hashing (`anybind.encoders.random`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnybindError, DataError

RANDOM_VOCAB, RANDOM_MAX_WORDS = 4096, 32  # anybind.encoders.random: VOCAB, _token_ids' max_len


def caption(ref: Any) -> str:
    """A caption as the torch path reads one (stripped; empty ones are a DataError)."""
    if not isinstance(ref, str) or not ref.strip():
        raise DataError(f"a caption must be a non-empty string, not {ref!r}"[:200])
    return ref.strip()


class Tokenize:
    """`preprocess` (a modality's entry in onnx.json) -> a callable: captions -> {input name: int64 array}."""

    def __init__(self, preprocess: dict, folder: Path, input_names: list[str]):
        self.kind, self.input_names = preprocess.get("kind"), list(input_names)
        self.lowercase = bool(preprocess.get("lowercase"))
        if self.kind == "tokenizer":
            from tokenizers import Tokenizer

            path = folder / preprocess["file"]
            try:
                self.tokenizer = Tokenizer.from_file(str(path))
            except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type for bad files
                raise AnybindError(f"{path} is not a readable tokenizers file ({e}): export the bundle again") from e
            self.tokenizer.enable_truncation(int(preprocess["max_length"]))
            self.tokenizer.enable_padding(pad_id=int(preprocess["pad_id"]), pad_token=preprocess["pad_token"])
        elif self.kind != "random-words":
            raise AnybindError(f"unknown tokenization {self.kind!r} in onnx.json: this anybind.runtime is older "
                               "than the export")

    def __call__(self, captions: list[str]) -> dict[str, np.ndarray]:
        texts = [c.lower() for c in captions] if self.lowercase else list(captions)
        if self.kind == "random-words":
            return {"input_ids": _random_word_ids(texts)}
        encoded = self.tokenizer.encode_batch(texts)
        arrays = {"input_ids": [e.ids for e in encoded], "attention_mask": [e.attention_mask for e in encoded],
                  "token_type_ids": [e.type_ids for e in encoded]}
        return {name: np.asarray(arrays[name], dtype=np.int64) for name in self.input_names}


def _random_word_ids(texts: list[str]) -> np.ndarray:
    ids = [[int(hashlib.md5(w.encode()).hexdigest()[:8], 16) % (RANDOM_VOCAB - 1) + 1
            for w in (t.lower().split()[:RANDOM_MAX_WORDS] or [""])] for t in texts]
    out = np.zeros((len(ids), max(len(i) for i in ids)), dtype=np.int64)
    for row, words in enumerate(ids):
        out[row, : len(words)] = words
    return out
