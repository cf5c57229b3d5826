"""Hugging Face transformers backend: ``hf:NAME-OR-DIR[:image|:text|:audio]``.

Any ``AutoModel`` checkpoint (a hub name, or a local folder written by ``save_pretrained``)
becomes an Encoder with canonical layers:

- ``layer.0`` = the embeddings output, ``layer.i`` = the output of block i (the model's
  ``hidden_states`` with ``output_hidden_states=True``), pooled by ``cls``, ``mean`` or
  ``cls+mean``. Text ``mean`` is the attention-masked mean over every non-padding token
  (special tokens included, as sentence-transformers does); image ``mean`` averages the patch
  tokens only (CLS, distillation and register tokens excluded).
- ``final`` = the model's own output embedding. Text: the masked mean of
  ``last_hidden_state`` (what sentence-transformers models output; ``normalize=True`` adds
  their L2 normalisation). Image: ``pooler_output`` when the checkpoint trained one (DINOv2:
  the layer-normed CLS), else the layer-normed CLS token (else the mean, for models without
  one). Dual-tower checkpoints (CLIP, SigLIP, ...) need ``:image`` or ``:text`` and give the
  projected embedding.

    >>> enc = create_encoder("hf:facebook/dinov2-small")              # doctest: +SKIP
    >>> enc.embed(["cat.jpg"], layers="8,final", pooling="cls+mean")  # doctest: +SKIP

Audio (``HFAudioEncoder``; Wav2Vec2, HuBERT, WavLM, Whisper's encoder, CLAP's audio tower):
the feature extractor saved with the model (``AutoFeatureExtractor``) runs per clip in the
workers, at its sample rate, on the first 30 s (Whisper: its window; CLAP: its
``max_length_s``). ``layer.i`` = ``hidden_states[i]`` pooled over the frames that hold the
clip (``mean`` or ``mean+max``; padding frames dropped by the clip's length); ``final`` = the
masked mean of the last hidden state, or CLAP's (projected) pooler output. A clip's features
do not depend on its batch: models that take an attention mask are padded and masked;
waveform models without one (wav2vec2-base and other group-norm models, which padding would
change) run clips of equal length together; Whisper and CLAP pad every clip to their fixed
window (CLAP's pooling covers the whole window, which its extractor fills by repeating the
clip, as CLAP was trained).

Options (``create_encoder(spec, **options)``): ``max_length`` (text truncation; default the
model's own: sentence-transformers' ``max_seq_length`` if the folder has one, else the
tokenizer's), ``normalize`` (L2-normalise ``final``), ``local_files_only``, ``revision``,
``trust_remote_code``, ``device``, ``licence``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .._deps import require
from .._hashing import hash_dir, hash_obj
from ..errors import AnybindError, DataError, SpecError
from .base import AUDIO_POOLINGS, Encoder, check_options, pool_feature_map, pool_tokens
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from .spec import EncoderSpec

log = logging.getLogger(__name__)

#: model types whose configs are vision models even where image_size/num_channels are missing
VISION_MODEL_TYPES = frozenset({
    "vit", "deit", "beit", "dinov2", "dinov2_with_registers", "dinov3_vit", "dinov3_convnext",
    "swin", "swinv2", "convnext", "convnextv2", "resnet", "regnet", "efficientnet", "mobilenet_v2",
    "mobilevit", "levit", "pvt", "pvt_v2", "poolformer", "segformer", "vit_mae", "vit_msn", "ijepa",
    "data2vec-vision", "hiera", "clip_vision_model", "siglip_vision_model", "siglip2_vision_model",
    "focalnet", "bit", "dit", "vit_hybrid", "cvt", "van", "nat", "dinat", "hgnet_v2",
})
#: model types of audio models (modality "audio" without a ``:audio`` suffix)
AUDIO_MODEL_TYPES = frozenset({
    "wav2vec2", "wav2vec2-conformer", "hubert", "wavlm", "whisper", "data2vec-audio", "unispeech",
    "unispeech-sat", "sew", "sew-d", "clap", "clap_audio_model",
})
#: PIL resample codes used by image processors -> ImagePreprocess interpolation names
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_OPTIONS = ("max_length", "normalize", "local_files_only", "revision", "trust_remote_code",
            "device", "licence")


def _transformers():
    return require("transformers", "the hf: encoder backend", "transformers", "hf")


@contextlib.contextmanager
def _quiet_loading(transformers):
    """No "Loading weights" bar per model load: extraction shows its own progress."""
    hf_logging = transformers.utils.logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def hub_kwargs(local_files_only: bool | None = None, revision: str | None = None,
               trust_remote_code: bool = False) -> dict:
    """The keyword arguments every ``from_pretrained`` call of one encoder shares."""
    kw: dict[str, Any] = {}
    if local_files_only:
        kw["local_files_only"] = True
    if revision:
        kw["revision"] = revision
    if trust_remote_code:
        kw["trust_remote_code"] = True
    return kw


def model_source(name: str) -> str:
    """A local folder (``~`` expanded, must exist) or a hub name, as ``from_pretrained`` wants it."""
    if name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not path.is_dir():
            raise SpecError(f"model folder '{name}' does not exist")
        return str(path.resolve())
    return name


def resolve_model_dir(source: str, revision: str | None = None) -> Path | None:
    """The local folder holding a model's files: the folder itself, or the HF cache snapshot."""
    path = Path(source)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception as e:  # not in the local cache (or no huggingface_hub): caller falls back
        log.debug("no local snapshot for %s: %s", source, e)
        return None


def hash_state_dict(module: torch.nn.Module) -> str:
    """Content hash of a module's parameters and buffers (when no weight files can be found)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def infer_modality(config) -> str:
    """``image`` for vision configs, ``text`` otherwise; dual-tower configs need a ``:modality``."""
    model_type = getattr(config, "model_type", "")
    if model_type in AUDIO_MODEL_TYPES:
        return "audio"  # CLAP's text tower needs ':text'
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        raise SpecError(
            f"'{model_type}' has both an image and a text tower: add ':image' or ':text' to the spec"
        )
    if model_type in VISION_MODEL_TYPES or (hasattr(config, "image_size") and hasattr(config, "num_channels")):
        return "image"
    return "text"


def _size_get(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    if isinstance(size, int) and key == "shortest_edge":
        return size
    return getattr(size, key, None)


def _interpolation(resample) -> str:
    try:
        return _RESAMPLE.get(int(resample), "bicubic")
    except (TypeError, ValueError):
        name = str(resample).lower()
        return next((v for v in ("bicubic", "bilinear", "nearest") if v in name), "bicubic")


def image_preprocess_from_processor(processor, config=None) -> ImagePreprocess:
    """ImagePreprocess from an HF image processor: resize the short side, centre-crop, normalise.

    A processor that resizes straight to height x width (ViT) squashes the image to that size.
    """
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    short = _size_get(size, "shortest_edge")
    h, w = _size_get(size, "height"), _size_get(size, "width")
    do_crop = bool(getattr(processor, "do_center_crop", False)) and crop is not None
    if do_crop:
        out = _size_get(crop, "height") or _size_get(crop, "width")
        resize = short or h or out
    else:
        out = h or short or _config_image_size(config) or 224
        resize = short or out
    if not getattr(processor, "do_resize", True):
        resize = out
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(x) for x in (getattr(processor, "image_mean", None) or IMAGENET_MEAN))
        std = tuple(float(x) for x in (getattr(processor, "image_std", None) or IMAGENET_STD))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if w and h and w != h:
        log.warning("image processor resizes to %sx%s; anybind uses a square %s crop", h, w, out)
    # a processor that resizes straight to height x width with no crop squashes the image
    mode = "squash" if (h and not short and not do_crop) else "shortest"
    return ImagePreprocess(size=int(out), resize=int(max(resize, out)), mean=mean, std=std,
                           interpolation=_interpolation(getattr(processor, "resample", 3)), resize_mode=mode)


def _config_image_size(config) -> int | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


def image_preprocess_from_config(config) -> ImagePreprocess:
    """No image processor saved: the config's image size, a 224/256 crop, ImageNet statistics."""
    size = _config_image_size(config) or 224
    return ImagePreprocess(size=size, resize=round(size * 256 / 224))


def sentence_transformers_settings(model_dir: Path | None) -> dict:
    """``max_seq_length`` / ``do_lower_case`` from a sentence-transformers folder, if it is one."""
    if model_dir is None or not (model_dir / "sentence_bert_config.json").is_file():
        return {}
    try:
        return json.loads((model_dir / "sentence_bert_config.json").read_text())
    except (OSError, ValueError):
        return {}


def _select_tower(model, modality: str):
    """Dual-tower models (CLIP, SigLIP, ...): the tower of `modality` and its projection."""
    tower_attr = "vision_model" if modality == "image" else "text_model"
    if hasattr(model, "audio_model") and hasattr(model, "text_model"):  # CLAP
        kind = "audio" if modality == "audio" else "text"
        return getattr(model, f"{kind}_model"), getattr(model, f"{kind}_projection", None)
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        proj = getattr(model, "visual_projection" if modality == "image" else "text_projection", None)
        return getattr(model, tower_attr), proj
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder(), None  # T5 and friends: the encoder stack
    return model, None


class HFEncoder(Encoder):
    """A transformers model with canonical layers (see the module docstring)."""

    def __init__(
        self,
        spec: EncoderSpec,
        model: torch.nn.Module,
        *,
        modality: str,
        tokenizer=None,
        image_preprocess: ImagePreprocess | None = None,
        projection: torch.nn.Module | None = None,
        use_pooler: bool | None = None,
        max_length: int | None = None,
        lowercase: bool = False,
        normalize: bool = False,
        model_dir: Path | None = None,
        revision: str | None = None,
        licence: str | None = None,
    ):
        self.spec, self.modality = spec, modality
        self.model = model.eval().requires_grad_(False)
        self.projection = projection.eval().requires_grad_(False) if projection is not None else None
        self.tokenizer, self.image_preprocess = tokenizer, image_preprocess
        # `final` from the model's pooler: image models that trained one, dual-tower text towers
        self.use_pooler = modality == "image" if use_pooler is None else use_pooler
        self.normalize, self.lowercase = normalize, lowercase
        self.max_length = max_length
        self.model_dir, self.revision, self.licence = model_dir, revision, licence
        self._weights_hash: str | None = None
        self._forward_params = set(inspect.signature(self.model.forward).parameters)
        if tokenizer is not None:
            tokenizer.padding_side = "right"  # `cls` is the first token; masks handle the rest
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self._probe()

    # ---- what the encoder has -------------------------------------------------------------
    def _probe(self) -> None:
        """One tiny forward pass: how many hidden states, their widths, prefix tokens, final dim."""
        if self.modality == "text":
            batch: Any = ["probe"]
        else:
            s = self.image_preprocess.size
            batch = torch.zeros(1, self._num_channels(), s, s)
        with torch.inference_mode():
            out, _ = self._forward(batch, hidden=True)
        hidden = out.hidden_states
        if hidden is None:
            raise AnybindError(f"{self.spec}: the model returns no hidden_states; it cannot give layers")
        self._spatial = hidden[0].ndim == 4  # CNNs: [B, C, H, W] feature maps
        self._dims = [int(h.shape[1] if h.ndim == 4 else h.shape[-1]) for h in hidden]
        self.num_prefix = 0 if (self.modality == "text" or self._spatial) else self._count_prefix(hidden[0])
        if self.modality == "text":
            self.poolings = ("mean", "cls", "cls+mean")
        elif self.num_prefix > 0:
            self.poolings = ("cls", "mean", "cls+mean")
        else:
            self.poolings = ("mean",)
        if getattr(out, "pooler_output", None) is None:
            self.use_pooler = False
        self._final_dim = int(self._final(out, None).shape[-1])

    def _num_channels(self) -> int:
        cfg = getattr(self.model, "config", None)
        return int(getattr(cfg, "num_channels", 3) or 3)

    def _count_prefix(self, tokens: torch.Tensor) -> int:
        """Tokens before the patches (CLS, distillation, registers) = length - number of patches."""
        cfg = self.model.config
        patch = getattr(cfg, "patch_size", None)
        if isinstance(patch, (list, tuple)):
            patch = patch[0]
        if not patch or tokens.ndim != 3:
            return 0
        n_patches = (self.image_preprocess.size // int(patch)) ** 2
        return max(int(tokens.shape[1]) - n_patches, 0)

    @property
    def layer_dims(self) -> dict[str, int]:
        return {**{f"layer.{i}": d for i, d in enumerate(self._dims)}, "final": self._final_dim}

    # ---- the model ----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pad to the longest, truncate to `max_length`; tensors on the encoder's device."""
        texts = [t.lower() for t in texts] if self.lowercase else list(texts)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        keep = self._forward_params if "input_ids" in self._forward_params else set(enc)
        return {k: v.to(self.device) for k, v in enc.items() if k in keep}

    def _forward(self, batch: Any, hidden: bool):
        """Run the model; returns (outputs, attention mask or None)."""
        if self.modality == "text":
            inputs = self.tokenize(batch)
            mask = inputs.get("attention_mask")
        else:
            pixels = batch if isinstance(batch, torch.Tensor) else torch.as_tensor(batch)
            inputs = {"pixel_values": pixels.to(self.device, torch.float32)}
            if "interpolate_pos_encoding" in self._forward_params:
                size = _config_image_size(self.model.config)
                if size and size != pixels.shape[-1]:
                    inputs["interpolate_pos_encoding"] = True
            mask = None
        out = self.model(**inputs, output_hidden_states=hidden)
        return out, mask

    def _pool_layer(self, h: torch.Tensor, pooling: str, mask) -> torch.Tensor:
        if h.ndim == 4:
            return pool_feature_map(h)
        return pool_tokens(h.float(), pooling, mask, num_prefix=self.num_prefix)

    def _final(self, out, mask) -> torch.Tensor:
        last = out.last_hidden_state
        if self.use_pooler and getattr(out, "pooler_output", None) is not None:
            h = out.pooler_output.flatten(1)
        elif self.modality == "text":
            if mask is None:
                mask = torch.ones(last.shape[:2], device=last.device)
            h = pool_tokens(last.float(), "mean", mask, num_prefix=0)
        elif last.ndim == 4:
            h = pool_feature_map(last)
        elif self.num_prefix == 0:
            h = last.mean(1)
        else:
            h = last[:, 0]
        if self.projection is not None:
            h = self.projection(h.to(next(self.projection.parameters()).dtype))
        h = h.float()
        return torch.nn.functional.normalize(h, dim=-1) if self.normalize else h

    @torch.inference_mode()
    def encode(self, batch: Any, layers: Sequence[str], pooling: str | None = None) -> dict[str, torch.Tensor]:
        pooling = self.check_pooling(pooling)
        layers = list(layers)
        out, mask = self._forward(batch, hidden=any(name != "final" for name in layers))
        feats = {}
        for name in layers:
            if name == "final":
                feats[name] = self._final(out, mask)
            else:
                feats[name] = self._pool_layer(out.hidden_states[int(name.split(".")[1])], pooling, mask).float()
        return feats

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.model, self.projection) if m is not None]

    # ---- identity -----------------------------------------------------------------------------
    def weights_hash(self) -> str:
        if self._weights_hash is None:
            if self.model_dir is not None and self.model_dir.is_dir():
                self._weights_hash = hash_dir(self.model_dir)
            else:
                mods = {"model": self.model, **({"proj": self.projection} if self.projection else {})}
                self._weights_hash = hash_obj({k: hash_state_dict(m) for k, m in mods.items()})
        return self._weights_hash

    def preprocess_config(self) -> dict:
        """Everything besides the weights that changes the features: inputs and how `final` is made."""
        final = {"final": self.final_mode() + ("+projection" if self.projection is not None else "")
                 + ("+l2" if self.normalize else "")}
        if self.modality == "text":
            return {"max_length": self.max_length, "lowercase": self.lowercase, **final}
        return {**super().preprocess_config(), **final}

    def final_mode(self) -> str:
        """How `final` is pooled: pooler, mean, cls."""
        if self.use_pooler:
            return "pooler"
        if self.modality == "text" or self.num_prefix == 0:
            return "mean"
        return "cls"


# ---- audio ------------------------------------------------------------------------------------
MAX_SECONDS = 30  # waveform models: the first 30 s of a clip (Whisper and CLAP: their own window)
_AUDIO_INPUTS = ("input_values", "input_features", "is_longer")  # what a clip carries to `encode`


class AudioClip(NamedTuple):
    """One preprocessed clip: its model inputs (no batch axis) and its length in samples."""

    inputs: dict
    samples: int


def audio_family(model) -> str:
    """``whisper`` (log-mel, fixed window), ``clap`` (fused mel image) or ``waveform`` (raw samples)."""
    model_type = getattr(model.config, "model_type", "")
    if model_type.startswith("whisper"):
        return "whisper"
    if model_type.startswith("clap"):
        return "clap"
    return "waveform"


class HFAudioEncoder(HFEncoder):
    """A transformers audio model with canonical layers (see the module docstring)."""

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, *, feature_extractor, **kw):
        self.feature_extractor, self.family = feature_extractor, audio_family(model)
        self.sample_rate = int(getattr(feature_extractor, "sampling_rate", 16000))
        fe = feature_extractor
        self.max_samples = int(getattr(fe, "n_samples", 0) if self.family == "whisper" else
                               getattr(fe, "nb_max_samples", 0) if self.family == "clap" else 0) \
            or MAX_SECONDS * self.sample_rate
        # waveform models without an attention mask change under padding: equal lengths run together
        self.masked = self.family == "waveform" and bool(getattr(fe, "return_attention_mask", False))
        super().__init__(spec, model, modality="audio", **kw)

    def _probe(self) -> None:
        rng = np.random.default_rng(0)
        clip = self.preprocess((0.1 * rng.standard_normal(self.sample_rate)).astype(np.float32))
        with torch.inference_mode():
            out, _ = self._forward_audio([clip], hidden=True)
        if out.hidden_states is None:
            raise AnybindError(f"{self.spec}: the model returns no hidden_states; it cannot give layers")
        self._spatial = out.hidden_states[0].ndim == 4  # CLAP's Swin stages: [B, C, H, W]
        self._dims = [int(h.shape[1] if h.ndim == 4 else h.shape[-1]) for h in out.hidden_states]
        self.num_prefix, self.poolings = 0, AUDIO_POOLINGS
        self.use_pooler = self.family == "clap" and getattr(out, "pooler_output", None) is not None
        self._final_dim = int(self._final(out, None).shape[-1])

    # ---- per item (worker processes) -------------------------------------------------------
    def preprocess(self, raw: Any) -> AudioClip:
        """The feature extractor on one clip (its first `max_samples`): no padding, that is `encode`'s."""
        x = np.asarray(raw, dtype=np.float32)[: self.max_samples]
        if x.ndim != 1 or not x.size:
            raise DataError(f"audio must be a non-empty 1-D array of samples, got shape {x.shape}")
        got = self.feature_extractor([x], sampling_rate=self.sample_rate, return_tensors="np")
        return AudioClip({k: np.asarray(got[k][0]) for k in _AUDIO_INPUTS if k in got}, int(x.size))

    # ---- the model ----------------------------------------------------------------------------
    def _groups(self, clips: Sequence[AudioClip]) -> list[list[int]]:
        """Positions run together: all, or (unmasked waveform models) those of equal length."""
        if self.family != "waveform" or self.masked:
            return [list(range(len(clips)))]
        groups: dict[int, list[int]] = {}
        for i, clip in enumerate(clips):
            groups.setdefault(clip.samples, []).append(i)
        return list(groups.values())

    def _forward_audio(self, clips: Sequence[AudioClip], hidden: bool):
        """(outputs, frame mask [B, T] or None) for clips padded to the longest with a mask."""
        lengths = torch.tensor([c.samples for c in clips])
        inputs = {k: _pad_stack([c.inputs[k] for c in clips], float(getattr(self.feature_extractor, "padding_value", 0.0)))
                  for k in clips[0].inputs}
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in self._forward_params}
        if self.masked and "attention_mask" in self._forward_params:
            inputs["attention_mask"] = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long().to(self.device)
        out = self.model(**inputs, output_hidden_states=hidden)
        return out, self._frame_mask(out, lengths)

    def _frame_mask(self, out, lengths: torch.Tensor) -> torch.Tensor | None:
        """Which output frames hold the clip: from the clip lengths (CLAP: all; see the docstring)."""
        if self.family == "clap":
            return None
        total = out.last_hidden_state.shape[1]
        if self.family == "whisper":  # 10 ms log-mel frames, halved by the second convolution
            mel = -(-lengths // int(self.feature_extractor.hop_length))
            frames = -(-mel * total // int(self.feature_extractor.nb_max_frames))
        else:
            frames = self.model._get_feat_extract_output_lengths(lengths)
        frames = frames.clamp(1, total)
        return (torch.arange(total)[None] < frames[:, None]).to(self.device)

    def _pool_layer(self, h: torch.Tensor, pooling: str, mask) -> torch.Tensor:
        if h.ndim == 4:  # a feature map: every position is a frame
            h, mask = h.flatten(2).transpose(1, 2), None
        return pool_tokens(h.float(), pooling, mask, num_prefix=0)

    def _final(self, out, mask) -> torch.Tensor:
        if self.use_pooler:
            h = out.pooler_output.flatten(1)
            if self.projection is not None:
                h = self.projection(h.to(next(self.projection.parameters()).dtype))
        else:
            h = self._pool_layer(out.last_hidden_state, "mean", mask)
        h = h.float()
        return torch.nn.functional.normalize(h, dim=-1) if self.normalize else h

    @torch.inference_mode()
    def encode(self, batch: Sequence[AudioClip], layers: Sequence[str], pooling: str | None = None) -> dict[str, torch.Tensor]:
        pooling, layers = self.check_pooling(pooling), list(layers)
        feats: dict[str, list] = {name: [None] * len(batch) for name in layers}
        for idx in self._groups(batch):
            out, mask = self._forward_audio([batch[i] for i in idx], hidden=any(n != "final" for n in layers))
            for name in layers:
                got = (self._final(out, mask) if name == "final"
                       else self._pool_layer(out.hidden_states[int(name.split(".")[1])], pooling, mask))
                for k, i in enumerate(idx):
                    feats[name][i] = got[k].float()
        return {name: torch.stack(rows) for name, rows in feats.items()}

    def preprocess_config(self) -> dict:
        fe = self.feature_extractor.to_dict()
        fe.pop("mel_filters", None)
        return {"sample_rate": self.sample_rate, "max_samples": self.max_samples,
                "feature_extractor": hash_obj(fe), "padding": "mask" if self.masked else self.family,
                "final": self.final_mode() + ("+projection" if self.projection is not None else "")
                + ("+l2" if self.normalize else "")}

    def final_mode(self) -> str:
        return "pooler" if self.use_pooler else "mean"


def _pad_stack(arrays: list[np.ndarray], value: float) -> torch.Tensor:
    """Arrays padded on the last axis to the longest with `value`, stacked."""
    width = max(a.shape[-1] for a in arrays) if arrays[0].ndim else 0
    if not width:
        return torch.from_numpy(np.stack(arrays))
    out = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])], constant_values=value) for a in arrays]
    return torch.from_numpy(np.stack(out))


# ---- construction -----------------------------------------------------------------------------
def _default_max_length(tokenizer, config, st_settings: dict) -> int:
    if st_settings.get("max_seq_length"):
        return int(st_settings["max_seq_length"])
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 1_000_000:
        return int(limit)
    return int(min(getattr(config, "max_position_embeddings", 512) or 512, 512))


def _load_image_preprocess(source: str, config, kw: dict) -> ImagePreprocess:
    transformers = _transformers()
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.info("%s has no usable image processor (%s); preprocessing from the config", source, e)
        return image_preprocess_from_config(config)
    return image_preprocess_from_processor(processor, config)


def load_hf_encoder(
    spec: EncoderSpec,
    source: str,
    *,
    modality: str | None = None,
    max_length: int | None = None,
    normalize: bool = False,
    local_files_only: bool | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    licence: str | None = None,
) -> HFEncoder:
    """Load a transformers checkpoint (a folder or a hub name) as an HFEncoder."""
    transformers = _transformers()
    kw = hub_kwargs(local_files_only, revision, trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(source, **kw)
    except OSError as e:
        raise AnybindError(
            f"cannot load '{source}' with transformers: {e}. Give a local folder written by "
            "save_pretrained ('hf:/path/to/dir') or a hub name that is cached or reachable."
        ) from e
    modality = modality or infer_modality(config)
    if modality not in ("image", "text", "audio"):
        raise SpecError(f"the hf: backend encodes images, text and audio, not {modality}")
    with _quiet_loading(transformers):
        # CLAP's audio tower saved on its own has no AutoModel entry
        auto = transformers.ClapAudioModel if config.model_type == "clap_audio_model" else transformers.AutoModel
        model, info = auto.from_pretrained(source, output_loading_info=True, **kw)
    tower, projection = _select_tower(model, modality)
    if modality == "audio":
        enc = load_audio_encoder(spec, source, tower, projection, kw, normalize=normalize,
                                 model_dir=resolve_model_dir(source, revision), revision=revision, licence=licence)
        return enc.to(device) if device is not None else enc
    missing = set(info.get("missing_keys", ()))
    # a pooler that the checkpoint does not hold is random: never use it as `final`
    use_pooler = not any(k.startswith("pooler.") or ".pooler." in k for k in missing)
    model_dir = resolve_model_dir(source, revision)
    if modality == "text":
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kw)
        st = sentence_transformers_settings(model_dir)
        dual_tower = tower is not model and not getattr(config, "is_encoder_decoder", False)
        enc = HFEncoder(
            spec, tower, modality="text", tokenizer=tokenizer, projection=projection,
            use_pooler=dual_tower,
            max_length=max_length or _default_max_length(tokenizer, config, st),
            lowercase=bool(st.get("do_lower_case", False)), normalize=normalize,
            model_dir=model_dir, revision=revision, licence=licence,
        )
    else:
        vision_config = getattr(config, "vision_config", None) or config
        enc = HFEncoder(
            spec, tower, modality="image", image_preprocess=_load_image_preprocess(source, vision_config, kw),
            projection=projection, use_pooler=use_pooler, normalize=normalize,
            model_dir=model_dir, revision=revision, licence=licence,
        )
    return enc.to(device) if device is not None else enc


def load_audio_encoder(spec: EncoderSpec, source: str, tower, projection, kw: dict, **options) -> HFAudioEncoder:
    """An audio tower with the feature extractor saved beside it (AutoFeatureExtractor)."""
    transformers = _transformers()
    try:
        fe = transformers.AutoFeatureExtractor.from_pretrained(source, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AnybindError(f"{spec}: no usable audio feature extractor in '{source}' ({e}); save it beside the "
                           "model (feature_extractor.save_pretrained(folder))") from e
    return HFAudioEncoder(spec, tower, feature_extractor=fe, projection=projection, **options)


def create(spec: EncoderSpec, **options) -> HFEncoder:
    """``hf:NAME-OR-DIR[:modality]`` -> HFEncoder. Options: see the module docstring."""
    check_options(spec, options, _OPTIONS, "the hf: backend")
    return load_hf_encoder(spec, model_source(spec.name), modality=spec.modality, **options)
