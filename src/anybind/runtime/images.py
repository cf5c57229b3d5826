"""Images as the bundle's encoder saw them, in numpy and Pillow: open, reduce, RGB, resize, crop, normalise.

The same steps as `anybind.data.images.load_image` and `anybind.encoders.ImagePreprocess` (the
torch path), repeated here because those modules sit in packages that import pyarrow and torch;
tests/test_onnx_runtime.py checks that both give the same arrays on real images. References: a
path, bytes, a PIL image or an array (HxW, HxWx3, HxWx4, uint8 or floats in [0, 1]).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

WHITE = (255, 255, 255)
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def open_image(ref: Any, min_side: int | None) -> Image.Image:
    """An RGB image, reduced by an integer box factor while its short side stays >= `min_side`."""
    try:
        image = _open(ref, min_side)
        return _to_rgb(_reduce(image, min_side))
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"file not found: {e.filename or ref}") from e
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"not a decodable image ({type(e).__name__}): {_describe(ref)}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"corrupt or truncated image: {_describe(ref)}: {e}") from e


def _describe(ref: Any) -> str:
    return str(ref) if isinstance(ref, (str, os.PathLike)) else type(ref).__name__


def _open(ref: Any, min_side: int | None) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, np.ndarray):
        return _from_array(ref)
    if isinstance(ref, (bytes, bytearray)):
        ref = io.BytesIO(bytes(ref))
    elif isinstance(ref, str) and ref.startswith("file://"):
        ref = ref[len("file://"):]
    elif not isinstance(ref, (str, os.PathLike)):
        raise DataError(f"cannot open an image from a {type(ref).__name__}: give a path, bytes, a PIL image "
                        "or an array")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(ref)
        if min_side and image.format == "JPEG":
            image.draft(None, (min_side, min_side))  # DCT scaling, as the torch path decodes
        image.load()
    if image.format in ("JPEG", "MPO", "TIFF", "WEBP") and image.getexif().get(0x0112, 1) not in (None, 1):
        image = ImageOps.exif_transpose(image)
    return image


def _from_array(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (3, 4):  # channels first
        arr = np.moveaxis(arr, 0, -1).squeeze(-1) if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise DataError(f"an image array must be HxW, HxWx3 or HxWx4, not shape {arr.shape}")
    arr = np.ascontiguousarray(_as_uint8(arr))
    return Image.fromarray(arr, mode={2: "L", 3: "RGB", 4: "RGBA"}[
        arr.ndim if arr.ndim == 2 else arr.shape[2]])


def _as_uint8(arr: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] x255, 16-bit /257, else clipped (as the torch path's `as_uint8`)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float64)
    top = float(np.nanmax(a)) if a.size else 0.0
    if np.issubdtype(arr.dtype, np.floating) and top <= 1.0:
        a = a * 255.0
    elif top > 255:
        a = a / 257.0 if top <= 65535 else a * (255.0 / top)
    return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)


def _plain_mode(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_as_uint8(np.asarray(image)), mode="L")
    if image.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if image.mode in ("PA", "La", "RGBa"):
        return image.convert("RGBA")
    return image


def _reduce(image: Image.Image, min_side: int | None) -> Image.Image:
    factor = min(image.size) // min_side if min_side else 1
    if factor < 2:
        return image
    image = _plain_mode(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("LA" if image.mode == "L" else "RGBA")
    return image.reduce(factor)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with anything transparent composited on white (clip art drawn on transparency is on a page)."""
    image = _plain_mode(image)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "LA":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        page = Image.new("RGB", image.size, WHITE)
        page.paste(image, mask=image.getchannel("A"))
        return page
    return image.convert("RGB")


def pixels(image: Image.Image, pre: dict) -> np.ndarray:
    """[3, size, size] float32 (channels first): resize (short side, or squash), centre crop, normalise."""
    size, resize = int(pre["size"]), int(pre["resize"])
    w, h = image.size
    if pre.get("resize_mode", "shortest") == "squash":
        nw = nh = max(size, resize)
    else:
        scale = resize / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), _RESAMPLE[pre.get("interpolation", "bicubic")], reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
