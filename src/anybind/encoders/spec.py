"""Encoder spec strings, parsed in one place.

Grammar: ``backend:name-or-path[:modality]``, or a bare short name of a packaged encoder.

    hf:facebook/dinov2-small            st:sentence-transformers/all-MiniLM-L6-v2
    hf:/local/dir:text                  timm:vit_small_patch14_dinov2.lvd142m
    open_clip:ViT-B-32@laion2b_s34b_b79k:image    onnx:/path/model.onnx#out1,out2
    efficientnet-lite0                  random:text
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..checks import did_you_mean
from ..errors import SpecError

MODALITIES = ("image", "text", "audio", "video", "pointcloud", "molecule", "tabular")


def known_backends() -> list[str]:
    """The registered backend prefixes (built-in ones and any added with `register_backend`)."""
    from .registry import BACKENDS  # late: the registry imports this module

    return BACKENDS.names()


def packaged_names() -> list[str]:
    from .registry import PACKAGED  # late: the registry imports this module

    return PACKAGED.names()


_PATHLIKE = re.compile(r"^(/|\./|\.\./|~|[A-Za-z]:\\)|\.(onnx|pt|pth|bin|safetensors)$")


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed spec: which backend, which model (a hub name or a local path), which modality."""

    backend: str
    name: str
    modality: str | None = None

    def __str__(self) -> str:
        if self.backend == "packaged":
            return self.name
        return f"{self.backend}:{self.name}" + (f":{self.modality}" if self.modality else "")


def parse_spec(text: str | EncoderSpec) -> EncoderSpec:
    """Parse a spec string; unknown prefixes and path-like bare names are refused with a hint."""
    if isinstance(text, EncoderSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise SpecError("empty encoder spec: give e.g. 'minilm-l6', 'hf:facebook/dinov2-small' or 'random:image'")
    text = text.strip()
    if text in packaged_names():
        return EncoderSpec("packaged", text)
    prefix, sep, rest = text.partition(":")
    if not sep or (len(prefix) == 1 and rest.startswith("\\")):
        if _PATHLIKE.search(text) or "/" in text:
            raise SpecError(
                f"'{text}' looks like a path or hub name: put a backend prefix before it, e.g. "
                f"'hf:{text}' (transformers), 'st:{text}' (sentence-transformers), "
                f"'timm:{text}', 'onnx:{text}'"
            )
        raise SpecError(
            f"unknown encoder '{text}'{did_you_mean(text, packaged_names())}: packaged encoders are "
            f"{', '.join(packaged_names())}; other encoders need a backend prefix "
            f"({', '.join(f'{b}:' for b in known_backends())}). `anybind encoders` lists them."
        )
    backends = known_backends()
    if prefix not in backends:
        raise SpecError(
            f"unknown encoder backend '{prefix}:' in '{text}'{did_you_mean(prefix, backends)}: use one of "
            + ", ".join(f"'{b}:'" for b in backends)
        )
    if not rest:
        raise SpecError(f"'{text}' names a backend but no model: e.g. '{prefix}:NAME-OR-PATH'")
    modality = None
    head, sep, tail = rest.rpartition(":")
    if sep and tail in MODALITIES:
        rest, modality = head, tail
    if not rest:
        raise SpecError(f"'{text}' names a modality but no model")
    return EncoderSpec(prefix, rest, modality)
