"""Encoders: spec strings -> frozen models with canonical layers. Backends load lazily."""

from .base import POOLINGS, Encoder, pool_feature_map, pool_tokens
from .preprocess import ImagePreprocess
from .registry import (
    BACKENDS,
    PACKAGED,
    create_encoder,
    list_encoders,
    packaged_names,
    register_backend,
    register_packaged,
)
from .spec import MODALITIES, EncoderSpec, parse_spec

__all__ = [
    "BACKENDS", "PACKAGED", "POOLINGS", "MODALITIES", "Encoder", "EncoderSpec", "ImagePreprocess", "create_encoder",
    "list_encoders", "packaged_names", "parse_spec", "pool_feature_map", "pool_tokens",
    "register_backend", "register_packaged",
]
