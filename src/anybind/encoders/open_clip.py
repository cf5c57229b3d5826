"""open_clip towers as unimodal encoders: ``open_clip:ARCH@PRETRAINED:image|text``.

    open_clip:ViT-B-32@laion2b_s34b_b79k:image     a pretrained tag (downloaded by open_clip)
    open_clip:ViT-B-32@/models/clip.bin:text       a local checkpoint file
    open_clip:hf-hub:timm/ViT-B-16-SigLIP:image    a hub repo in open_clip's layout
    open_clip:/models/my-clip:image                a local folder (open_clip_config.json + weights)
    open_clip:ViT-B-32:image                       no weights: random initialisation (tests)

The modality picks the tower; the other tower is dropped to save memory.

Layers:
- ``final``: ``encode_image`` / ``encode_text`` output, L2-normalised (the CLIP space).
- image tower, a ViT: ``layer.0`` = the input to the first residual block (patch + class
  embedding + position, after ``ln_pre``), ``layer.i`` = the output of block i. A timm trunk
  (ConvNeXt, SigLIP, ...) uses the timm adapter's levels; a ModifiedResNet (RN50...) has
  ``layer.0`` = the stem, ``layer.1..4`` = its four stages.
- text tower: ``layer.0`` = token + position embeddings (the input to block 0), ``layer.i`` =
  the output of block i. Hugging Face text towers have ``final`` only.

Pooling: image token layers ``cls`` / ``mean`` / ``cls+mean`` (mean over patch tokens);
feature maps a global average. Text has no CLS token: **``cls`` is the token the tower itself
pools** (the EOT token, ``argmax`` of the ids, for CLIP; the last token for SigLIP-style
towers), and ``mean`` averages the real tokens (start .. EOT, or every non-pad token).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._deps import require
from .._hashing import hash_dir, hash_file
from ..errors import AnybindError, SpecError
from .base import POOLINGS, LazyHashEncoder, module_weights_hash
from .preprocess import ImagePreprocess
from .spec import EncoderSpec
from .timm import LayerTaps, Tap, form_dim, pool_form, tensor_form, timm_taps, token_poolings

log = logging.getLogger(__name__)


def _block_taps(resblocks: nn.ModuleList) -> dict[str, Tap]:
    taps = {"layer.0": Tap(resblocks[0], pre=True)}
    for i, block in enumerate(resblocks, 1):
        taps[f"layer.{i}"] = Tap(block)
    return taps


def _visual_taps(visual: nn.Module) -> tuple[dict[str, Tap], dict, int, bool]:
    """(taps, declared channels, prefix tokens, batch_first) for the towers open_clip builds."""
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):  # open_clip VisionTransformer
        return _block_taps(transformer.resblocks), {}, 1, getattr(transformer, "batch_first", True)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # TimmModel
        taps, channels = timm_taps(trunk)
        return taps, channels, int(getattr(trunk, "num_prefix_tokens", 0) or 0), True
    if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):  # ModifiedResNet
        taps = {"layer.0": Tap(visual.layer1, pre=True)}
        taps.update({f"layer.{i}": Tap(getattr(visual, f"layer{i}")) for i in range(1, 5)})
        return taps, {}, 0, True
    log.warning("open_clip vision tower %s: no per-layer taps, only 'final'", type(visual).__name__)
    return {}, {}, 0, True


def preprocess_from_open_clip(model: nn.Module) -> ImagePreprocess:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = int(max(size) if isinstance(size, (tuple, list)) else size)
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        log.warning(
            "open_clip resize_mode %r is not supported: resizing the short side instead", mode
        )
        mode = "shortest"
    interpolation = cfg.get("interpolation", "bicubic")
    return ImagePreprocess(
        size=size,
        resize=size,
        mean=tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        interpolation=interpolation
        if interpolation in ("bicubic", "bilinear", "nearest")
        else "bicubic",
        resize_mode=mode,
    )


class OpenClipEncoder(LazyHashEncoder):
    """One tower of an open_clip model (see the module docstring for layers and pooling)."""

    def __init__(
        self,
        spec: EncoderSpec,
        model: nn.Module,
        modality: str,
        tokenizer_name: str,
        weights: Callable[[], str],
        licence: str | None = None,
        options: dict | None = None,
    ):
        self.spec, self.modality, self.licence = spec, modality, licence
        self.options = {k: v for k, v in (options or {}).items() if k != "cache_dir"}
        self._weights_fn, self._weights = weights, None
        model = model.eval().requires_grad_(False)
        if modality == "image":
            self.tower = model.visual
            self.image_preprocess = preprocess_from_open_clip(model)
            taps, self._channels, self.num_prefix_tokens, self._batch_first = _visual_taps(
                self.tower
            )
            del model
        else:
            import open_clip

            model.visual = None  # the image tower is not needed
            self.model = model
            self.tokenizer = open_clip.get_tokenizer(tokenizer_name)
            self._tokenizer_name = tokenizer_name
            text = getattr(model, "text", None)
            blocks_owner = (
                model.transformer
                if hasattr(model, "token_embedding")
                else getattr(text, "transformer", None)
            )
            resblocks = getattr(blocks_owner, "resblocks", None)
            taps = _block_taps(resblocks) if resblocks is not None else {}
            if not taps:
                log.warning(
                    "open_clip text tower %s: no per-layer taps, only 'final'", type(text).__name__
                )
            self._batch_first = getattr(blocks_owner, "batch_first", True)
            self._channels, self.num_prefix_tokens = {}, 0
            src = text if text is not None else model
            self._pool_type = getattr(src, "text_pool_type", None) or getattr(
                src, "pool_type", "argmax"
            )
            self._eos_id = (
                getattr(src, "text_eos_id", None) if text is None else getattr(src, "eos_id", None)
            )
            self._pad_id = getattr(src, "pad_id", 0) or 0
        self.taps = LayerTaps(taps)
        self._probe()

    # ---- structure --------------------------------------------------------------------------
    def _probe(self) -> None:
        with torch.inference_mode():
            got = self._forward(self._blank_batch(), [*self.taps.names(), "final"])
        final = got.pop("final")
        if self.modality == "text":
            self._forms = {n: "tokens" for n in got}
            self.poolings = POOLINGS
        else:
            self._forms = {n: tensor_form(t, self._channels.get(n)) for n, t in got.items()}
            if (
                "layer.0" in got
                and got["layer.0"].ndim == 4
                and self._forms.get("layer.1") in ("nchw", "nhwc")
            ):
                self._forms["layer.0"] = self._forms["layer.1"]
            self.poolings = token_poolings(self._forms, self.num_prefix_tokens)
            self.channels_last = self.poolings == ("mean",) and "nchw" in self._forms.values()
            if self.channels_last:
                self.tower.to(memory_format=torch.channels_last)
        self._dims = {
            **{n: form_dim(got[n], self._forms[n]) for n in self.taps.names()},
            "final": int(final.shape[-1]),
        }

    def _blank_batch(self):
        if self.modality == "text":
            return self.collate(["a photo"])
        size = self.image_preprocess.size
        return torch.zeros(1, 3, size, size)

    @property
    def layer_dims(self) -> dict[str, int]:
        return dict(self._dims)

    # ---- per item / batch -------------------------------------------------------------------
    def collate(self, items):
        if self.modality == "text":
            return self.tokenizer(list(items))  # LongTensor [B, context_length]
        return super().collate(items)

    def preprocess_config(self) -> dict:
        if self.modality == "text":
            return {
                "tokenizer": self._tokenizer_name,
                "context_length": int(self.model.context_length),
            }
        return super().preprocess_config()

    # ---- the model --------------------------------------------------------------------------
    def _forward(self, batch: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        need_final = "final" in layers
        names = [n for n in layers if n != "final"]
        batch = batch.to(self.device)
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)

        def forward():
            if self.modality == "text":
                return self.model.encode_text(batch, normalize=True)
            pooled = self.tower(batch)
            if isinstance(pooled, tuple):  # towers built with output_tokens (CoCa)
                pooled = pooled[0]
            return F.normalize(pooled, dim=-1)

        got, final = self.taps.run(forward, names, stop_early=not need_final)
        if not self._batch_first:  # LND -> NLD
            got = {n: t.transpose(0, 1) if t.ndim == 3 else t for n, t in got.items()}
        if need_final:
            got["final"] = final
        return got

    def _pool_text(self, hidden: torch.Tensor, tokens: torch.Tensor, pooling: str) -> torch.Tensor:
        """The tower's own pooled token (EOT for CLIP) for `cls`; the real tokens' mean for `mean`."""
        hidden = hidden.float()
        b, t = tokens.shape
        pos = torch.arange(t, device=tokens.device)
        if self._pool_type == "argmax":
            idx = tokens.argmax(dim=-1)
            mask = pos[None] <= idx[:, None]
        elif self._pool_type == "eos" and self._eos_id is not None:
            idx = (tokens == self._eos_id).int().argmax(dim=-1)
            mask = pos[None] <= idx[:, None]
        else:
            mask = tokens != self._pad_id
            idx = (
                torch.zeros(b, dtype=torch.long, device=tokens.device)
                if self._pool_type == "first"
                else torch.full((b,), t - 1, dtype=torch.long, device=tokens.device)
            )
        if hidden.shape[1] == t + 1:  # a CoCa-style class token appended at the end
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            idx = torch.full((b,), t, dtype=torch.long, device=tokens.device)
        idx, mask = idx.to(hidden.device), mask.to(hidden.device)
        cls = hidden[torch.arange(b, device=hidden.device), idx]
        m = mask.to(hidden.dtype).unsqueeze(-1)
        mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return (
            {"cls": cls, "mean": mean}.get(pooling)
            if pooling != "cls+mean"
            else torch.cat([cls, mean], -1)
        )

    @torch.inference_mode()
    def encode(
        self, batch, layers: Sequence[str], pooling: str | None = None
    ) -> dict[str, torch.Tensor]:
        pooling = self.check_pooling(pooling)
        got = self._forward(batch, layers)
        out = {}
        for name in layers:
            if name == "final":
                out[name] = got[name].float()
            elif self.modality == "text":
                out[name] = self._pool_text(got[name], batch, pooling)
            else:
                out[name] = pool_form(got[name], self._forms[name], pooling, self.num_prefix_tokens)
        return out


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.isabs(name)


def _weights_fn(
    open_clip, arch: str, tag: str | None, model: nn.Module, tower: str, cache_dir=None
) -> Callable[[], str]:
    """How to hash the weights: the checkpoint file when there is one (open_clip has downloaded
    it by now: these calls find it in the cache), else the tower's tensors."""
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    if arch.startswith("local-dir:"):
        folder = Path(arch.partition(":")[2])
        return lambda: hash_dir(folder)
    if arch.startswith("hf-hub:"):
        repo = arch.partition(":")[2]
        return lambda: hash_file(download_pretrained_from_hf(repo, cache_dir=cache_dir))
    if tag and os.path.isfile(tag):
        return lambda: hash_file(tag)
    if tag:
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        return lambda: hash_file(download_pretrained(cfg, cache_dir=cache_dir))
    part = model.visual if tower == "image" else model
    return lambda: "random-init-" + module_weights_hash(part)


def create(spec: EncoderSpec, device: str | None = None, **open_clip_kwargs) -> OpenClipEncoder:
    """`open_clip:ARCH[@PRETRAINED]:image|text` -> OpenClipEncoder. Extra keyword arguments go to
    ``open_clip.create_model`` (e.g. ``force_image_size=256``, ``cache_dir=...``)."""
    open_clip = require("open_clip", "the open_clip backend", "open_clip_torch", extra="open_clip")
    if spec.modality not in ("image", "text"):
        raise SpecError(
            f"{spec}: name the tower, e.g. 'open_clip:{spec.name}:image' or 'open_clip:{spec.name}:text'"
        )
    name = spec.name
    if name.startswith(("hf-hub:", "local-dir:")):
        arch, tag = name, None
    else:
        arch, _, tag = name.partition("@")
        tag = tag or None
        if _looks_like_path(arch):
            arch = f"local-dir:{Path(arch).expanduser()}"
        elif tag and _looks_like_path(tag):
            tag = str(Path(tag).expanduser())
            if not os.path.isfile(tag):
                raise SpecError(f"{spec}: no weights file at {tag}")
        elif arch not in open_clip.list_models():
            raise SpecError(
                f"open_clip has no architecture '{arch}': `open_clip.list_models()` lists them"
            )
    if tag is None and not arch.startswith(("hf-hub:", "local-dir:")):
        log.warning("open_clip:%s has no pretrained weights (random initialisation)", name)
    try:
        model = open_clip.create_model(arch, pretrained=tag, **open_clip_kwargs)
    except RuntimeError as e:
        raise AnybindError(f"open_clip could not build {spec}: {e}") from e
    tokenizer_name = arch
    enc = OpenClipEncoder(
        spec,
        model,
        spec.modality,
        tokenizer_name,
        _weights_fn(open_clip, arch, tag, model, spec.modality, open_clip_kwargs.get("cache_dir")),
        options=open_clip_kwargs,
    )
    return enc.to(device) if device else enc
