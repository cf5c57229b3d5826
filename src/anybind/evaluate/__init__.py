"""Evaluation: retrieval recall@k, zero-shot classification (pure functions; definitions in each module)."""

from .retrieval import best_positive_rank, chance_recall, recall_at_k, retrieval_metrics
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
    "available_templates", "best_positive_rank", "chance_metrics", "chance_recall", "class_embeddings",
    "classification_metrics", "load_templates", "recall_at_k", "retrieval_metrics", "zeroshot_classify",
    "zeroshot_evaluate",
]
