"""Evaluation: retrieval recall@k, zero-shot classification, linear probes, leakage (definitions in each module)."""

from .leakage import leakage_warning, near_duplicate_share
from .probe import LinearProbe, fit_linear_probe, mean_per_class_recall, probe_metrics
from ..metrics.retrieval import best_positive_rank, chance_recall, recall_at_k, retrieval_metrics
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
    "available_templates", "best_positive_rank", "chance_metrics", "chance_recall", "class_embeddings",
    "classification_metrics", "load_templates", "recall_at_k", "retrieval_metrics", "zeroshot_classify",
    "zeroshot_evaluate",
]
