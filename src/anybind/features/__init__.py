"""Feature extraction and the feature store (format v1)."""

from .extract import extract
from .layers import resolve_layers
from .store import (
    FeatureStore,
    LayerArray,
    StoreKey,
    find_store,
    list_stores,
    remove_store,
    write_store,
)

__all__ = ["FeatureStore", "LayerArray", "StoreKey", "extract", "find_store", "list_stores", "remove_store", "resolve_layers",
           "write_store"]
