"""Metric functions with published definitions, below every stage that needs them (training's
validation, evaluation, search): retrieval recall@k and its chance level."""

from .retrieval import (
    best_positive_rank,
    chance_recall,
    chance_retrieval_metrics,
    recall_at_k,
    retrieval_metrics,
)

__all__ = ["best_positive_rank", "chance_recall", "chance_retrieval_metrics", "recall_at_k",
           "retrieval_metrics"]
