"""Assess: how alignable are encoders and layers, measured on paired features before training."""

__all__ = ["assess"]


def assess(*args, **kwargs):
    """See `anybind.assess.rank.assess`."""
    from .rank import assess as _assess

    return _assess(*args, **kwargs)

