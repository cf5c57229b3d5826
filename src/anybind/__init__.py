"""anybind: bind frozen pretrained encoders into one shared embedding space.

Importing anybind imports no model backend (transformers, timm, open_clip, onnxruntime):
they load on first use.
"""

from .errors import AnybindError

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """Load a bundle written by `anybind export`: ``anybind.load("bundle").encode_text(["a bird"])``."""
    from .bundle import load as _load

    return _load(path, device)


__all__ = ["AnybindError", "__version__", "load"]
