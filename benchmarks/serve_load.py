"""Load on `anybind serve`: requests/s and latency of GET /search under N concurrent clients.

It starts the server (`anybind serve`, a subprocess, on a free loopback port) with your bundle
and index, waits until it answers, then in one run measures
  - one client, alone, for --single-seconds: the unloaded latency, the reference;
  - N clients (threads, each with its own keep-alive connection) for --seconds;
each sending GET /search with varied queries (and, with --embed-share, some POST /embed), and
prints requests/s, p50 and p99 latency, the error count (must be zero: the exit code is 1
otherwise), and the N-client numbers as ratios to the single client's. Traffic goes to 127.0.0.1
only and every loop is bounded in time and count.

Roofline: the matmul rate (fp32, bf16) is measured before the server starts and after it stops
(benchmarks/roofline.py). The model FLOPs of one request (benchmarks/flops.py) are counted in this
process on the same bundle: the text encoder and projector by FlopCounterMode over
`encode_text` (the mean over the queries sent), plus the search of a flat index (2 x rows x dim;
IVF and HNSW are not counted); each phase then prints the GFLOP/s the server achieved and its
fraction of the matmul rate of the text side's precision. HTTP handling is not FLOP-bound.

Make the bundle and the index first (or use ones you have):

    anybind train --recipe default --store image=efficientnet-lite0+openclipart \\
        --store text=minilm-l6+openclipart --out runs/default
    anybind export --run runs/default --out bundles/clipart
    anybind index --bundle bundles/clipart --data openclipart --out indexes/clipart

    python benchmarks/serve_load.py --bundle bundles/clipart --index indexes/clipart            # 8 clients, 20 s
    python benchmarks/serve_load.py --bundle B --index I --clients 16 --seconds 30 --embed-share 0.2
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from flops import flat_search_flops, torch_flops
from roofline import Roofline

QUERIES = [
    "a red bird", "flag of france", "playing card", "a black cat", "a house with a red roof", "a smiling sun",
    "an old car", "a green tree", "a map of europe", "a musical note", "a coffee cup", "a sailing boat",
    "a cartoon dog", "a computer keyboard", "a christmas tree", "a blue butterfly", "a warning sign",
    "a skull", "a pirate flag", "an airplane in the sky", "a bicycle", "a yellow star", "a fish in water",
    "a cowboy hat", "a light bulb", "an arrow pointing right", "a heart", "a chess piece", "a clock",
    "a person running", "a flower in a pot", "a guitar", "a rocket", "a snowman", "a mushroom",
    "a traffic light", "the moon at night", "a telephone", "a pencil", "a castle",
]
MAX_REQUESTS_PER_CLIENT = 200_000


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def request_flops(bundle_path: str, index_path: str, embed_share: float) -> tuple[float | None, str, str]:
    """(model FLOPs of one request, how counted, the text side's precision), or (None, why not, precision)."""
    import json

    import torch

    from anybind.bundle import load

    bundle = load(bundle_path)
    precision = bundle.info["modalities"]["text"].get("precision") or "fp32"
    with torch.inference_mode():
        encode = [torch_flops(bundle.encode_text, [q]) for q in QUERIES]
    if not all(encode):
        return None, "the text encoder runs outside torch (FlopCounterMode saw no matmul)", precision
    search, how = flat_search_flops(json.loads((Path(index_path) / "index.json").read_text())["parts"])
    if search is None:
        return None, how, precision
    flops = float(np.mean(encode)) + (1 - embed_share) * search
    return flops, (f"text encoder + projector {np.mean(encode) / 1e6:.1f} MFLOP (FlopCounterMode, mean of "
                   f"{len(QUERIES)} queries) + search {search / 1e6:.1f} MFLOP ({how})"), precision


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: str, index: str, port: int, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "anybind.cli", "serve", "--bundle", bundle, "--index", index,
           "--host", "127.0.0.1", "--port", str(port), "-q"]
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before answering (see its log)")
        try:
            if httpx.get(base + "health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def client_loop(base: str, seconds: float, offset: int, k: int, embed_share: float, tally: Tally) -> None:
    rng = np.random.default_rng(offset)
    end = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=60) as c:
        for i in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= end:
                break
            q = QUERIES[(offset * 7 + i) % len(QUERIES)]
            t0 = time.perf_counter()
            try:
                if embed_share and rng.random() < embed_share:
                    r = c.post("embed", json={"texts": [q]})
                else:
                    r = c.get("search", params={"q": q, "k": k})
                ok = r.status_code == 200
                if not ok:
                    tally.errors.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                ok = False
                tally.errors.append(f"{type(e).__name__}: {e}")
            if ok:
                tally.latencies.append(time.perf_counter() - t0)


def run_phase(base: str, clients: int, seconds: float, k: int, embed_share: float) -> dict:
    tallies = [Tally() for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(base, seconds, i, k, embed_share, tallies[i]))
               for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array([x for t in tallies for x in t.latencies]) * 1000
    errors = [e for t in tallies for e in t.errors]
    return {"clients": clients, "requests": len(lat), "seconds": wall, "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "errors": len(errors), "first_errors": errors[:3]}


def roofline_report(roof: Roofline, counted: tuple, phases: tuple) -> None:
    flops, how, precision = counted
    roof.remeasure()
    print(f"\n{roof.header()}")
    if flops is None:
        print(f"FLOPs not counted: {how}")
        return
    print(f"model FLOPs per request: {flops / 1e6:.1f} MFLOP = {how}; {precision} compute")
    for r in phases:
        print(f"{r['clients']:>3} clients: {r['rps']:.1f} req/s, {roof.describe(r['seconds'], r['requests'] * flops, precision)}")
    print("the rest of each request (HTTP, JSON, the event loop) is not FLOP-bound")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a bundle folder (anybind export)")
    ap.add_argument("--index", required=True, help="an index folder built from that bundle (anybind index)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--seconds", type=float, default=20, help="duration of the N-client phase (default 20)")
    ap.add_argument("--single-seconds", type=float, default=10, help="duration of the one-client phase (default 10)")
    ap.add_argument("--k", type=int, default=10, help="results per search (default 10)")
    ap.add_argument("--embed-share", type=float, default=0.0, help="share of requests that are POST /embed (default 0)")
    ap.add_argument("--log", default="serve_load.server.log", help="where the server's output goes")
    args = ap.parse_args(argv)
    if not 0 <= args.embed_share <= 1 or args.clients < 1 or args.seconds <= 0:
        ap.error("--clients >= 1, --seconds > 0 and 0 <= --embed-share <= 1")

    roof = Roofline.measure()
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    proc = start_server(args.bundle, args.index, port, args.log)
    try:
        wait_ready(base, proc)
        print(f"server up in {time.perf_counter() - t0:.1f} s at {base} (log: {args.log}); "
              f"index: {httpx.get(base + 'health').json()['index']}")
        run_phase(base, 1, 2, args.k, args.embed_share)  # warm-up: first requests, caches, threadpool
        one = run_phase(base, 1, args.single_seconds, args.k, args.embed_share)
        many = run_phase(base, args.clients, args.seconds, args.k, args.embed_share)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

    mix = "GET /search" + (f" + {args.embed_share:.0%} POST /embed" if args.embed_share else "") + f", k={args.k}"
    print(f"\n{mix}, {os.cpu_count()} CPU cores")
    print(f"{'clients':>7}  {'requests':>8}  {'seconds':>7}  {'req/s':>7}  {'p50 ms':>7}  {'p99 ms':>7}  {'errors':>6}")
    for r in (one, many):
        print(f"{r['clients']:>7}  {r['requests']:>8}  {r['seconds']:>7.1f}  {r['rps']:>7.1f}  {r['p50_ms']:>7.1f}  "
              f"{r['p99_ms']:>7.1f}  {r['errors']:>6}")
    print(f"\n{args.clients} clients vs 1: throughput x{many['rps'] / one['rps']:.2f}, "
          f"p50 latency x{many['p50_ms'] / one['p50_ms']:.2f}, p99 latency x{many['p99_ms'] / one['p99_ms']:.2f}")
    roofline_report(roof, request_flops(args.bundle, args.index, args.embed_share), (one, many))
    errors = one["errors"] + many["errors"]
    if errors:
        print(f"ERRORS: {errors}, e.g. {(one['first_errors'] + many['first_errors'])[:3]}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
