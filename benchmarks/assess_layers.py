"""All-layer-pair assessment against its FLOP floor, and against the naive per-pair loop.

12 x 12 layers, n = 5,000 random paired features (x layers 384-d, y layers 768-d, with a shared
component so the scores are not all at chance). For each metric, in one run:

  - `layer_pair_scores` (all pairs batched): seconds, GFLOP/s, the fraction of the fp32 and bf16
    matmul rates measured in this run (benchmarks/roofline.py), and the time over the FLOP floor;
  - peak memory: a fresh child process runs the batched metric alone and reports its peak RSS
    above the RSS it had once the layers were made;
  - the naive loop (``metrics.score`` per pair, recomputing both layers' work each time), its
    speed-up and the largest score difference.

FLOP floors (multiply-add = 2 FLOPs), what the metric cannot avoid:
  mutual_knn / cycle_knn: one n x n similarity per layer, 2 n^2 d (the full matrix; the search
      computes only the upper tiles, about half, so it can beat this floor);
  linear_cka: the L1 x L2 cross products X_a^T Y_b, 2 n d1 d2 each (the per-layer self terms
      ||C^T C||^2, from the blocks on and above the diagonal, are extra work counted in the
      achieved rate but not in the floor);
  cknna: the neighbour search of both sides (as mutual_knn); the sparse masked HSICs are O(n k^2)
      per pair and not matmul work.

    .venv/bin/python benchmarks/assess_layers.py                     # ~2 min on 2 cores
    .venv/bin/python benchmarks/assess_layers.py --metrics mutual_knn,linear_cka,cknna --full

By default the naive mutual_knn / cknna loops run on the first ``--naive-rows`` x layers against
all y layers and their time is EXTRAPOLATED to every pair (the output says so).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from anybind.assess.layers import layer_pair_scores
from anybind.assess.metrics import score
from roofline import Roofline

DX, DY = 384, 768


def make_layers(n: int, n_layers: int, dx: int, dy: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 64, generator=g)
    xs, ys = [], []
    for i in range(n_layers):
        w = 0.2 + 2.0 * i / n_layers  # noise grows with depth: scores vary across layers
        xs.append(z @ torch.randn(64, dx, generator=g) + w * 8 * torch.randn(n, dx, generator=g))
        ys.append(z @ torch.randn(64, dy, generator=g) + w * 8 * torch.randn(n, dy, generator=g))
    return xs, ys


def flops(metric: str, n: int, xs, ys) -> tuple[float, float]:
    """(the FLOP floor, the FLOPs the batched form does in matmuls) of one all-pairs scoring."""
    gram = sum(2 * n * n * f.shape[1] for f in (*xs, *ys))
    if metric in ("mutual_knn", "cycle_knn", "cknna"):
        return gram, gram / 2  # upper tiles: about half (plus the diagonal tiles)
    if metric == "linear_cka":
        cross = sum(2 * n * x.shape[1] * y.shape[1] for x in xs for y in ys)
        return cross, cross + sum(self_flops(n, f.shape[1]) for f in (*xs, *ys))
    raise SystemExit(f"no FLOP count for {metric}")


def self_flops(n: int, d: int, block: int = 384) -> int:
    """FLOPs of ||C^T C||_F^2 from its blocks on and above the diagonal (layers._self_frob2)."""
    widths = [min(block, d - s) for s in range(0, d, block)]
    return sum(2 * n * widths[i] * widths[j] for i in range(len(widths)) for j in range(i, len(widths)))


def peak_memory_mib(metric: str, args) -> float:
    """Peak RSS growth (MiB) of a fresh process running the batched metric alone."""
    cmd = [sys.executable, __file__, "--child", metric, "--n", str(args.n), "--layers", str(args.layers),
           "--k", str(args.k)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def child(metric: str, args) -> None:
    xs, ys = make_layers(args.n, args.layers, DX, DY)
    layer_pair_scores([f[:64] for f in xs[:1]], [f[:64] for f in ys[:1]], metric=metric, k=3)  # load code
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed temporaries back, so RSS = the live inputs
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize() / 1024  # KiB, as ru_maxrss
    layer_pair_scores(xs, ys, metric=metric, k=args.k)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (peak - base) / 1024}))


def bench(metric: str, xs, ys, args, roof: Roofline) -> None:
    n = xs[0].shape[0]
    t0 = time.perf_counter()
    batched = layer_pair_scores(xs, ys, metric=metric, k=args.k)
    t_batched = time.perf_counter() - t0
    floor, done = flops(metric, n, xs, ys)

    rows = len(xs) if args.full or metric == "linear_cka" else min(args.naive_rows, len(xs))
    t0 = time.perf_counter()
    naive = np.array([[score(metric, xs[a], y, k=args.k) for y in ys] for a in range(rows)])
    t_naive = (time.perf_counter() - t0) * len(xs) / rows
    extrapolated = f" (EXTRAPOLATED from {rows} x layers)" if rows < len(xs) else " (measured, all pairs)"

    print(f"[{metric}] {len(xs) * len(ys)} layer pairs")
    print(f"  batched: {roof.describe(t_batched, floor)}  [floor = {floor / 1e12:.3f} TFLOP]")
    print(f"  matmul work actually done: {done / 1e12:.3f} TFLOP, {done / t_batched / 1e9:.0f} GFLOP/s "
          f"= {roof.fraction(t_batched, done):.2f} of fp32 matmul")
    if not args.no_memory:
        print(f"  peak memory above the inputs (fresh process): {peak_memory_mib(metric, args):.0f} MiB")
    print(f"  naive per-pair loop: {t_naive:.2f} s{extrapolated}; speed-up {t_naive / t_batched:.1f}x")
    print(f"  max |naive - batched| over {rows * len(ys)} pairs: {np.abs(naive - batched[:rows]).max():.3g}; "
          f"scores {batched.min():.4f} .. {batched.max():.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--metrics", default="mutual_knn,linear_cka,cknna")
    p.add_argument("--full", action="store_true", help="run the naive k-NN loops over every pair")
    p.add_argument("--naive-rows", type=int, default=2, help="x layers in the naive k-NN loops")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args)

    roof = Roofline.measure()
    xs, ys = make_layers(args.n, args.layers, DX, DY)
    print(f"n = {args.n}, {args.layers} x {args.layers} layers, dims {DX} / {DY}, k = {args.k}")
    t0 = time.perf_counter()
    for metric in args.metrics.split(","):
        bench(metric, xs, ys, args, roof)
    roof.remeasure()
    print(roof.header())
    print(f"total benchmark time: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
