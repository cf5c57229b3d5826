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
    candidate pairs come from random-projection LSH (`lsh_pairs`, about O(n)), each checked
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
    z, blank = centred_unit_rows(thumbs, live, blank_sd)
    for j in np.nonzero(blank)[0]:
        keys[live[j]] = "look:blank"
    rest = live[~blank]
    z = z[~blank]
    if len(rest) < exact_below:
        pairs = exact_pairs(z, threshold, chunk)
    else:
        pairs = lsh_pairs(z, threshold)
    label = components(len(rest), pairs)
    sizes = np.bincount(label, minlength=len(rest))
    for j in np.nonzero(sizes[label] > 1)[0]:  # alone: no look key
        keys[rest[j]] = f"look:{rest[label[j]]}"
    return keys


def centred_unit_rows(thumbs: Sequence, live: np.ndarray, blank_sd: float, chunk: int = 65536):
    """(float64 [n, 256] centred unit rows of the readable thumbnails, near-blank mask), built
    a chunk at a time so no second float64 copy of all of them is held."""
    z = np.empty((len(live), SIDE * SIDE), dtype=np.float64)
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


def lsh_pairs(z: np.ndarray, threshold: float, miss: float = LSH_MISS, seed: int = 0,
              chunk: int = 16384) -> np.ndarray:
    """[m, 2] pairs i < j with z_i . z_j > threshold found by sign random projections.

    Each table hashes a row to `bits` signs of random projections; rows that share a hash in any
    table are candidates, checked exactly. Two rows at cosine c share a table's hash with chance
    p = (1 - acos(c) / pi) ** bits. `bits` grows with log2(n) (20 up to 100k rows) so unrelated
    rows stay O(n) candidates; the tables are as many as keep a pair at the threshold missed with
    chance `miss` (40 at 20 bits, 57 at 24 for the 0.95 threshold); a pair at 0.97 is missed 40x
    less often, and a near-duplicate usually has other paths to its group. Deterministic (seeded),
    and the same whichever optional packages are installed.
    """
    n = len(z)
    bits = LSH_BITS + max(0, math.ceil(math.log2(max(n, 1) / 100_000)))
    p = (1 - math.acos(min(1.0, threshold)) / math.pi) ** bits
    tables = max(1, math.ceil(math.log(miss) / math.log1p(-p)))
    planes = np.random.default_rng(seed).standard_normal((z.shape[1], bits * tables)).astype(np.float32)
    weights = 1 << np.arange(bits, dtype=np.int32)  # bits < 31 up to 2e9 rows
    codes = np.empty((n, tables), dtype=np.int32)
    for lo in range(0, n, chunk):  # one pass over the rows for every table
        signs = (z[lo : lo + chunk].astype(np.float32) @ planes > 0).reshape(-1, tables, bits)
        codes[lo : lo + len(signs)] = signs.astype(np.int32) @ weights
    found = [_distinct(_same_code_pairs(code) @ np.array([n, 1], dtype=np.int64)) for code in codes.T]
    flat = _distinct(np.concatenate(found))
    return _confirmed(z, np.stack([flat // n, flat % n], axis=1), threshold)  # each pair once, i < j


def _distinct(values: np.ndarray) -> np.ndarray:
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _same_code_pairs(code: np.ndarray, run_cap: int = 64) -> np.ndarray:
    """[m, 2] pairs i < j of rows with equal codes (runs of one code in sorted order)."""
    order = np.argsort(code, kind="stable")
    sorted_code = code[order]
    found = []
    for gap in range(1, run_cap):  # pairs `gap` apart inside a run; runs are short for unrelated rows
        same = sorted_code[gap:] == sorted_code[:-gap]
        if not same.any():
            break
        at = np.nonzero(same)[0]
        found.append(np.stack([order[at], order[at + gap]], axis=1))
    if len(sorted_code) > run_cap and (sorted_code[run_cap:] == sorted_code[:-run_cap]).any():
        found.append(_long_run_pairs(sorted_code, order, run_cap))
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    return np.sort(pairs, axis=1)


def _long_run_pairs(sorted_code: np.ndarray, order: np.ndarray, run_cap: int) -> np.ndarray:
    """Every pair of a run longer than `run_cap` (many alike images: rare, so all pairs, once)."""
    starts = np.flatnonzero(np.r_[True, sorted_code[1:] != sorted_code[:-1]])
    ends = np.r_[starts[1:], len(sorted_code)]
    found = []
    for lo, hi in zip(starts, ends, strict=True):
        if hi - lo > run_cap:
            i, j = np.triu_indices(hi - lo, k=run_cap)
            found.append(np.stack([order[lo + i], order[lo + j]], axis=1))
    return np.concatenate(found)


def _confirmed(z: np.ndarray, pairs: np.ndarray, threshold: float, chunk: int = 8192) -> np.ndarray:
    """The candidate pairs whose exact cosine (as `exact_pairs` computes it) is over the threshold."""
    keep = np.zeros(len(pairs), dtype=bool)
    for lo in range(0, len(pairs), chunk):
        p = pairs[lo : lo + chunk]
        keep[lo : lo + len(p)] = np.einsum("ij,ij->i", z[p[:, 0]], z[p[:, 1]]) > threshold
    return pairs[keep]


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
