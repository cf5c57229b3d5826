"""Bundles: a bound model as a folder (`export_bundle`), loaded in one line (`load`)."""

from .export import export_bundle
from .model import BUNDLE_FORMAT, BoundEncoders, BundleError, load

__all__ = ["BUNDLE_FORMAT", "BoundEncoders", "BundleError", "export_bundle", "load"]
