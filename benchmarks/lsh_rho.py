"""Why near-duplicate grouping grows faster than n log n: LSH's cost at a fixed miss chance, on the data's own pairs.

A schedule of k hashes a table and L tables misses a pair at the threshold t with chance
(1 - p(t)^k)^L; holding that at `--miss` (0.6%, as `near_duplicates.lsh_tables` does) needs
L = ln(miss) / ln(1 - p(t)^k) tables, and a row then meets n E[p(c)^k] unrelated rows a table (c: the
cosine of a random pair of the data, below t). The work is n L (k h + n E[p(c)^k] v) (h: one hash,
v: one exact check, in multiply-adds); the best k at each n is the schedule's cost. Its growth
exponent over each decade of n is printed: n log n reads about 1.07, n^(1 + rho) about 1 + rho.

Families: sign random projections (one bit a hash, p = 1 - acos(c) / pi, what `lsh_pairs` uses) and
cross-polytope (the signed argmax of |x G| over d' Gaussian projections, about log2(2 d') bits a hash;
Andoni et al. 2015, the asymptotically optimal family for angular distance; p by Monte Carlo).
Data: the scaling benchmark's synthetic thumbnails and, when installed, openclipart's real ones.

    python benchmarks/lsh_rho.py            # about a minute (openclipart's thumbnails: ~30 s more)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from anybind.data.near_duplicates import THRESHOLD, centred_unit_rows  # noqa: E402
from scaling import synthetic_thumbnails  # noqa: E402

GRID = np.linspace(-1.0, 1.0, 81)
SIZES = (10**5, 10**6, 10**7, 10**8)


def far_cosines(z: np.ndarray, pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Cosines of random pairs of distinct rows, those over the threshold (near-duplicates) left out."""
    i, j = rng.integers(0, len(z), (2, pairs))
    keep = i != j
    c = np.einsum("ij,ij->i", z[i[keep]], z[j[keep]])
    return c[c <= THRESHOLD]


def hyperplane_p(c: np.ndarray) -> np.ndarray:
    return 1 - np.arccos(np.clip(c, -1, 1)) / math.pi


def cross_polytope_p(dim: int, proj: int, pairs: int, rng: np.random.Generator):
    """p(c) on GRID for the signed argmax over `proj` Gaussian projections, by Monte Carlo."""
    out = []
    for c in GRID:
        x = rng.standard_normal((pairs, dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y = rng.standard_normal((pairs, dim))
        y -= (y * x).sum(1, keepdims=True) * x
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        y = c * x + math.sqrt(max(0.0, 1 - c * c)) * y
        g = rng.standard_normal((dim, proj))
        a, b = x @ g, y @ g
        ha, hb = (np.argmax(np.abs(v), 1) for v in (a, b))
        sa, sb = (v[np.arange(pairs), h] > 0 for v, h in ((a, ha), (b, hb)))
        out.append(np.mean((ha == hb) & (sa == sb)))
    return lambda cos: np.interp(cos, GRID, np.asarray(out))


def schedule_cost(p, far: np.ndarray, n: int, hash_cost: float, check_cost: float, miss: float):
    """(multiply-adds a row, k, L) of the cheapest schedule at n rows."""
    p1, pf = float(p(np.array([THRESHOLD]))[0]), p(far)
    best = None
    for k in range(1, 200):
        hit = p1**k
        tables = math.log(miss) / math.log1p(-hit)
        cost = tables * (k * hash_cost + n * float(np.mean(pf**k)) * check_cost)
        if best is None or cost < best[0]:
            best = (cost, k, tables)
    return best


def report(name: str, family: str, p, far: np.ndarray, hash_cost: float, dim: int, miss: float) -> None:
    rows = [schedule_cost(p, far, n, hash_cost, 2 * dim, miss) for n in SIZES]
    p1 = float(p(np.array([THRESHOLD]))[0])
    rho = math.log(p1) / math.log(float(np.mean(p(far))))
    exps = [math.log(n2 * r2[0] / (n1 * r1[0])) / math.log(n2 / n1)
            for (n1, r1), (n2, r2) in zip(zip(SIZES, rows), zip(SIZES[1:], rows[1:]), strict=False)]
    sched = ", ".join(f"{r[1]}x{math.ceil(r[2])}" for r in rows)
    print(f"| {name} | {family} | {p1:.3f} | {rho:.3f} | {sched} | " + " | ".join(f"{e:.2f}" for e in exps) + " |")


def thumbnails_of(source: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
    if source == "synthetic":
        thumbs = list(synthetic_thumbnails(n, rng))
    else:
        from anybind.data.near_duplicates import thumbnails
        from anybind.data.openclipart import DEFAULT_ROOT

        pngs = sorted((Path(DEFAULT_ROOT) / "png").rglob("*.png"))
        if not pngs:
            print(f"# openclipart not found under {DEFAULT_ROOT}: skipped", file=sys.stderr)
            return None
        thumbs = [t for t in thumbnails(pngs) if t is not None]
    z, blank = centred_unit_rows(thumbs, np.arange(len(thumbs)), 3.0)
    return z[~blank]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=200_000, help="random pairs sampled for the far cosines")
    p.add_argument("--mc", type=int, default=4000, help="Monte Carlo pairs per cosine for cross-polytope")
    p.add_argument("--miss", type=float, default=0.006, help="chance a pair at the threshold is missed")
    p.add_argument("--synthetic", type=int, default=50_000, help="synthetic thumbnails")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    dim = 256
    families = [("sign projections (1 bit)", hyperplane_p, dim)]
    for proj in (16, 64, 256):
        families.append((f"cross-polytope d'={proj}", cross_polytope_p(dim, proj, args.mc, rng), dim * proj))
    print("| thumbnails | family | p(t) | rho (ln p(t) / ln E p(far)) | best k x L at n 1e5, 1e6, 1e7, 1e8 | "
          "exponent 1e5-1e6 | 1e6-1e7 | 1e7-1e8 |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for source in ("synthetic", "openclipart"):
        z = thumbnails_of(source, args.synthetic, rng)
        if z is None:
            continue
        far = far_cosines(z, args.pairs, rng)
        print(f"# {source}: {len(z):,} rows, far cosine mean {far.mean():.3f}, 99th percentile "
              f"{np.quantile(far, 0.99):.3f}", file=sys.stderr)
        for family, prob, cost in families:
            report(f"{source} ({len(z):,})", family, prob, far, cost, dim, args.miss)


if __name__ == "__main__":
    main()
