"""Near-duplicate images by how they look: a 16 x 16 grey thumbnail per image.

Metadata (collection, series, caption, identical bytes) misses the same drawing filed twice under
different folders, recoloured variants and degenerate renders. On openclipart these left 7-24% of
each test fold's images with a near-duplicate (feature cosine > 0.9) in train. Joining, in
addition, images whose centred thumbnails have cosine > `THRESHOLD`, and putting every
near-blank image in one group, brings every fold to about 5% (measured: 4.5-5.4%).

- A thumbnail is the image composited on white, grey, box-averaged to 16 x 16 (256 values).
- *Near-blank*: thumbnail sd < `BLANK_SD` grey levels — white-on-transparent art, hairline
  outlines, empty gradient renders. They look alike to every encoder and carry no signal to split.
- Unreadable images get no look key (the extractor reports them later).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import DataError
from .groups import UnionFind

THRESHOLD = 0.95
BLANK_SD = 3.0
SIDE = 16
EXACT_BELOW = 20_000  # non-blank images: all pairs below, LSH candidates above
LSH_BITS, LSH_MISS = 20, 0.006  # hash bits up to 100k images; chance a pair at the threshold is missed


def thumbnail(ref) -> np.ndarray | None:
    """float32[256] grey thumbnail of an image (None if it cannot be read)."""
    from PIL import Image

    from .images import load_image

    try:
        image = load_image(ref, min_side=4 * SIDE)
    except DataError:
        return None
    grey = image.convert("L").resize((SIDE, SIDE), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float32).ravel()


def thumbnails(refs: Sequence, workers: int | None = None, progress: bool = True) -> list[np.ndarray | None]:
    """Thumbnails of many images; decoding releases the GIL, so threads use every core."""
    from tqdm.auto import tqdm

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(thumbnail, refs), total=len(refs), desc="image thumbnails (near-duplicates)", unit="img",
                         disable=None if progress else True, leave=False))


def look_keys(thumbs: Sequence[np.ndarray | None], threshold: float = THRESHOLD, blank_sd: float = BLANK_SD,
              chunk: int = 2048, exact_below: int = EXACT_BELOW) -> list[str | None]:
    """A group key per image: ``look:blank``, ``look:<n>`` shared by near-identical images, or None.

    Images are joined when their centred thumbnails have cosine > `threshold` (transitively).
    Up to `exact_below` non-blank images every pair is compared (blocked, O(n^2)); above, the
    candidate pairs come from random-projection LSH (`lsh_pairs`, about O(n^1.2)), each checked
    exactly, so no pair under the threshold is ever joined. ``<n>`` is the smallest position in
    the group.

    >>> a = np.arange(256, dtype=np.float32)
    >>> look_keys([a, a + 3, a[::-1].copy(), np.full(256, 255.0)])
    ['look:0', 'look:0', None, 'look:blank']
    """
    keys: list[str | None] = [None] * len(thumbs)
    live = np.array([i for i, t in enumerate(thumbs) if t is not None], dtype=np.int64)
    if not len(live):
        return keys
    # many images: float32 rows (half the memory traffic), float64 recomputed for close calls
    z, blank = centred_unit_rows(thumbs, live, blank_sd, np.float32 if len(live) >= exact_below else np.float64)
    for j in np.nonzero(blank)[0]:
        keys[live[j]] = "look:blank"
    rest = live[~blank]
    z = z[~blank]
    if len(rest) < exact_below:
        if z.dtype != np.float64:  # blanks took it under: the exact join, in float64 as always
            z = centred_unit_rows(thumbs, rest, blank_sd)[0]
        pairs = exact_pairs(z, threshold, chunk)
    else:
        pairs = lsh_pairs(z, threshold, exact_rows=lambda rows: centred_unit_rows(thumbs, rest[rows], blank_sd)[0])
    label = components(len(rest), pairs)
    sizes = np.bincount(label, minlength=len(rest))
    for j in np.nonzero(sizes[label] > 1)[0]:  # alone: no look key
        keys[rest[j]] = f"look:{rest[label[j]]}"
    return keys


def centred_unit_rows(thumbs: Sequence, live: np.ndarray, blank_sd: float, dtype=np.float64, chunk: int = 4096):
    """(centred unit rows of the readable thumbnails as `dtype`, near-blank mask), computed in
    float64 a cache-sized chunk at a time (each row's values do not depend on the chunk)."""
    z = np.empty((len(live), SIDE * SIDE), dtype=dtype)
    blank = np.empty(len(live), dtype=bool)
    for lo in range(0, len(live), chunk):
        x = np.stack([thumbs[i] for i in live[lo : lo + chunk]]).astype(np.float64)
        blank[lo : lo + len(x)] = x.std(axis=1) < blank_sd
        x -= x.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):  # blank rows: never compared
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        z[lo : lo + len(x)] = x
    return z, blank


def exact_pairs(z: np.ndarray, threshold: float, chunk: int = 2048) -> np.ndarray:
    """[m, 2] every pair i < j with z_i . z_j > threshold: the upper triangle a block of rows at a time."""
    found = []
    for lo in range(0, len(z), chunk):
        rows, cols = np.nonzero(np.triu(z[lo : lo + chunk] @ z[lo:].T > threshold, k=1))
        found.append(np.stack([rows + lo, cols + lo], axis=1))
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)


def lsh_tables(n: int, threshold: float, miss: float = LSH_MISS) -> tuple[int, int]:
    """(bits per table, tables) for n rows: bits grow with log2(n) (20 up to 100k rows) so unrelated
    rows stay about O(n) candidates; tables as many as miss a pair at the threshold with chance `miss`."""
    bits = LSH_BITS + max(0, math.ceil(math.log2(max(n, 1) / 100_000)))
    p = (1 - math.acos(min(1.0, threshold)) / math.pi) ** bits
    return bits, max(1, math.ceil(math.log(miss) / math.log1p(-p)))


def lsh_pairs(z: np.ndarray, threshold: float, miss: float = LSH_MISS, seed: int = 0, chunk: int = 16384,
              exact_rows=None) -> np.ndarray:
    """[m, 2] pairs i < j with z_i . z_j > threshold found by sign random projections.

    Each table hashes a row to `bits` signs of random projections; rows that share a hash in any
    table are candidates, checked exactly. Two rows at cosine c share a table's hash with chance
    p = (1 - acos(c) / pi) ** bits (`lsh_tables`: 41 tables of 20 bits at 100k rows, 64 of 24 at
    1M); a pair at 0.97 is missed 40x less often than one at the threshold, and a near-duplicate
    usually has other paths to its group. Deterministic (seeded), and the same whichever optional
    packages are installed. float32 `z` needs `exact_rows(rows)`, its float64 rows, for the
    candidates whose float32 cosine is too close to the threshold to decide.
    """
    n = len(z)
    bits, tables = lsh_tables(n, threshold, miss)
    planes = np.random.default_rng(seed).standard_normal((z.shape[1], bits * tables)).astype(np.float32)
    codes = np.empty((tables, n), dtype=np.int32)
    for lo in range(0, n, chunk):  # one pass over the rows for every table
        signs = (z[lo : lo + chunk].astype(np.float32) @ planes > 0).reshape(-1, tables, bits)
        codes[:, lo : lo + len(signs)] = _pack_little_endian(signs).T
    flat = _distinct(np.concatenate([_same_code_pairs(code, n) for code in codes]))  # each pair once, i < j
    del codes
    return _confirmed(z, flat, threshold, exact_rows)


def _pack_little_endian(signs: np.ndarray) -> np.ndarray:
    """int64 sum of signs[..., k] << k over the last axis (fewer than 32 bits)."""
    packed = np.packbits(signs, axis=-1, bitorder="little")
    code = np.zeros(packed.shape[:-1], dtype=np.int64)
    for k in range(packed.shape[-1]):
        code |= packed[..., k].astype(np.int64) << (8 * k)
    return code


def _distinct(values: np.ndarray) -> np.ndarray:
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _same_code_pairs(code: np.ndarray, n: int) -> np.ndarray:
    """i * n + j for every pair i < j of rows with equal codes: all pairs inside each run of one
    code, the rows sorted by (code, row) in one int64 sort."""
    keys = np.sort(code.astype(np.int64) << 32 | np.arange(len(code), dtype=np.int64))
    rows, code = keys & 0xFFFFFFFF, keys >> 32
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    lengths = np.diff(np.r_[starts, len(keys)])
    later = np.repeat(starts + lengths, lengths) - np.arange(len(keys)) - 1  # rows after each in its run
    first = np.repeat(np.arange(len(keys)), later)
    second = first + 1 + np.arange(len(first)) - np.repeat(np.cumsum(later) - later, later)
    return rows[first] * n + rows[second]


def _confirmed(z: np.ndarray, flat: np.ndarray, threshold: float, exact_rows=None, chunk: int = 2048,
               margin: float = 1e-4) -> np.ndarray:
    """[m, 2] the candidate pairs (i * n + j, sorted) whose float64 cosine (einsum of float64 rows,
    as always) is over the threshold.

    Sorted pairs read z[i] in order. For float32 rows the float32 cosine is within 2e-5 of the
    float64 one (256 products of unit rows), so only pairs within `margin` of the threshold are
    decided on float64 rows from `exact_rows`: the same pairs as float64 throughout.
    """
    found = []
    for lo in range(0, len(flat), chunk):  # a chunk's rows stay in the cache
        p = np.stack(np.divmod(flat[lo : lo + chunk], len(z)), axis=1)
        cos = np.einsum("ij,ij->i", z[p[:, 0]], z[p[:, 1]])
        keep = cos > threshold
        if z.dtype != np.float64:
            close = np.flatnonzero(np.abs(cos - threshold) <= margin)
            if len(close):
                rows, where = np.unique(p[close], return_inverse=True)
                z64 = exact_rows(rows)[where.reshape(-1, 2)]
                keep[close] = np.einsum("ij,ij->i", z64[:, 0], z64[:, 1]) > threshold
        found.append(p[keep])
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Per row, the smallest row of its connected component under `pairs`."""
    uf = UnionFind(n)
    for a, b in pairs.tolist():
        uf.union(a, b)
    smallest: dict[int, int] = {}
    roots = [uf.find(i) for i in range(n)]
    for i, r in enumerate(roots):
        smallest.setdefault(r, i)
    return np.array([smallest[r] for r in roots], dtype=np.int64)
