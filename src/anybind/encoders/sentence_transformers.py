"""sentence-transformers backend: ``st:NAME-OR-DIR``.

``final`` is exactly what ``SentenceTransformer.encode`` returns (the model's own pooling,
Dense and Normalize modules included). ``layer.0`` ... ``layer.L`` are the hidden states of
the underlying transformer (``layer.0`` = embeddings), pooled by the attention-masked mean
over all non-padding tokens (``mean``), the first token (``cls``) or both (``cls+mean``).
The hidden states are captured during the same forward pass that produces ``final``.

    >>> enc = create_encoder("st:sentence-transformers/all-MiniLM-L6-v2")   # doctest: +SKIP
    >>> enc.embed(["a cat"], layers="3,final")["final"].shape              # doctest: +SKIP
    torch.Size([1, 384])

Options: ``local_files_only``, ``revision``, ``trust_remote_code``, ``device``, ``licence``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._deps import require
from .._hashing import hash_dir, hash_obj
from ..errors import AnybindError
from .base import Encoder, check_options, pool_tokens
from .hf import hash_state_dict, model_source, resolve_model_dir
from .spec import EncoderSpec

_OPTIONS = ("local_files_only", "revision", "trust_remote_code", "device", "licence")


def _hf_model(st_model) -> torch.nn.Module | None:
    """The transformers model inside the first module, if it has one (not for static embeddings)."""
    first = st_model[0]
    model = getattr(first, "auto_model", None) or getattr(first, "model", None)
    return model if isinstance(model, torch.nn.Module) and hasattr(model, "config") else None


class SentenceTransformerEncoder(Encoder):
    """A SentenceTransformer; ``final`` = ``model.encode``, layers = its transformer's hidden states."""

    modality = "text"
    poolings = ("mean", "cls", "cls+mean")

    def __init__(self, spec: EncoderSpec, model, *, model_dir: Path | None = None, licence: str | None = None):
        self.spec, self.model, self.model_dir, self.licence = spec, model.eval(), model_dir, licence
        self.model.requires_grad_(False)
        self.device = torch.device(model.device)
        self._weights_hash: str | None = None
        hf = _hf_model(model)
        self._hf_config = getattr(hf, "config", None)
        cfg = self._hf_config
        cfg = getattr(cfg, "text_config", None) or cfg
        n_layers, width = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None)
        self._layer_dims = {f"layer.{i}": int(width) for i in range(int(n_layers) + 1)} if n_layers and width else {}
        dim_fn = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        final_dim = dim_fn()
        if final_dim is None:  # a module that does not tell: run one sentence
            with torch.inference_mode():
                final_dim = self._forward(["probe"], hidden=False)["sentence_embedding"].shape[-1]
        self._layer_dims["final"] = int(final_dim)

    @property
    def layer_dims(self) -> dict[str, int]:
        return dict(self._layer_dims)

    def _features(self, texts: Sequence[str]) -> dict[str, Any]:
        preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = preprocess(list(texts))
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}

    def _forward(self, texts: Sequence[str], hidden: bool) -> dict[str, Any]:
        """The model's own forward (as `encode` runs it); with `hidden`, the transformer module
        also returns ``all_layer_embeddings``, which it does when its config asks for them."""
        features = self._features(texts)
        cfg = self._hf_config
        before = getattr(cfg, "output_hidden_states", False)
        if cfg is not None:
            cfg.output_hidden_states = hidden
        try:
            return self.model(features)
        finally:
            if cfg is not None:
                cfg.output_hidden_states = before

    @torch.inference_mode()
    def encode(self, batch: Any, layers: Sequence[str], pooling: str | None = None) -> dict[str, torch.Tensor]:
        pooling = self.check_pooling(pooling)
        layers = list(layers)
        hidden = any(name != "final" for name in layers)
        out = self._forward(batch, hidden)
        states = out.get("all_layer_embeddings")
        if hidden and (states is None or states[0].shape[:2] != out["attention_mask"].shape):
            raise AnybindError(f"{self.spec}: the transformer gave no per-token hidden states for layers")
        feats = {}
        for name in layers:
            if name == "final":
                feats[name] = out["sentence_embedding"].float()
            else:
                h = states[int(name.split(".")[1])].float()
                feats[name] = pool_tokens(h, pooling, out["attention_mask"], num_prefix=0)
        return feats

    def weights_hash(self) -> str:
        if self._weights_hash is None:
            if self.model_dir is not None and self.model_dir.is_dir():
                self._weights_hash = hash_dir(self.model_dir)
            else:
                self._weights_hash = hash_obj({"st": hash_state_dict(self.model)})
        return self._weights_hash

    def preprocess_config(self) -> dict:
        return {"max_seq_length": getattr(self.model, "max_seq_length", None),
                "modules": [type(m).__name__ for m in self.model]}


def create(spec: EncoderSpec, **options) -> SentenceTransformerEncoder:
    """``st:NAME-OR-DIR`` -> SentenceTransformerEncoder (text only)."""
    check_options(spec, options, _OPTIONS, "the st: backend")
    if spec.modality not in (None, "text"):
        raise AnybindError(f"{spec}: the st: backend encodes text only")
    st = require("sentence_transformers", "the st: encoder backend", "sentence-transformers", "st")
    source = model_source(spec.name)
    kw = {k: options[k] for k in ("revision", "trust_remote_code") if options.get(k)}
    if options.get("local_files_only"):
        kw["local_files_only"] = True
    device = options.get("device") or "cpu"
    try:
        model = st.SentenceTransformer(source, device=str(device), **kw)
    except OSError as e:
        raise AnybindError(
            f"cannot load '{source}' with sentence-transformers: {e}. Give a local folder "
            "('st:/path/to/dir') or a hub name that is cached or reachable."
        ) from e
    return SentenceTransformerEncoder(
        spec, model, model_dir=resolve_model_dir(source, options.get("revision")),
        licence=options.get("licence"),
    )
