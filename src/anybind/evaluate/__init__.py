"""Evaluation: retrieval recall@k (pure functions; the definition is in `retrieval`)."""

from .retrieval import best_positive_rank, chance_recall, recall_at_k, retrieval_metrics

__all__ = ["best_positive_rank", "chance_recall", "recall_at_k", "retrieval_metrics"]
