"""anybind.runtime: run a bundle exported with ``anybind export --onnx`` without torch.

It needs onnxruntime, numpy, Pillow and tokenizers only (``pip install 'anybind[runtime]'``, or
``pip install --no-deps anybind`` plus those four) and never imports torch: the encoders and
projectors are ONNX graphs, the blend and the retrieval correction run in numpy.

    >>> from anybind.runtime import load                        # doctest: +SKIP
    >>> load("bundles/openclipart").encode_text(["a red bird"]).shape  # doctest: +SKIP
    (1, 896)
"""

from .model import RuntimeBundle, RuntimeBundleError, load

__all__ = ["RuntimeBundle", "RuntimeBundleError", "load"]
