"""Align: projectors, losses, recipes, one trainer, and training-free baselines."""

from .recipe import Recipe, RecipeError, available_recipes, load_recipe

__all__ = ["Recipe", "RecipeError", "available_recipes", "load_recipe", "train"]


def train(*args, **kwargs):
    """See `anybind.align.trainer.train` (imported on first use)."""
    from .trainer import train as _train

    return _train(*args, **kwargs)
