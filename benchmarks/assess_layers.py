"""Speed-up of layer_pair_scores (batched all layer pairs) over the naive per-pair loop.

12 x 12 layers, n = 5,000 random paired features (x layers 384-d, y layers 768-d, with a shared
component so the scores are not all at chance), metrics mutual_knn (k = 10) and linear_cka.

    .venv/bin/python benchmarks/assess_layers.py            # naive mutual_knn on a row subset
    .venv/bin/python benchmarks/assess_layers.py --full     # naive loop over all 144 pairs

The naive loop calls ``metrics.score`` for every (x layer, y layer) pair, recomputing both
layers' neighbours / centred features each time. By default the naive mutual_knn loop runs on the
first ``--naive-rows`` x layers against all 12 y layers and its time is EXTRAPOLATED to 144 pairs
(the output says so); linear_cka's naive loop always runs in full. Scores are compared on every
pair the naive loop computed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from anybind.assess.layers import layer_pair_scores
from anybind.assess.metrics import score


def make_layers(n: int, n_layers: int, dx: int, dy: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 64, generator=g)
    xs, ys = [], []
    for i in range(n_layers):
        w = 0.2 + 2.0 * i / n_layers  # noise grows with depth: scores vary across layers
        xs.append(z @ torch.randn(64, dx, generator=g) + w * 8 * torch.randn(n, dx, generator=g))
        ys.append(z @ torch.randn(64, dy, generator=g) + w * 8 * torch.randn(n, dy, generator=g))
    return xs, ys


def bench(metric: str, xs, ys, k: int, naive_rows: int) -> None:
    t0 = time.perf_counter()
    batched = layer_pair_scores(xs, ys, metric=metric, k=k)
    t_batched = time.perf_counter() - t0

    rows = len(xs) if naive_rows <= 0 else min(naive_rows, len(xs))
    t0 = time.perf_counter()
    naive = np.array([[score(metric, xs[a], y, k=k) for y in ys] for a in range(rows)])
    t_naive = time.perf_counter() - t0
    n_pairs = rows * len(ys)
    total_pairs = len(xs) * len(ys)
    extrapolated = n_pairs < total_pairs
    t_naive_all = t_naive * total_pairs / n_pairs
    diff = float(np.abs(naive - batched[:rows]).max())

    print(f"[{metric}]")
    print(f"  batched layer_pair_scores, {total_pairs} pairs: {t_batched:8.2f} s")
    if extrapolated:
        print(
            f"  naive per-pair loop, measured on {n_pairs} pairs ({rows} x layers x {len(ys)}): "
            f"{t_naive:8.2f} s"
        )
        print(
            f"  naive per-pair loop, {total_pairs} pairs: {t_naive_all:8.2f} s  "
            f"(EXTRAPOLATED linearly from the {n_pairs} measured pairs)"
        )
    else:
        print(f"  naive per-pair loop, {total_pairs} pairs: {t_naive_all:8.2f} s  (measured, full)")
    print(
        f"  speed-up: {t_naive_all / t_batched:6.1f}x"
        + ("  (extrapolated)" if extrapolated else "")
    )
    print(f"  max |naive - batched| over {n_pairs} pairs: {diff:.3g}")
    print(f"  score range: {batched.min():.4f} .. {batched.max():.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--full", action="store_true", help="run the naive mutual_knn loop in full")
    p.add_argument("--naive-rows", type=int, default=3, help="x layers in the naive knn loop")
    args = p.parse_args()

    print(
        f"n = {args.n}, {args.layers} x {args.layers} layers, dims 384 / 768, "
        f"torch threads = {torch.get_num_threads()}"
    )
    xs, ys = make_layers(args.n, args.layers, 384, 768)
    t0 = time.perf_counter()
    bench("mutual_knn", xs, ys, args.k, 0 if args.full else args.naive_rows)
    bench("linear_cka", xs, ys, args.k, 0)
    print(f"total benchmark time: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
