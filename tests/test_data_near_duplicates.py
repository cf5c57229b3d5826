"""Near-duplicates by look: thumbnails, near-identical images joined, blanks together, bad files skipped."""

import numpy as np
from PIL import Image, ImageDraw

from anybind.data.near_duplicates import look_keys, thumbnail, thumbnails


def _drawing(path, shift=0, colour=(200, 30, 30), alpha=False):
    im = Image.new("RGBA" if alpha else "RGB", (120, 90), (0, 0, 0, 0) if alpha else (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.ellipse((10 + shift, 10, 70 + shift, 70), fill=colour)
    d.rectangle((80, 20, 110, 80), fill=(20, 20, 160))
    im.save(path)
    return path


def test_twins_join_blanks_group_and_strangers_stay_apart(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    twin1 = _drawing(tmp_path / "a" / "sun.png")
    twin2 = _drawing(tmp_path / "b" / "sun_copy.png", colour=(190, 40, 30))  # refiled, slightly recoloured
    other = tmp_path / "other.png"
    im = Image.new("RGB", (120, 90), "white")
    ImageDraw.Draw(im).polygon([(0, 90), (60, 0), (120, 90)], fill=(0, 120, 0))
    im.save(other)
    white_on_clear = tmp_path / "white.png"  # white art on a transparent background: blank on white
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((5, 5, 60, 60), fill=(255, 255, 255, 255))
    im.save(white_on_clear)
    empty = tmp_path / "empty.png"
    Image.new("RGB", (50, 50), (250, 250, 250)).save(empty)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")

    refs = [twin1, twin2, other, white_on_clear, empty, broken]
    thumbs = thumbnails(refs, workers=2, progress=False)
    assert thumbs[-1] is None and thumbnail(broken) is None
    assert all(t.shape == (256,) and t.dtype == np.float32 for t in thumbs[:-1])
    assert np.array_equal(thumbs[0], thumbnail(twin1))  # threads change nothing
    keys = look_keys(thumbs)
    assert keys[0] is not None and keys[0] == keys[1]
    assert keys[2] is None
    assert keys[3] == keys[4] == "look:blank"
    assert keys[5] is None


def test_threshold_by_hand():
    # centred cosine: a ramp and the ramp plus a constant are identical looks; a half-flipped ramp is not
    a = np.linspace(0, 255, 256, dtype=np.float32)
    b = a.copy()
    b[128:] = b[128:][::-1]
    za, zb = a - a.mean(), b - b.mean()
    cos = float(za @ zb / np.linalg.norm(za) / np.linalg.norm(zb))
    assert look_keys([a, a + 10, b], threshold=cos - 1e-3) == ["look:0", "look:0", "look:0"]
    assert look_keys([a, a + 10, b], threshold=cos + 1e-3) == ["look:0", "look:0", None]
