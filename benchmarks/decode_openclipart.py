"""Decode + preprocess every openclipart PNG with a pool of worker processes.

Measures what feature extraction pays per image before the model runs: `load_image` with the
encoder's `min_side` (reduced decodes, banded decode of huge PNGs, white compositing) plus
`ImagePreprocess()` (224 px). Prints images/s, wall and CPU seconds, the slowest files with
their pixel sizes, and the skipped files with their reasons. `--naive` runs the same pool on a
plain `Image.open(...).convert("RGB")` (bomb guard off) for a ratio measured in the same run.

Roofline: decoding and resizing do no matmul work, so they are not FLOP-bound and their rate
stays images/s; the matmul rate (fp32, bf16; benchmarks/roofline.py) is still measured at the
start and the end of the run, as the machine's state beside the times (a slow run on a busy
machine shows in it).

    python benchmarks/decode_openclipart.py                  # ~8,121 files, 2 workers
    python benchmarks/decode_openclipart.py --order size     # largest files first
    python benchmarks/decode_openclipart.py --naive          # also the naive baseline
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import struct
import sys
import time
from collections import Counter

from flops import NOT_FLOP_BOUND
from roofline import Roofline

ROOT = "/usr/share/openclipart/png"


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    if head[12:16] != b"IHDR":
        return (0, 0)
    return struct.unpack(">II", head[16:24])


def pixels(path: str) -> int:
    w, h = png_size(path)
    return w * h


def work_anybind(path: str) -> tuple[str, float, float, str | None]:
    from anybind.data.images import load_image
    from anybind.encoders.preprocess import ImagePreprocess
    from anybind.errors import DataError

    pre = ImagePreprocess()
    t, c = time.perf_counter(), time.process_time()
    try:
        pre(load_image(path, min_side=pre.resize))
        err = None
    except DataError as exc:
        err = str(exc)
    return path, time.perf_counter() - t, time.process_time() - c, err


def work_naive(path: str) -> tuple[str, float, float, str | None]:
    from PIL import Image

    from anybind.encoders.preprocess import ImagePreprocess

    Image.MAX_IMAGE_PIXELS = None
    pre = ImagePreprocess()
    t, c = time.perf_counter(), time.process_time()
    try:
        with Image.open(path) as im:
            pre(im.convert("RGB"))
        err = None
    except Exception as exc:  # noqa: BLE001 - the baseline reports whatever breaks
        err = f"{type(exc).__name__}: {exc}"
    return path, time.perf_counter() - t, time.process_time() - c, err


def run(fn, paths: list[str], workers: int) -> dict:
    ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
    t0 = time.perf_counter()
    with ctx.Pool(workers) as pool:
        results = list(pool.imap_unordered(fn, paths, chunksize=4))
    wall = time.perf_counter() - t0
    return {"wall": wall, "results": results}


def report(name: str, out: dict, root: str) -> None:
    res = out["results"]
    cpu = sum(r[2] for r in res)
    skipped = [(r[0], r[3]) for r in res if r[3]]
    print(
        f"\n== {name}: {len(res)} images in {out['wall']:.1f} s wall "
        f"({len(res) / out['wall']:.0f} images/s), {cpu:.1f} s CPU in workers"
    )
    big = [r for r in res if pixels(r[0]) > 16e6]
    rest = [r for r in res if pixels(r[0]) <= 16e6]
    print(
        f"   {len(big)} files over 16 Mpx: {sum(r[2] for r in big):.1f} s CPU; the other "
        f"{len(rest)}: {sum(r[2] for r in rest) / max(len(rest), 1) * 1e3:.2f} ms CPU each"
    )
    print("   slowest files:")
    for path, sec, csec, err in sorted(res, key=lambda r: -r[1])[:10]:
        w, h = png_size(path)
        tag = "  SKIPPED" if err else ""
        print(
            f"   {sec:6.2f} s ({csec:5.2f} CPU)  {w:>6} x {h:<6} {w * h / 1e6:7.1f} Mpx  "
            f"{os.path.relpath(path, root)}{tag}"
        )
    print(f"   skipped: {len(skipped)}")
    for reason, n in Counter(e.split(":")[0] for _, e in skipped).most_common():
        print(f"     {n} x {reason}")
    for path, err in skipped[:10]:
        print(f"     {os.path.relpath(path, root)}: {err[:160]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=ROOT)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--order",
        choices=["path", "size"],
        default="path",
        help="path: index order, as extraction runs; size: largest first",
    )
    ap.add_argument("--limit", type=int, default=0, help="only the first N files (0: all)")
    ap.add_argument("--naive", action="store_true", help="also time a naive decode for a ratio")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.root):
        sys.exit(f"{args.root} not found: apt-get install openclipart-png")
    paths = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(args.root) for f in fs if f.endswith(".png")
    )
    if args.limit:
        paths = paths[: args.limit]
    if args.order == "size":
        paths.sort(key=lambda p: -pixels(p))
    roof = Roofline.measure()
    print(
        f"{len(paths)} PNGs under {args.root}, {args.workers} workers, order={args.order}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the run"
    )
    ours = run(work_anybind, paths, args.workers)
    report("anybind load_image(min_side=256) + ImagePreprocess(224)", ours, args.root)
    if args.naive:
        naive = run(work_naive, paths, args.workers)
        report("naive Image.open().convert('RGB') + ImagePreprocess(224)", naive, args.root)
        print(
            f"\nspeed-up: {naive['wall'] / ours['wall']:.2f}x wall, "
            f"{sum(r[2] for r in naive['results']) / sum(r[2] for r in ours['results']):.2f}x CPU"
        )
    roof.remeasure()
    print(f"\n{roof.header()}")
    print(f"decode + preprocess: {NOT_FLOP_BOUND}; {len(paths) / ours['wall']:.0f} images/s is its measure")


if __name__ == "__main__":
    main()
