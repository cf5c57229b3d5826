"""load_image: references, white compositing, reduced decodes, and every failure as a DataError."""

import io
import struct
import tarfile
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from anybind.data import png_stream
from anybind.data.idx import write_idx
from anybind.data.images import load_image
from anybind.errors import DataError


def _gradient(w=64, h=48, mode="RGBA") -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * y) % 256], -1).astype(
        np.uint8
    )
    rgb[h // 2 :] ^= np.random.default_rng(0).integers(0, 24, rgb[h // 2 :].shape, dtype=np.uint8)
    alpha = ((x + y) * 255 // (w + h - 2)).astype(np.uint8)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "LA":
        return Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    if mode == "L":
        return Image.fromarray(rgb[..., 0], "L")
    return Image.fromarray(rgb, "RGB")


def _png_filters(data: bytes) -> set[int]:
    """The row filter types a PNG file uses (so tests know the banded decode saw them all)."""
    header = png_stream.parse_header(data[:33])
    raw = zlib.decompress(
        b"".join(bytes(b) for t, b in png_stream._chunks(memoryview(data)) if t == b"IDAT")
    )
    return {raw[i] for i in range(0, len(raw), header.stride)}


# ---- transparency --------------------------------------------------------------------------------
def test_transparent_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :] = (255, 0, 0, 255)  # opaque red top half, fully transparent black bottom half
    path = tmp_path / "t.png"
    Image.fromarray(rgba, "RGBA").save(path)
    im = load_image(str(path))
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert (arr[:4] == (255, 0, 0)).all()
    assert (arr[4:] == 255).all(), "transparent pixels must become white, not black"


def test_half_transparent_blends_with_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(path)
    value = np.asarray(load_image(path))[0, 0, 0]
    assert 120 <= value <= 130


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_other_transparent_modes_become_white(tmp_path, mode):
    path = tmp_path / f"{mode}.png"
    if mode == "LA":
        Image.new("LA", (6, 6), (0, 0)).save(path)
    else:
        im = Image.new("P", (6, 6), 0)
        im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        im.putpixel((0, 0), 1)
        im.save(path, transparency=0)
    arr = np.asarray(load_image(path))
    assert (arr[5, 5] == 255).all()
    if mode == "P":
        assert tuple(arr[0, 0]) == (10, 200, 30)


def test_numpy_and_pil_inputs():
    grey = np.full((5, 7), 9, np.uint8)
    assert load_image(grey).size == (7, 5)
    assert np.asarray(load_image(grey))[0, 0].tolist() == [9, 9, 9]
    rgba = np.zeros((3, 3, 4), np.uint8)  # fully transparent -> white
    assert (np.asarray(load_image(rgba)) == 255).all()
    floats = np.ones((2, 2, 3), np.float32)  # [0, 1] floats scale to 255
    assert (np.asarray(load_image(floats)) == 255).all()
    pil = Image.new("RGB", (3, 2), (1, 2, 3))
    assert load_image(pil).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(DataError, match="HxW"):
        load_image(np.zeros((2, 2, 2, 2), np.uint8))


# ---- failures are DataErrors with a reason ------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_text("hello")
    with pytest.raises(DataError, match="not an image"):
        load_image(str(path))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    _gradient(200, 150, "RGB").save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match="truncated|corrupt"):
        load_image(path)


def _bomb_png(width: int, height: int, depth: int = 8, ctype: int = 0) -> bytes:
    """A tiny PNG that claims to be huge (a decompression bomb header, no real pixels)."""

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, ctype, 0, 0, 0)
    return (
        png_stream.PNG_SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def test_bomb_sized_png_is_a_data_error_not_a_crash(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(30000, 30000))  # 900 Mpx
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape either
        with pytest.raises(DataError, match="decompression-bomb"):
            load_image(path)
        # with min_side it may stream, but the stream is short: a truncation, still a DataError
        with pytest.raises(DataError, match="truncated"):
            load_image(path, min_side=256)


def test_bomb_over_the_stream_limit_and_unstreamable(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(_bomb_png(50000, 50000))  # 2.5 Gpx: over MAX_STREAM_PIXELS
    with pytest.raises(DataError, match="banded-decode limit"):
        load_image(path, min_side=256)
    path16 = tmp_path / "huge16.png"
    path16.write_bytes(_bomb_png(20000, 20000, depth=16))
    with pytest.raises(DataError, match="16-bit"):
        load_image(path16, min_side=256)


def test_between_one_and_two_times_the_limit_is_refused_without_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "mid.jpg"
    Image.new("RGB", (40, 40)).save(path)  # 1,600 px: Pillow would only warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="decompression-bomb"):
            load_image(path)


# ---- reduced decodes ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L", "LA", "P"])
def test_banded_png_decode_equals_full_reduce(tmp_path, monkeypatch, mode):
    image = _gradient(301, 203, "RGBA" if mode == "P" else mode)
    path = tmp_path / f"big-{mode}.png"
    if mode == "P":
        image = image.convert("RGB").quantize(64)
        image.save(path, transparency=3)
    else:
        image.save(path)
    data = path.read_bytes()
    if mode != "P":  # Pillow's adaptive filters: the bands must chain Up/Avg/Paeth rows correctly
        assert _png_filters(data) & {3, 4}, "want Avg/Paeth rows, which read the row above"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # force the banded path
    banded = load_image(path, min_side=40)
    monkeypatch.undo()
    full = Image.open(path)
    full = png_stream.shrinkable(full).reduce(min(full.size) // 40)
    from anybind.data.images import to_rgb

    assert banded.size == full.size
    assert min(banded.size) >= 40
    np.testing.assert_array_equal(np.asarray(banded), np.asarray(to_rgb(full)))


def test_banded_decode_with_the_standard_zlib(tmp_path, monkeypatch):
    """zlib-ng is optional: the stdlib zlib gives the same pixels."""
    path = tmp_path / "g.png"
    _gradient(120, 90, "RGBA").save(path)
    data = path.read_bytes()
    header = png_stream.parse_header(data[:33])
    fast = png_stream.decode_reduced(data, header, 4)
    monkeypatch.setattr(png_stream, "fastzlib", zlib)
    np.testing.assert_array_equal(
        np.asarray(png_stream.decode_reduced(data, header, 4)), np.asarray(fast)
    )


def test_min_side_keeps_the_short_side(tmp_path):
    path = tmp_path / "photo.jpg"
    _gradient(1600, 1000, "RGB").save(path, quality=90)
    im = load_image(path, min_side=224)
    assert min(im.size) >= 224 and min(im.size) < 1000
    assert im.size[0] > im.size[1]  # aspect kept
    png = tmp_path / "p.png"
    _gradient(1000, 600, "RGBA").save(png)
    small = load_image(png, min_side=200)
    assert 200 <= min(small.size) < 400
    assert load_image(png).size == (1000, 600)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _gradient(60, 20, "RGB").save(path, exif=exif)
    assert load_image(path).size == (20, 60)


# ---- reference schemes ---------------------------------------------------------------------------
def test_tar_reference(tmp_path):
    shard = tmp_path / "s.tar"
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (7, 8, 9)).save(buf, "PNG")
    with tarfile.open(shard, "w") as tf:
        info = tarfile.TarInfo("000001.png")
        info.size = len(buf.getvalue())
        tf.addfile(info, io.BytesIO(buf.getvalue()))
    im = load_image(f"tar://{shard}#000001.png")
    assert im.size == (5, 4) and im.getpixel((0, 0)) == (7, 8, 9)
    with pytest.raises(DataError, match="no member"):
        load_image(f"tar://{shard}#missing.png")
    with pytest.raises(DataError, match="not found"):
        load_image(f"tar://{tmp_path}/nope.tar#x.png")


def test_idx_reference(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "imgs-idx3-ubyte.gz", images)
    im = load_image(f"idx://{tmp_path}/imgs-idx3-ubyte.gz#2")
    assert im.size == (5, 4)
    assert np.asarray(im)[..., 0].tolist() == images[2].tolist()
    with pytest.raises(DataError, match="row 3 does not exist"):
        load_image(f"idx://{tmp_path}/imgs-idx3-ubyte.gz#3")


def test_skimage_reference():
    pytest.importorskip("skimage")
    im = load_image("skimage://coffee", min_side=100)
    assert im.mode == "RGB" and min(im.size) >= 100
    with pytest.raises(DataError, match="has no image"):
        load_image("skimage://no_such_picture")


def test_unknown_scheme():
    with pytest.raises(DataError, match="unknown image reference scheme"):
        load_image("gopher://x/y.png")
