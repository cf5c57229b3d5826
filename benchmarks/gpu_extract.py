"""Extraction on a GPU: what bounds `anybind extract` once the forward pass is fast?

On a GPU efficientnet-lite0's forward takes a fraction of a millisecond an image, so JPEG decoding
and preprocessing in the DataLoader workers become the bound. In one run this measures, over the
same JPEGs (made here: only 64 MiB travel to the GPU machine, so the data is generated on it):

  (a) the bare forward: pre-decoded, preprocessed batches already on the device, at the precision
      extraction chooses (`choose_precision`), synchronised;
  (b) decoding + preprocessing alone, in the DataLoader workers extract uses, for each worker count;
  (c) the full `anybind extract` (workers decode, pinned memory, non-blocking copies, forward,
      store writes) for each worker count;
  (d) with CUDA: JPEG decoding on the GPU (`torchvision.io.decode_jpeg(device="cuda")`) + resize
      and normalisation on the GPU + the forward: what moving the decode off the CPU would give.

It prints items/s for each, (c) as a fraction of min(a, b) (the bound with the decode and the
forward overlapped), and what bounds it. One command on the GPU machine:

    python benchmarks/gpu_extract.py                       # 4,096 JPEGs, workers 2..cores
    python benchmarks/gpu_extract.py --n 512 --workers 2   # a quick check (runs on a CPU too)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from anybind.data import load_dataset
from anybind.device import select_device
from anybind.encoders import create_encoder
from anybind.features import extract
from anybind.features.precision import autocast, choose_precision


def make_jpegs(root: Path, n: int, side: int = 320, seed: int = 0) -> None:
    """n JPEGs (quality 90) of smooth random colour fields with shapes: photo-like sizes and entropy."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((side, side), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y, r = (int(v) for v in rng.integers(0, side, 3) // (1, 1, 4))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        noise = rng.normal(0, 6, (side, side, 3))
        Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg",
                                                                                      quality=90)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bare_forward(enc, paths: list[str], batch: int, precision: str, device: torch.device) -> float:
    """(a) items/s of the forward alone on pre-decoded batches resident on the device."""
    items = [enc.preprocess(enc.load_item(p)) for p in paths[:batch * 4]]
    batches = [enc.collate(items[i:i + batch]).to(device) for i in range(0, len(items), batch)]
    layers = enc.resolve_layers("final")

    def run():
        with torch.inference_mode(), autocast(precision, device):
            for b in batches:
                enc.encode(b, layers)

    run()  # warm-up: kernels, cudnn autotune
    seconds = min(timed(run, device) for _ in range(3))
    return len(items) / seconds


def decode_only(enc, paths: list[str], batch: int, workers: int) -> float:
    """(b) items/s of decoding + preprocessing + collating in `workers` DataLoader processes."""
    from torch.utils.data import DataLoader

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return enc.preprocess(enc.load_item(paths[i]))

    loader = DataLoader(Items(), batch_size=batch, num_workers=workers, collate_fn=enc.collate,
                        multiprocessing_context="fork" if workers else None)
    t = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n / (time.perf_counter() - t)


def full_extract(root: Path, cache: Path, batch: int, workers: int, device: str, n: int) -> float:
    """(c) items/s of `anybind extract` into a fresh store (its precision rule, its loader)."""
    out = Path(tempfile.mkdtemp(dir=cache))
    t = time.perf_counter()
    extract("efficientnet-lite0", f"folder:{root}", batch_size=batch, num_workers=workers, cache=cache,
            out=out / "store", device=device, progress=False, layers="final")
    return n / (time.perf_counter() - t)


def gpu_decode(enc, paths: list[str], batch: int, precision: str, device: torch.device) -> float | None:
    """(d) items/s with JPEG decoding, resizing and normalising on the GPU, then the forward."""
    if device.type != "cuda":
        return None
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    pre = enc.image_preprocess
    data = [read_file(p) for p in paths]
    layers = enc.resolve_layers("final")
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)

    def run():
        with torch.inference_mode(), autocast(precision, device):
            for i in range(0, len(data), batch):
                imgs = decode_jpeg(data[i:i + batch], device=device)
                x = torch.stack([F.center_crop(F.resize(im, pre.resize, antialias=True), pre.size) for im in imgs])
                enc.encode((x.float() / 255 - mean) / std, layers)

    run()
    return len(data) / timed(run, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="JPEGs to make and extract (default 4,096)")
    ap.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    ap.add_argument("--workers", default="", help="worker counts, comma-separated (default: 2, 4, ... up to the cores)")
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    ap.add_argument("--work", help="a folder for the JPEGs and stores (default: a temporary one)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    workers = [int(w) for w in args.workers.split(",")] if args.workers else \
        sorted({w for w in (2, 4, 8, 16, 32) if w <= cores} | {cores})
    device = select_device(None if args.device == "auto" else args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-extract-"))
    root, cache = work / "jpegs", work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if not root.exists():
        make_jpegs(root, args.n)
    print(f"{args.n} JPEGs in {root} ({sum(p.stat().st_size for p in root.rglob('*.jpg')) / 2**20:.0f} MiB) made in "
          f"{time.perf_counter() - t:.0f} s; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "") + f"; {cores} CPU cores")
    enc = create_encoder("efficientnet-lite0").to(device)
    precision = choose_precision(enc, enc.check_pooling(None), device, cache)
    paths = [str(p) for p in load_dataset(f"folder:{root}", cache=cache).field_rows("image")[2]]
    fwd = bare_forward(enc, paths, args.batch, precision, device)
    print(f"\n(a) bare forward ({precision}, batch {args.batch}, on the device): {fwd:,.0f} images/s")
    gpu = gpu_decode(enc, paths, args.batch, precision, device)
    print("(d) GPU decode + resize + forward: " + (f"{gpu:,.0f} images/s" if gpu else "no CUDA: not measured"))
    print(f"\n{'workers':>7} {'(b) decode/s':>12} {'(c) extract/s':>13} {'bound':>8} {'(c)/bound':>9}  bounded by")
    for w in workers:
        dec = decode_only(enc, paths, args.batch, w)
        full = full_extract(root, cache, args.batch, w, str(device), len(paths))
        bound = min(fwd, dec) if device.type == "cuda" else 1 / (1 / fwd + 1 / dec)  # a CPU shares its cores
        what = "decoding (CPU workers)" if dec < fwd else "the forward"
        print(f"{w:>7} {dec:>12,.0f} {full:>13,.0f} {bound:>8,.0f} {full / bound:>9.2f}  {what}")


if __name__ == "__main__":
    main()
