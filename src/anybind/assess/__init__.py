"""Assess: how alignable are encoders and layers, measured on paired features before training."""

__all__ = ["assess", "auto_layers"]


def assess(*args, **kwargs):
    """See `anybind.assess.rank.assess`."""
    from .rank import assess as _assess

    return _assess(*args, **kwargs)


def auto_layers(*args, **kwargs):
    """See `anybind.assess.rank.auto_layers`."""
    from .rank import auto_layers as _auto

    return _auto(*args, **kwargs)
