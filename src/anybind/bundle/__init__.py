"""Bundles: a trained run's bound model + its encoders' specs, as one folder (`anybind export`),
and `load` that gives `encode(modality, items)`, `classify` and `gallery` on raw items."""

from .export import export_bundle
from .model import BUNDLE_FORMAT, Bundle, BundleError, is_bundle, load

__all__ = ["BUNDLE_FORMAT", "Bundle", "BundleError", "export_bundle", "is_bundle", "load"]
