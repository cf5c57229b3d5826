"""Evaluation: zero-shot classification, linear probes, leakage, the suite and its protocol
(definitions in each module; retrieval recall@k lives in `anybind.metrics`)."""

from .leakage import leakage_warning, near_duplicate_share
from .probe import LinearProbe, fit_linear_probe, mean_per_class_recall, probe_metrics
from .zeroshot import (
    available_templates,
    chance_metrics,
    class_embeddings,
    classification_metrics,
    load_templates,
    zeroshot_classify,
    zeroshot_evaluate,
)

__all__ = [
    "LinearProbe", "fit_linear_probe", "leakage_warning", "mean_per_class_recall", "near_duplicate_share",
    "probe_metrics",
    "available_templates", "chance_metrics", "class_embeddings",
    "classification_metrics", "load_templates", "zeroshot_classify",
    "zeroshot_evaluate",
]
