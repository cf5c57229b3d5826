"""timm image encoders: ``timm:NAME``, ``timm:/local/model-dir``, ``timm:ARCH@/path/weights``.

    timm:vit_small_patch14_dinov2.lvd142m     pretrained weights from the hub (needs a network)
    timm:/models/vit_small_dinov2             a local folder in the hub layout (config.json +
                                              model.safetensors / pytorch_model.bin)
    timm:convnext_tiny@/models/convnext.pth   an architecture + a local weights file

Canonical layers come from the model's ``feature_info`` (the levels timm's ``features_only``
returns), read with forward hooks in one pass:

- ``layer.0``: the stem. It is the first feature level when that level sits outside the
  stage container (ResNet's ``act1``); otherwise the *input* of the first level: for a ViT the
  patch embedding + position embedding (+ ``norm_pre``), the input to block 0; for ConvNeXt
  the stem output.
- ``layer.i``: the i-th level: the output of block i of a ViT (``layer.L`` = the last block,
  before the final norm), the output of stage / reduction level i of a CNN.
- ``final``: ``forward_head(forward_features(x), pre_logits=True)``, the pooled pre-logits
  embedding timm itself uses (not L2-normalised).

Hooks and not ``forward_intermediates``: the hooks give every architecture's raw level outputs
in the same form (prefix tokens included, no reshaping), and the pass stops after the deepest
requested level when ``final`` is not asked for (the same saving as ``stop_early``). A test
checks the hooked levels against ``forward_intermediates``.

Pooling: token layers ``[B, T, D]`` take ``cls`` (the first token), ``mean`` (patch tokens,
the ``num_prefix_tokens`` CLS/register tokens left out) or ``cls+mean``; feature maps take the
global average (``poolings=("mean",)``) and run in channels_last.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._deps import require
from .._hashing import hash_dir, hash_file
from ..errors import AnybindError, SpecError
from .base import (
    POOLINGS,
    LazyHashEncoder,
    module_weights_hash,
    pool_feature_map,
    pool_tokens,
)
from .preprocess import ImagePreprocess
from .spec import EncoderSpec

log = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz", ".ckpt")


# ---- forward hooks that read canonical layers (shared with the open_clip adapter) ---------------
class _StopForward(Exception):
    """Raised by a hook once every requested layer is read and nothing later is needed."""


@dataclass(frozen=True)
class Tap:
    """Where a canonical layer is read: a module's output, or its input (``pre=True``)."""

    module: nn.Module
    pre: bool = False


class LayerTaps:
    """Forward hooks that capture canonical layers during one forward pass."""

    def __init__(self, taps: dict[str, Tap]):
        self.taps = taps

    def __contains__(self, name: str) -> bool:
        return name in self.taps

    def names(self) -> list[str]:
        return list(self.taps)

    @contextmanager
    def _hooks(self, names: Sequence[str], got: dict, stop_early: bool):
        pending = set(names)

        def record(name, value):
            if isinstance(value, (tuple, list)):
                value = value[0]
            got[name] = value
            pending.discard(name)
            if stop_early and not pending:
                raise _StopForward

        handles = []
        try:
            for name in names:
                tap = self.taps[name]
                if tap.pre:
                    handles.append(
                        tap.module.register_forward_pre_hook(
                            lambda m, args, kwargs, n=name: record(
                                n, args[0] if args else next(iter(kwargs.values()))
                            ),
                            with_kwargs=True,
                        )
                    )
                else:
                    handles.append(
                        tap.module.register_forward_hook(
                            lambda m, args, out, n=name: record(n, out)
                        )
                    )
            yield
        finally:
            for h in handles:
                h.remove()

    def run(
        self, forward: Callable[[], object], names: Sequence[str], stop_early: bool
    ) -> tuple[dict, object]:
        """Call `forward()` with hooks on `names`; returns ({name: tensor}, forward's result).

        With `stop_early` the pass is cut after the last requested layer (the result is None).
        """
        got: dict = {}
        result = None
        with self._hooks(names, got, stop_early and bool(names)), suppress(_StopForward):
            result = forward()
        missing = [n for n in names if n not in got]
        if missing:
            raise AnybindError(f"the forward pass never reached layer(s) {', '.join(missing)}")
        return got, result


def tensor_form(t: torch.Tensor, channels: int | None = None) -> str:
    """How a layer's tensor is laid out: tokens [B,T,D], nchw / nhwc maps, or a vector [B,D]."""
    if t.ndim == 2:
        return "vector"
    if t.ndim == 3:
        return "tokens"
    if t.ndim == 4:
        if channels is not None and t.shape[-1] == channels and t.shape[1] != channels:
            return "nhwc"
        return "nchw"
    raise AnybindError(f"cannot pool a layer output of shape {tuple(t.shape)}")


def form_dim(t: torch.Tensor, form: str) -> int:
    return int(t.shape[1] if form == "nchw" else t.shape[-1])


def pool_form(t: torch.Tensor, form: str, pooling: str, num_prefix: int) -> torch.Tensor:
    """[B, ...] layer output -> [B, D] (or [B, 2D] for cls+mean on tokens)."""
    if form == "tokens":
        return pool_tokens(t.float(), pooling, num_prefix=num_prefix)
    if form == "nchw":
        return pool_feature_map(t.float())
    if form == "nhwc":
        return t.float().mean(dim=(1, 2))
    return t.float()


def token_poolings(forms: dict[str, str], num_prefix: int) -> tuple[str, ...]:
    """cls / mean / cls+mean when every layer is a token sequence with a CLS token; else mean."""
    if forms and num_prefix > 0 and all(f == "tokens" for f in forms.values()):
        return POOLINGS
    return ("mean",)


# ---- timm ------------------------------------------------------------------------------------
def _container(module_name: str) -> str:
    """'stages.3' -> 'stages', 'layer4' -> 'layer', 's4' -> 's', 'act1' -> 'act'."""
    return re.sub(r"[._-]?\d+$", "", module_name.split(".")[0])


def _feature_levels(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if info is not None and not isinstance(info, list):  # a FeatureInfo of a features_only model
        info = list(info.info)
    if info:
        return [dict(i) for i in info]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return [{"module": f"blocks.{i}"} for i in range(len(blocks))]
    return []


def timm_taps(model: nn.Module) -> tuple[dict[str, Tap], dict[str, int | None]]:
    """Canonical taps on a timm model and the channel count timm declares for each."""
    levels = _feature_levels(model)
    if not levels:
        return {}, {}
    modules = dict(model.named_modules())
    missing = [lv["module"] for lv in levels if lv["module"] not in modules]
    if missing:
        log.warning(
            "timm feature_info names modules %s that the model does not have: only 'final'", missing
        )
        return {}, {}

    def tap(level):
        return Tap(modules[level["module"]], pre=level.get("hook_type") == "forward_pre")

    taps: dict[str, Tap] = {}
    channels: dict[str, int | None] = {}
    if len(levels) > 1 and _container(levels[0]["module"]) != _container(levels[-1]["module"]):
        taps["layer.0"], channels["layer.0"] = tap(levels[0]), levels[0].get("num_chs")
        levels = levels[1:]
    else:  # the stem is whatever feeds the first level
        taps["layer.0"], channels["layer.0"] = Tap(modules[levels[0]["module"]], pre=True), None
    for i, level in enumerate(levels, 1):
        taps[f"layer.{i}"], channels[f"layer.{i}"] = tap(level), level.get("num_chs")
    return taps, channels


def preprocess_from_timm(model: nn.Module, img_size=None) -> ImagePreprocess:
    """timm's resolved data config -> ImagePreprocess (size, crop_pct -> resize, mean/std, ...).

    `img_size`: the size the model was built for when it is not the pretrained one."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h != w:
        log.warning("timm model input is %dx%d; anybind crops squares: using %d", h, w, max(h, w))
    size = int(max(h, w))
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        interpolation = "bicubic"
    return ImagePreprocess(
        size=size,
        resize=math.floor(size / crop_pct),  # timm's scale_size
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=interpolation,
        resize_mode="squash" if cfg.get("crop_mode") == "squash" else "shortest",
    )


class TimmEncoder(LazyHashEncoder):
    """A timm model as a frozen image encoder with canonical layers (see the module docstring)."""

    modality = "image"

    def __init__(
        self,
        spec: EncoderSpec,
        model: nn.Module,
        weights: Callable[[], str],
        licence: str | None = None,
        options: dict | None = None,
    ):
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self._weights_fn, self._weights = weights, None
        self.licence = licence or model.pretrained_cfg.get("license")
        self.options = {k: v for k, v in (options or {}).items() if k != "cache_dir"}
        self.image_preprocess = preprocess_from_timm(model, self.options.get("img_size"))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        taps, self._channels = timm_taps(model)
        self.taps = LayerTaps(taps)
        self._probe()

    def _probe(self) -> None:
        """One forward pass on a blank image: each layer's layout and width, from the real tensors."""
        size = self.image_preprocess.size
        with torch.inference_mode():
            got = self._forward(torch.zeros(1, 3, size, size), [*self.taps.names(), "final"])
        final = got.pop("final")
        forms: dict[str, str] = {}
        for name, t in got.items():
            forms[name] = tensor_form(t, self._channels.get(name))
        if (
            "layer.0" in got
            and got["layer.0"].ndim == 4
            and forms.get("layer.1") in ("nchw", "nhwc")
        ):
            forms["layer.0"] = forms["layer.1"]  # a stem map is laid out like the first stage's
        self._forms = forms
        self._dims = {
            **{n: form_dim(got[n], forms[n]) for n in self.taps.names()},
            "final": int(final.shape[-1]),
        }
        self.poolings = token_poolings(forms, self.num_prefix_tokens)
        self.channels_last = "nchw" in forms.values() and self.poolings == ("mean",)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    @property
    def layer_dims(self) -> dict[str, int]:
        return dict(self._dims)

    def _forward(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        need_final = "final" in layers
        names = [n for n in layers if n != "final"]

        def forward():
            feats = self.model.forward_features(x)
            return self.model.forward_head(feats, pre_logits=True) if need_final else None

        got, final = self.taps.run(forward, names, stop_early=not need_final)
        if need_final:
            got["final"] = final
        return got

    @torch.inference_mode()
    def encode(
        self, batch: torch.Tensor, layers: Sequence[str], pooling: str | None = None
    ) -> dict[str, torch.Tensor]:
        pooling = self.check_pooling(pooling)
        x = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        got = self._forward(x, layers)
        return {
            name: got[name].float()
            if name == "final"
            else pool_form(got[name], self._forms[name], pooling, self.num_prefix_tokens)
            for name in layers
        }


# ---- building a timm model from a spec ----------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~")) or re.match(r"^[A-Za-z]:[\\/]", name) is not None
    )


def _weights_in(path: Path) -> Path:
    """The weights file a path names: the file itself, or the one weights file in a folder."""
    if path.is_file():
        return path
    if path.is_dir():
        for fname in WEIGHT_FILES:
            if (path / fname).is_file():
                return path / fname
        found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        if len(found) == 1:
            return found[0]
        raise SpecError(f"{path} holds {len(found)} weight files: name the one to use")
    raise SpecError(f"no weights at {path}: the file or folder does not exist")


def _hub_weights_hash(model: nn.Module) -> str:
    """Hash of the downloaded weights file when it is in a local cache, else of the state dict."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    repo = cfg.get("hf_hub_id")
    if repo:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in (cfg.get("hf_hub_filename"), *WEIGHT_FILES):
                if fname:
                    found = try_to_load_from_cache(repo, fname)
                    if isinstance(found, str):
                        return hash_file(found)
        except ImportError:
            pass
    url = cfg.get("url")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if cached.is_file():
            return hash_file(cached)
    return module_weights_hash(model)


def _from_local_path(timm, name: str, kwargs: dict) -> tuple[nn.Module, Callable[[], str]]:
    """`timm:/folder` (hub layout: config.json + weights) or `timm:/folder/weights-file`."""
    path = Path(name).expanduser()
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise SpecError(f"timm:{name}: no such file or folder")
    if not (folder / "config.json").is_file():
        raise SpecError(
            f"timm:{name} has no config.json beside it to name the architecture: "
            f"use 'timm:ARCH@{name}', e.g. 'timm:resnet50@{name}'"
        )
    if path.is_file():  # a weights file beside a hub-style config: that config's architecture
        import json

        arch = json.loads((folder / "config.json").read_text()).get("architecture")
        overlay = {"file": str(path)}
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return model, lambda: hash_file(path)
    model = timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs)
    return model, lambda: hash_dir(path)


def load_timm_model(
    name: str, pretrained: bool | None = None, **timm_kwargs
) -> tuple[nn.Module, Callable[[], str]]:
    """(model without classifier, a function returning its weights hash) for a spec's name part."""
    timm = require("timm", "the timm backend", "timm", extra="timm")
    kwargs = {"num_classes": 0, **timm_kwargs}  # no classifier: `final` is the pre-logits feature
    arch, at, where = name.partition("@")
    try:
        if at and (_looks_like_path(where) or Path(where).expanduser().exists()):
            file = _weights_in(Path(where).expanduser())
            overlay = {"file": str(file)}
            model = timm.create_model(
                arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
            )
            return model, lambda: hash_file(file)
        if _looks_like_path(name):
            return _from_local_path(timm, name, kwargs)
        pretrained = True if pretrained is None else bool(pretrained)
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except OSError as e:  # the hub download failed: offline, no such file, no access
            raise AnybindError(
                f"timm:{name}: could not fetch the pretrained weights ({type(e).__name__}: {e}). "
                "With no network, download them elsewhere and use 'timm:/path/to/folder' "
                "(config.json + model.safetensors) or 'timm:ARCH@/path/to/weights'"
            ) from e
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise SpecError(
                f"timm has no model '{arch}': `timm.list_models('*pattern*')` lists them"
            ) from e
        raise
    if pretrained:
        return model, lambda: _hub_weights_hash(model)
    log.warning("timm:%s created without pretrained weights (random initialisation)", name)
    return model, lambda: "random-init-" + module_weights_hash(model)


def create(
    spec: EncoderSpec, pretrained: bool | None = None, device: str | None = None, **timm_kwargs
) -> TimmEncoder:
    """`timm:NAME` -> TimmEncoder. `pretrained=False` gives random weights (tests); extra keyword
    arguments go to ``timm.create_model`` (e.g. ``img_size=518``, ``dynamic_img_size=True``)."""
    if spec.modality not in (None, "image"):
        raise SpecError(f"{spec}: timm models are image encoders, not {spec.modality}")
    model, weights = load_timm_model(spec.name, pretrained=pretrained, **timm_kwargs)
    enc = TimmEncoder(spec, model, weights, options=timm_kwargs)
    return enc.to(device) if device else enc
