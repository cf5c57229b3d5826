"""Near-duplicates by look: thumbnails, near-identical images joined, blanks together, bad files skipped."""

import os
from pathlib import Path

import numpy as np
import pytest
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


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/usr/share/openclipart/png"), reason="apt-get install openclipart-png")
def test_openclipart_groups_are_the_all_pairs_join_on_either_path():
    # the groups decide openclipart's splits: the exact path (8,121 images) and the LSH path
    # (float32 rows, float64 for close calls) must both give the all-pairs join's partition
    from anybind.data.groups import UnionFind, group_by_keys

    pngs = sorted(p for p in Path("/usr/share/openclipart/png").rglob("*.png") if p.is_file())
    thumbs = thumbnails(pngs, progress=False)
    live = [i for i, t in enumerate(thumbs) if t is not None]
    x = np.stack([thumbs[i] for i in live]).astype(np.float64)
    solid = x.std(axis=1) >= 3.0
    z = x[solid] - x[solid].mean(axis=1, keepdims=True)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    rows, cols = np.nonzero(np.triu(z @ z.T > 0.95, k=1))
    uf = UnionFind(len(z))
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        uf.union(r, c)
    want: list = [None] * len(thumbs)
    for j, i in enumerate(np.array(live)[solid]):
        want[i] = f"look:{uf.find(j)}" if uf.size[uf.find(j)] > 1 else None
    for i in np.array(live)[~solid]:
        want[i] = "look:blank"
    ids = [str(p) for p in pngs]

    def partition(keys):
        return group_by_keys(ids, [[k] if k else [] for k in keys])

    assert len(rows) > 50_000  # the clip-art themes: many near-identical renders
    assert partition(look_keys(thumbs)) == partition(want)
    assert partition(look_keys(thumbs, exact_below=0)) == partition(want)
