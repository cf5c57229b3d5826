"""Extraction throughput: is `anybind extract` as fast as its parts allow?

In one run, over the same images, it times
  (a) the bare encoder forward on pre-decoded tensors,
  (b) decoding + preprocessing alone (the same worker processes extract uses),
  (c) the full `extract` (decode + preprocess + forward + write to a fresh store),
and prints items/s for each. On a CPU machine decoding and the forward pass share the cores,
so the bound for (c) is 1 / (t_forward + t_decode) per item; on a GPU it is the forward alone.
The ratio (c) / bound is the figure of merit (target >= 0.9).

Roofline: the matmul rate (fp32, bf16) is measured at the start and the end of the run
(benchmarks/roofline.py); (a) and (c) print their GFLOP/s as a fraction of the rate of the
precision extraction computes in (`choose_precision`). FLOPs: benchmarks/flops.py (FlopCounterMode
over the real forward of each batch shape; analytic for Whisper under CTranslate2; otherwise not
counted, with the reason). (b) does no matmul work: items/s only.

    python benchmarks/extract_throughput.py --encoder efficientnet-lite0 --data openclipart --n 1024
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from anybind.data import load_dataset
from anybind.device import select_device
from anybind.encoders import create_encoder
from anybind.features import extract
from anybind.features.extract import (
    _batches,
    _Collate,
    _Items,
    _to,
    autocast,
    choose_precision,
    default_field,
)
from flops import NOT_FLOP_BOUND, encoder_flops, flops_line, roofline_text
from roofline import Roofline

SHARD_SIZE = 1024  # extract's default, passed to it: the batches (a) and (b) run are the ones (c) runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--data", default="openclipart")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--layers", default="final")
    args = ap.parse_args()

    roof = Roofline.measure()
    device = select_device("auto")
    enc = create_encoder(args.encoder).to(device)
    index = load_dataset(args.data).spread(args.n)  # evenly spread: rare huge images count fairly
    field = default_field(index, enc.modality)
    _, _, refs = index.field_rows(field)
    layers, pooling = enc.resolve_layers(args.layers), enc.default_pooling
    workers = args.workers if args.workers is not None else (min(2, os.cpu_count() or 1) if enc.modality != "text" else 0)
    precision = choose_precision(enc, pooling, device)
    print(f"{enc.spec} on {len(refs)} items of {args.data}, batch {args.batch_size}, {workers} workers, "
          f"{precision} compute, device {device}, torch threads {torch.get_num_threads()}")

    # (b) decode + preprocess alone, through the same loader extract uses, in the batches it makes
    # (captions sorted by length inside a shard): (a) and (c) then compute the same padding
    by_length = enc.modality if enc.modality in ("text", "audio") else False
    batches = _batches(list(range(-(-len(refs) // SHARD_SIZE))), SHARD_SIZE, refs, args.batch_size, by_length)
    loader = torch.utils.data.DataLoader(_Items(enc, refs), batch_sampler=batches, collate_fn=_Collate(enc),
                                         num_workers=workers, multiprocessing_context="fork" if workers else None)
    t = time.perf_counter()
    decoded = [(pos, b) for pos, b, _ in loader if b is not None]
    t_decode = time.perf_counter() - t
    n_ok = sum(len(p) for p, _ in decoded)

    # (a) the bare forward on the pre-decoded batches
    with torch.inference_mode():
        with autocast(precision, device):
            enc.encode(_to(decoded[0][1], device), layers, pooling)  # warm-up
        t = time.perf_counter()
        for _, b in decoded:
            with autocast(precision, device):
                out = enc.encode(_to(b, device), layers, pooling)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_forward = time.perf_counter() - t
    del out

    # (c) the full extract into a fresh cache
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        store = extract(enc, index, layers=layers, precision=precision, batch_size=args.batch_size, shard_size=SHARD_SIZE,
                        num_workers=workers, cache=tmp, progress=False)
        t_full = time.perf_counter() - t
        assert len(store) == n_ok
    flops, how = encoder_flops(enc, (b for _, b in decoded), layers, pooling)
    roof.remeasure()

    report(roof, device, n_ok, (flops, how), precision, t_forward, t_decode, t_full)


def report(roof: Roofline, device, n_ok: int, counted: tuple, precision: str, t_forward: float, t_decode: float,
           t_full: float) -> None:
    (flops, how), per = counted, (lambda s: n_ok / s)
    bound = n_ok / (t_forward + t_decode) if device.type == "cpu" else n_ok / t_forward
    print(roof.header())
    print(flops_line(flops, n_ok, how))
    print(f"(a) forward only          {per(t_forward):8.1f} items/s   ({t_forward:.1f} s)"
          f"{roofline_text(roof, t_forward, flops, precision)}")
    print(f"(b) decode + preprocess   {per(t_decode):8.1f} items/s   ({t_decode:.1f} s)   {NOT_FLOP_BOUND}")
    print(f"(c) full extract          {per(t_full):8.1f} items/s   ({t_full:.1f} s)"
          f"{roofline_text(roof, t_full, flops, precision)}")
    print(f"bound = 1/(t_forward + t_decode) = {bound:.1f} items/s" if device.type == "cpu" else f"bound = forward = {bound:.1f} items/s")
    print(f"ratio (c) / bound = {per(t_full) / bound:.2f}   (target >= 0.90)")


if __name__ == "__main__":
    main()
