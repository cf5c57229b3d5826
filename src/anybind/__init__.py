"""anybind: bind frozen pretrained encoders into one shared embedding space.

Importing anybind imports no model backend (transformers, timm, open_clip, onnxruntime):
they load on first use.
"""

from .errors import AnybindError

__version__ = "0.1.0"

__all__ = ["AnybindError", "__version__"]
