"""Audio extraction throughput: is `anybind extract` on speech as fast as its parts allow?

In one run, over the same espeak-ng clips (captions spoken by two voices, made here), it times
  (a) decoding alone (`anybind.data.audio.load_audio`: read + resample to 16 kHz),
  (b) the encoder's preprocessing alone on the decoded clips (log-mel for Whisper),
  (c) the forward pass alone on the preprocessed, collated batches,
  (d) the full `extract` (decode + preprocess in its workers, forward, store) into a fresh cache,
and prints clips/s for each. On a CPU the parts share the cores, so the bound for (d) is
1 / (t_decode + t_preprocess + t_forward) per clip; the ratio (d) / bound is the figure of merit.

Roofline: the matmul rate (fp32, bf16) is measured at the start and the end of the run
(benchmarks/roofline.py); (c) and (d) print their GFLOP/s as a fraction of the rate of the
precision extraction computes in (`choose_precision`; Whisper under CTranslate2: fp32). FLOPs
(benchmarks/flops.py): Whisper tiny.en analytically (conv stem + 4 blocks x 384 over each clip's
padded frames); torch encoders by FlopCounterMode over the real forward. (a) and (b) do no large
matmul: clips/s only.

    python benchmarks/audio_extract.py --encoder whisper-tiny-en --n 40
    python benchmarks/audio_extract.py --encoder whisper-tiny-en --window 30s --n 16
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from anybind.data.audio import load_audio
from anybind.data.index import DatasetIndex
from anybind.encoders import create_encoder
from anybind.features import extract
from anybind.features.extract import _batches
from anybind.features.precision import autocast, choose_precision
from flops import NOT_FLOP_BOUND, encoder_flops, flops_line, roofline_text
from roofline import Roofline

CAPTIONS = [
    "a red car", "a blue whale", "a small dog running on the grass", "two people riding bicycles",
    "a bowl of fresh fruit on a table", "an old wooden house by the lake", "a cat sleeping on a sofa",
    "a train crossing a bridge", "children playing football in the park", "a plate of pasta with tomato sauce",
    "a snowy mountain under a clear sky", "a man playing the guitar", "a yellow school bus",
    "a bird sitting on a branch", "a sailboat on the ocean at sunset", "a woman reading a book",
    "a pizza with cheese and mushrooms", "a horse standing in a field", "a city street at night", "a green apple",
]
SHARD_SIZE = 1024  # extract's default, passed to it: (c) runs the batches (d) runs
VOICES = (("en-us", []), ("en-gb-scotland", ["-p", "30", "-s", "150"]))


def make_clips(root: Path, n: int) -> DatasetIndex:
    """n WAV clips (22.05 kHz, as espeak-ng writes them) and a table index over them."""
    records = []
    for i in range(n):
        caption, (voice, extra) = CAPTIONS[i % len(CAPTIONS)], VOICES[(i // len(CAPTIONS)) % len(VOICES)]
        path = root / f"clip{i:03d}.wav"
        subprocess.run(["espeak-ng", "-v", voice, *extra, "-w", str(path), caption], check=True)
        records.append({"item_id": f"clip{i:03d}", "audio": path.name, "caption": caption})
    return DatasetIndex.from_records("espeak", records, {"audio": "audio", "caption": "text"}, root=str(root))


def time_parts(enc, paths: list[str], batch_size: int, layers: list[str], precision: str) -> tuple[float, float, float, list]:
    """(t_decode, t_preprocess, t_forward, the forward's batches) over `paths`, each part alone, in this process.

    The forward pass is timed first, on batches prepared untimed. Decoding and preprocessing
    then run on one torch thread, as in extract's worker processes (the DataLoader sets one per
    worker): the log-mel's small STFTs ran 5-10x slower on two threads of a shared 2-core machine."""
    items = [enc.preprocess(load_audio(p, sample_rate=enc.sample_rate)) for p in paths]
    # the batches extract makes (clips sorted by file size inside a shard): the same padding as (d)
    groups = _batches(list(range(-(-len(paths) // SHARD_SIZE))), SHARD_SIZE, paths, batch_size, "audio")
    batches = [enc.collate([items[i] for i in group]) for group in groups]
    with torch.inference_mode(), autocast(precision, enc.device):
        enc.encode(batches[0], layers, enc.default_pooling)  # warm-up: loads the model
        t = time.perf_counter()
        for b in batches:
            enc.encode(b, layers, enc.default_pooling)
        t_fwd = time.perf_counter() - t
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    raw = [load_audio(p, sample_rate=enc.sample_rate) for p in paths]
    t_decode = time.perf_counter() - t
    t = time.perf_counter()
    for x in raw:
        enc.preprocess(x)
    t_pre = time.perf_counter() - t
    torch.set_num_threads(threads)
    return t_decode, t_pre, t_fwd, batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="whisper-tiny-en")
    ap.add_argument("--window", default=None, help="whisper-tiny-en only: trim (default) or 30s")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--layers", default="final")
    args = ap.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("this benchmark speaks its clips with espeak-ng: apt-get install espeak-ng")

    roof = Roofline.measure()
    enc = create_encoder(args.encoder, **({"window": args.window} if args.window else {}))
    layers = enc.resolve_layers(args.layers)
    precision = choose_precision(enc, enc.default_pooling, enc.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "clips"
        root.mkdir()
        index = make_clips(root, args.n)
        _, _, refs = index.field_rows("audio")
        seconds = sum(load_audio(r).size for r in refs) / 16000
        print(f"{enc.spec} on {len(refs)} espeak clips ({seconds / len(refs):.2f} s mean), batch {args.batch_size}, "
              f"{enc.preprocess_config().get('window', '')} window, {precision} compute, torch threads {torch.get_num_threads()}")
        t_decode, t_pre, t_fwd, batches = time_parts(enc, refs, args.batch_size, layers, precision)
        t = time.perf_counter()
        store = extract(enc, index, layers=layers, precision=precision, batch_size=args.batch_size,
                        shard_size=SHARD_SIZE, num_workers=args.workers,
                        cache=Path(tmp) / "cache", progress=False)
        t_full = time.perf_counter() - t
        assert len(store) == len(refs), store.report

    flops, how = encoder_flops(enc, batches, layers, enc.default_pooling)
    roof.remeasure()
    report(roof, len(refs), (flops, how), precision, t_decode, t_pre, t_fwd, t_full)


def report(roof: Roofline, n: int, counted: tuple, precision: str, t_decode: float, t_pre: float, t_fwd: float,
           t_full: float) -> None:
    flops, how = counted
    bound = n / (t_decode + t_pre + t_fwd)
    print(roof.header())
    print(flops_line(flops, n, how, unit="clip"))
    print(f"(a) decode (load_audio)    {n / t_decode:8.1f} clips/s   ({t_decode:.2f} s)   {NOT_FLOP_BOUND}")
    print(f"(b) preprocess (log-mel)   {n / t_pre:8.1f} clips/s   ({t_pre:.2f} s)   "
          "not FLOP-bound (per-clip STFT and mel filterbank: small products)")
    print(f"(c) forward only           {n / t_fwd:8.1f} clips/s   ({t_fwd:.2f} s){roofline_text(roof, t_fwd, flops, precision)}")
    print(f"(d) full extract           {n / t_full:8.1f} clips/s   ({t_full:.2f} s)"
          f"{roofline_text(roof, t_full, flops, precision)}")
    print(f"bound = 1/(t_decode + t_preprocess + t_forward) = {bound:.1f} clips/s")
    print(f"ratio (d) / bound = {n / t_full / bound:.2f}")


if __name__ == "__main__":
    main()
