"""Open any image reference as an RGB PIL image, cheaply, or fail with a DataError reason.

References (what a dataset index stores in its image column):

- a path (str or Path), or ``file://path``
- ``tar://<shard.tar>#<member>``: a member of an uncompressed WebDataset shard
- ``idx://<images-idx3-ubyte(.gz)>#<row>``: one image of an IDX file (MNIST, Fashion-MNIST)
- ``skimage://<name>``: ``skimage.data.<name>()``
- ``parquet://<file>#<column>/<row>``, ``arrow://<file>#<column>/<row>``: an encoded image in a
  cell of a Parquet file or a Hugging Face Arrow file (`parquet_images`, `hf_datasets`)
- a PIL image, or a numpy array (HxW, HxWx1, HxWx3, HxWx4)

Why each step is here:

- ``min_side`` lets the caller (an encoder that resizes to 256 px anyway) ask for a reduced
  decode: JPEG decodes at 1/2 to 1/8 scale (``draft``), other formats are box-reduced right
  after decoding, and 8-bit PNGs over 16 Mpx are decoded band by band (`png_stream`), so a
  623 Mpx clip-art file costs ~5 s and a few MB instead of ~12 s and 5 GB (measured). The
  short side stays >= min_side.
- Transparent images (RGBA, LA, palettes with transparency) are composited on white, after
  the reduction (cheap), because clip art drawn on transparency means "on a page".
- Pillow's decompression-bomb guard stays on: above ``Image.MAX_IMAGE_PIXELS`` a full decode
  is refused with a DataError (never a warning); a streamable PNG above it is decoded in
  bands when ``min_side`` is given, up to `MAX_STREAM_PIXELS` (time, not memory, is its cost).
- Every failure of one item (missing, truncated, not an image, too big) is a DataError whose
  message is the reason, so feature extraction reports it as a skip and goes on.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import AnybindError, DataError, MissingDependencyError
from . import png_stream
from .idx import cached_idx
from .tar_members import read_member

#: above this many pixels even a banded PNG decode is refused (about 8 s of CPU per Gpx)
MAX_STREAM_PIXELS = 1_000_000_000
#: PNGs above this many pixels are decoded in bands when a reduction is asked for: as fast as a
#: full decode from here on (measured), and the memory stays a few MB instead of 4 bytes/pixel
BANDED_ABOVE_PIXELS = 16_000_000
WHITE = (255, 255, 255)


def load_image(ref: Any, *, min_side: int | None = None) -> Image.Image:
    """Open `ref` as an RGB image; with `min_side`, possibly reduced so its short side >= min_side.

    >>> load_image("photo.jpg", min_side=256).size  # doctest: +SKIP
    (384, 256)
    """
    try:
        image = _open(ref, min_side)
        return to_rgb(reduce_to(image, min_side))
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {exc.filename or describe(ref)}") from exc
    except IsADirectoryError as exc:
        raise DataError(f"is a directory, not an image: {describe(ref)}") from exc
    except PermissionError as exc:
        raise DataError(f"permission denied: {describe(ref)}") from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"not an image (unknown or corrupt format): {describe(ref)}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"refused by the decompression-bomb guard: {describe(ref)}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, IndexError) as exc:
        # Pillow reports a truncated or corrupt stream as OSError ('image file is truncated',
        # 'broken data stream'), SyntaxError ('broken PNG file') or ValueError
        raise DataError(f"corrupt or truncated image: {describe(ref)}: {exc}") from exc
    except MemoryError as exc:
        raise DataError(f"out of memory decoding {describe(ref)}") from exc
    except AnybindError:
        raise  # e.g. a missing optional package: not the item's fault, so not a skip
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise struct.error, KeyError, ... on bad files
        raise DataError(f"cannot decode {describe(ref)}: {type(exc).__name__}: {exc}") from exc


def describe(ref: Any) -> str:
    """A short printable name for a reference (for error messages)."""
    if isinstance(ref, (str, Path)):
        return str(ref)
    if isinstance(ref, np.ndarray):
        return f"array{tuple(ref.shape)}"
    return type(ref).__name__


# ---- opening ---------------------------------------------------------------------------------
def _open(ref: Any, min_side: int | None) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, np.ndarray):
        return from_array(ref)
    if isinstance(ref, Path):
        return open_file(str(ref), min_side)
    if not isinstance(ref, str):
        raise DataError(f"cannot open an image from a {type(ref).__name__}")
    scheme, sep, rest = ref.partition("://")
    if not sep or len(scheme) < 2:  # a plain path (a Windows drive letter is one character)
        return open_file(ref, min_side)
    opener = _OPENERS.get(scheme)
    if opener is None:
        raise DataError(
            f"unknown image reference scheme '{scheme}://' in {ref!r}: use a path, "
            + ", ".join(f"{s}://" for s in _OPENERS)
        )
    return opener(rest, min_side)


def open_file(source: str | bytes, min_side: int | None, name: str | None = None) -> Image.Image:
    """Decode a file path or in-memory bytes, as reduced as `min_side` allows."""
    name = name or (source if isinstance(source, str) else "image bytes")
    if isinstance(source, str):
        with open(source, "rb") as f:
            head = f.read(33)
    else:
        head = source[:33]
    header = png_stream.parse_header(head)
    if header is not None and header.pixels > _full_decode_limit():
        return _open_huge_png(source, header, min_side, name)
    if (
        header is not None
        and min_side
        and header.streamable
        and header.pixels > BANDED_ABOVE_PIXELS
    ):
        factor = min(header.width, header.height) // min_side
        if factor >= 2:
            return png_stream.decode_reduced(_read(source), header, factor)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        # the bomb guard warns between 1x and 2x the limit; for us that is a refusal too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(stream)
        if min_side and image.format == "JPEG":
            image.draft(None, (min_side, min_side))  # DCT scaling: 1/2..1/8, both sides >= min_side
        image.load()
    return _upright(image)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation of camera photos (only when there is one: no copy otherwise)."""
    if image.format not in ("JPEG", "MPO", "TIFF", "WEBP"):
        return image
    if image.getexif().get(0x0112, 1) in (None, 1):  # 0x0112 = Orientation
        return image
    return ImageOps.exif_transpose(image)


def _full_decode_limit() -> int:
    return Image.MAX_IMAGE_PIXELS or 2**62


def _open_huge_png(
    source: str | bytes, header: png_stream.PngHeader, min_side: int | None, name: str
) -> Image.Image:
    size = f"{header.width}x{header.height} = {header.pixels / 1e6:.0f} Mpx"
    limit = _full_decode_limit()
    if not min_side:
        raise DataError(
            f"refused by the decompression-bomb guard: {name} is {size}, over the full-decode "
            f"limit of {limit / 1e6:.0f} Mpx (PIL.Image.MAX_IMAGE_PIXELS); ask for a reduced "
            "decode (min_side) or raise the limit"
        )
    if not header.streamable:
        raise DataError(
            f"refused by the decompression-bomb guard: {name} is {size}, over {limit / 1e6:.0f} Mpx, "
            f"and a {header.bit_depth}-bit{' interlaced' if header.interlace else ''} PNG cannot "
            "be decoded in bands"
        )
    if header.pixels > MAX_STREAM_PIXELS:
        raise DataError(
            f"refused by the decompression-bomb guard: {name} is {size}, over the banded-decode "
            f"limit of {MAX_STREAM_PIXELS / 1e6:.0f} Mpx (anybind.data.images.MAX_STREAM_PIXELS)"
        )
    factor = max(1, min(header.width, header.height) // min_side)
    return png_stream.decode_reduced(_read(source), header, factor)


def _read(source: str | bytes) -> bytes:
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


def _open_path(rest: str, min_side: int | None) -> Image.Image:
    return open_file(rest, min_side)


_TAR_REF = re.compile(r"^(.+?\.tar)#(.+)$")


def _open_tar(rest: str, min_side: int | None) -> Image.Image:
    m = _TAR_REF.match(rest) or re.match(r"^(.+)#(.+)$", rest)
    if not m:
        raise DataError(f"bad tar reference 'tar://{rest}': expected tar://<shard.tar>#<member>")
    shard, member = m.groups()
    return open_file(read_member(shard, member), min_side, name=f"{shard}#{member}")


def _open_idx(rest: str, min_side: int | None) -> Image.Image:
    path, _, row = rest.rpartition("#")
    if not path or not row.isdigit():
        raise DataError(f"bad IDX reference 'idx://{rest}': expected idx://<file>#<row>")
    images = cached_idx(path)
    if images.ndim not in (3, 4):
        raise DataError(f"{path} holds an array of shape {images.shape}, not images")
    if int(row) >= len(images):
        raise DataError(f"{path} has {len(images)} images; row {row} does not exist")
    return from_array(images[int(row)])


@functools.lru_cache(maxsize=32)
def _skimage_data(name: str):
    try:
        from skimage import data
    except ImportError as exc:
        raise MissingDependencyError("skimage:// image references", "scikit-image") from exc
    loader = getattr(data, name, None)
    if loader is None or name.startswith("_") or not callable(loader):
        raise DataError(f"skimage.data has no image '{name}'")
    try:
        return loader()
    except (ImportError, OSError) as exc:  # images scikit-image would have to download
        raise DataError(f"skimage.data.{name} is not installed locally: {exc}") from exc


def _open_skimage(rest: str, min_side: int | None) -> Image.Image:
    """``skimage://name``, or ``skimage://name#i`` for loaders that return several images."""
    name, _, index = rest.partition("#")
    value = _skimage_data(name)
    if isinstance(value, tuple):
        if not index.isdigit() or int(index) >= len(value):
            raise DataError(
                f"skimage.data.{name}() returns {len(value)} images: use skimage://{name}#0 .. #{len(value) - 1}"
            )
        value = value[int(index)]
    return from_array(np.asarray(value))


def _open_cell(scheme: str, module: str):
    """``parquet://`` / ``arrow://``: one image cell of a column file, read by its lister's module."""

    def opener(rest: str, min_side: int | None) -> Image.Image:
        from importlib import import_module

        return open_file(import_module(module, __package__).read_cell(rest), min_side, name=f"{scheme}://{rest}")

    return opener


_OPENERS = {"file": _open_path, "tar": _open_tar, "idx": _open_idx, "skimage": _open_skimage,
            "parquet": _open_cell("parquet", ".parquet_images"), "arrow": _open_cell("arrow", ".hf_datasets")}


# ---- arrays and modes ------------------------------------------------------------------------
def as_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any numeric array to uint8: floats in [0, 1] x255, 16-bit /257, else clipped."""
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


def from_array(arr: np.ndarray) -> Image.Image:
    """HxW (grey), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) array -> PIL image."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1).squeeze(-1) if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise DataError(f"an image array must be HxW, HxWx3 or HxWx4, not shape {arr.shape}")
    arr = np.ascontiguousarray(as_uint8(arr))
    return Image.fromarray(
        arr, mode={2: "L", 3: "RGB", 4: "RGBA"}[arr.ndim if arr.ndim == 2 else arr.shape[2]]
    )


def reduce_to(image: Image.Image, min_side: int | None) -> Image.Image:
    """Box-reduce by an integer factor while the short side stays >= min_side (cheap, exact box)."""
    if not min_side:
        return image
    factor = min(image.size) // min_side
    if factor < 2:
        return image
    return png_stream.shrinkable(_plain_mode(image)).reduce(factor)


def _plain_mode(image: Image.Image) -> Image.Image:
    """16-bit and float greys -> 8-bit L; modes `reduce` cannot take -> RGB(A)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(as_uint8(np.asarray(image)), mode="L")
    if image.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if image.mode in ("PA", "La", "RGBa"):
        return image.convert("RGBA")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with anything transparent composited on white."""
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


__all__ = [
    "MAX_STREAM_PIXELS",
    "describe",
    "from_array",
    "load_image",
    "open_file",
    "reduce_to",
    "to_rgb",
]
