"""Text search by class name on an openclipart index: does the top 10 hold the class?

For each curated openclipart class, the class name is the query (no template); precision@10 is
the share of the top 10 that carry the class, set against the class's share of the collection.
The bar (issue 6): precision@10 >= 3 x the class's share, for every class.

    .venv/bin/anybind index --bundle bundles/clipart --data openclipart --out indexes/clipart
    .venv/bin/python benchmarks/search_classes.py --index indexes/clipart
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from anybind.data.openclipart_classes import CURATED_CLASSES, curated_class
from anybind.serve.index import VectorIndex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    index = VectorIndex.load(args.index)
    model = index.open_bundle()
    ids = index.item_ids
    labels = [curated_class(i) for i in ids]
    counts, n = Counter(labels), len(ids)
    queries = model.encode_text(list(CURATED_CLASSES))
    hits = index.search(queries, k=args.k)
    print(f"{'class':20s} {'items':>6s} {'share':>7s} {'P@10':>6s} {'ratio':>7s}")
    ratios = []
    for c, row in zip(CURATED_CLASSES, hits.ids, strict=True):
        share = counts[c] / n
        p = float(np.mean([curated_class(i) == c for i in row]))
        ratios.append(p / share)
        print(f"{c:20s} {counts[c]:6d} {100 * share:6.2f}% {100 * p:5.0f}% {p / share:6.1f}x"
              + ("" if p >= 3 * share else "   BELOW 3x"))
    below = sum(r < 3 for r in ratios)
    print(f"\n{len(ratios) - below} of {len(ratios)} classes reach 3x their share; median ratio {np.median(ratios):.1f}x; "
          f"mean precision@{args.k} {np.mean([float(np.mean([curated_class(i) == c for i in row])) for c, row in zip(CURATED_CLASSES, hits.ids, strict=True)]):.2f}")


if __name__ == "__main__":
    main()
