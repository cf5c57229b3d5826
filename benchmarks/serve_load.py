"""Load on `anybind serve`: requests/s and latency under 1, 4, 16 and 64 concurrent clients, with
micro-batching on and off, in one run.

It starts two servers (`anybind serve` subprocesses on free loopback ports) on the same bundle and
index: one with the default micro-batching (`--max-batch 32 --batch-wait-ms 2`) and one without
(`--max-batch 1`). For each endpoint - text `GET /search` (the main mix) and image `POST /embed`
(a real indexed image, fetched from the server's /images) - and each client count, it runs the
phase against the unbatched server, then the batched one (so both see the same machine state),
each client a thread with its own keep-alive connection, and prints req/s, p50 and p99 latency (ms
and p99/p50), the errors (must be zero: the exit code is 1 otherwise), the mean batch size the
server ran (from /health), and each throughput as a multiple of the same server's single client.

The ceiling: CPU time per request is measured in the phase itself (the server process's from
/proc, the client threads' from this process's rusage), less the time the server spent inside model
calls (from /health) times the model's torch threads, divided by the requests. That
non-model CPU time per request, on this machine's cores, caps the request rate however fast the
model gets: it is printed beside each phase. Here the clients share the cores with the server, so
the ceiling counts their CPU too.

Roofline: the matmul rate (fp32, bf16) is measured before the servers start and after they stop
(benchmarks/roofline.py). The model FLOPs of one text search (benchmarks/flops.py) are counted in
this process on the same bundle: the text encoder and projector by FlopCounterMode over
`encode_text` (the mean over the queries sent), plus the search of a flat index (2 x rows x dim;
IVF and HNSW are not counted). HTTP handling is not FLOP-bound.

Make the bundle and the index first (or use ones you have):

    anybind train --recipe default --store image=efficientnet-lite0+openclipart \\
        --store text=minilm-l6+openclipart --out runs/default
    anybind export --run runs/default --out bundles/clipart
    anybind index --bundle bundles/clipart --data openclipart --out indexes/clipart

    python benchmarks/serve_load.py --bundle bundles/clipart --index indexes/clipart      # 10 s a phase
    python benchmarks/serve_load.py --bundle B --index I --clients 1,16 --endpoints search --seconds 5
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


def request_flops(bundle_path: str, index_path: str) -> tuple[float | None, str, str]:
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
    flops = float(np.mean(encode)) + search
    return flops, (f"text encoder + projector {np.mean(encode) / 1e6:.1f} MFLOP (FlopCounterMode, mean of "
                   f"{len(QUERIES)} queries) + search {search / 1e6:.1f} MFLOP ({how})"), precision


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: str, index: str, port: int, log_path: str, options: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "anybind.cli", "serve", "--bundle", bundle, "--index", index,
           "--host", "127.0.0.1", "--port", str(port), *options, "-q"]
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until /ready answers 200 (the bundle and index loaded, the encoders warmed up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before it was ready (see its log)")
        try:
            if httpx.get(base + "ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within {timeout:.0f} s")


@dataclass
class Server:
    name: str
    base: str
    proc: subprocess.Popen

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, all its threads (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def batching(self, kind: str) -> tuple[int, int, float, int]:
        """(batches, items, seconds in model calls) of `kind` so far, and the model's torch threads."""
        batching = httpx.get(self.base + "health", timeout=10).json()["batching"]
        done = batching["done"].get(kind) or {}
        return done.get("batches", 0), done.get("items", 0), done.get("model_seconds", 0.0), batching["model_threads"]


def client_loop(base: str, endpoint: str, image: bytes, seconds: float, offset: int, k: int, tally: Tally) -> None:
    end = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=120) as c:
        for i in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= end:
                break
            t0 = time.perf_counter()
            try:
                if endpoint == "search":
                    r = c.get("search", params={"q": QUERIES[(offset * 7 + i) % len(QUERIES)], "k": k})
                else:
                    r = c.post("embed", files={"file": ("query.png", image, "image/png")})
                ok = r.status_code == 200
                if not ok:
                    tally.errors.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                ok = False
                tally.errors.append(f"{type(e).__name__}: {e}")
            if ok:
                tally.latencies.append(time.perf_counter() - t0)


def _process_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_phase(server: Server, endpoint: str, image: bytes, clients: int, seconds: float, k: int) -> dict:
    kind = "text" if endpoint == "search" else "image"
    tallies = [Tally() for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(server.base, endpoint, image, seconds, i, k, tallies[i]))
               for i in range(clients)]
    b0, cpu0, mine0 = server.batching(kind), server.cpu_seconds(), _process_cpu()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    b1, cpu1, mine1 = server.batching(kind), server.cpu_seconds(), _process_cpu()
    lat = np.array([x for t in tallies for x in t.latencies]) * 1000
    errors = [e for t in tallies for e in t.errors]
    batches, items, model_s = (b1[0] - b0[0]), (b1[1] - b0[1]), (b1[2] - b0[2])
    n = max(len(lat), 1)
    cores = len(os.sched_getaffinity(0))
    # while it runs the model holds as many cores as it has torch threads: that is its CPU share
    server_other = max(cpu1 - cpu0 - model_s * b1[3], 0.0) / n
    return {"server": server.name, "endpoint": endpoint, "clients": clients, "requests": len(lat), "seconds": wall,
            "rps": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "errors": len(errors), "first_errors": errors[:3], "mean_batch": items / batches if batches else 0.0,
            "model_ms": 1000 * model_s / n, "server_other_ms": 1000 * server_other,
            "client_ms": 1000 * (mine1 - mine0) / n,
            "ceiling_rps": cores / (server_other + (mine1 - mine0) / n) if len(lat) else float("nan"),
            "server_ceiling_rps": cores / server_other if server_other > 0 else float("inf")}


def print_table(rows: list[dict], endpoint: str) -> None:
    route = "GET /search (text)" if endpoint == "search" else "POST /embed (image upload)"
    print(f"\n{route}")
    print(f"{'server':>9} {'clients':>7} {'req/s':>7} {'x1':>5} {'p50 ms':>7} {'p99 ms':>7} {'p99/p50':>7} "
          f"{'batch':>5} {'model ms':>8} {'other ms':>8} {'client ms':>9} {'ceiling':>7} {'errors':>6}")
    single = {r["server"]: r["rps"] for r in rows if r["clients"] == 1}
    for r in rows:
        print(f"{r['server']:>9} {r['clients']:>7} {r['rps']:>7.1f} {r['rps'] / single[r['server']]:>5.2f} "
              f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['p99_ms'] / r['p50_ms']:>7.2f} {r['mean_batch']:>5.1f} "
              f"{r['model_ms']:>8.2f} {r['server_other_ms']:>8.2f} {r['client_ms']:>9.2f} {r['ceiling_rps']:>7.0f} "
              f"{r['errors']:>6}")


def verdict(rows: list[dict]) -> str:
    """The issue's target: at 16 clients with batching, >= 3x one client, or >= 80% of the ceiling if lower."""
    one = next((r for r in rows if r["server"] == "batched" and r["clients"] == 1), None)
    at16 = next((r for r in rows if r["server"] == "batched" and r["clients"] == 16), None)
    if one is None or at16 is None:
        return "target not checked (needs 1 and 16 clients)"
    target = min(3 * one["rps"], 0.8 * at16["ceiling_rps"])
    met = at16["rps"] >= target and at16["errors"] == 0
    return (f"target at 16 clients: >= {target:.1f} req/s (min of 3 x {one['rps']:.1f} and 80% of the ceiling "
            f"{at16['ceiling_rps']:.0f}); measured {at16['rps']:.1f} req/s, {at16['errors']} errors: "
            + ("MET" if met else "NOT MET"))


def roofline_report(roof: Roofline, counted: tuple, rows: list[dict]) -> None:
    flops, how, precision = counted
    roof.remeasure()
    print(f"\n{roof.header()}")
    if flops is None:
        print(f"FLOPs not counted: {how}")
        return
    print(f"model FLOPs per text search: {flops / 1e6:.1f} MFLOP = {how}; {precision} compute")
    for r in rows:
        print(f"{r['server']:>9} {r['clients']:>3} clients: {r['rps']:.1f} req/s, "
              f"{roof.describe(r['seconds'], r['requests'] * flops, precision)}")
    print("the rest of each request (HTTP, JSON, the event loop) is not FLOP-bound")


def start_both(args) -> list[Server]:
    servers = []
    batched = ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    for name, options in (("unbatched", ["--max-batch", "1"]), ("batched", batched)):
        port = free_port()
        base = f"http://127.0.0.1:{port}/"
        servers.append(Server(name, base, start_server(args.bundle, args.index, port, f"{args.log}.{name}",
                                                       options + threads)))
    for s in servers:
        wait_ready(s.base, s.proc)
    return servers


def an_indexed_image(base: str) -> bytes:
    hit = httpx.get(base + "search", params={"q": "a red bird", "k": 1, "modality": "image"}, timeout=60).json()
    return httpx.get(hit["results"][0]["image_url"], timeout=60).content


def measure(servers: list[Server], args) -> dict[str, list[dict]]:
    image = an_indexed_image(servers[0].base)
    rows: dict[str, list[dict]] = {}
    for endpoint in args.endpoints:
        for s in servers:
            run_phase(s, endpoint, image, 1, 2, args.k)  # warm-up: first requests, caches, threadpool
        rows[endpoint] = []
        for clients in args.clients:
            for s in servers:  # the two servers back to back at each load: the same machine state
                rows[endpoint].append(run_phase(s, endpoint, image, clients, args.seconds, args.k))
        rows[endpoint].sort(key=lambda r: (r["server"] != "unbatched", r["clients"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a bundle folder (anybind export)")
    ap.add_argument("--index", required=True, help="an index folder built from that bundle (anybind index)")
    ap.add_argument("--clients", default="1,4,16,64", help="client counts, comma-separated (default 1,4,16,64)")
    ap.add_argument("--endpoints", default="search,embed", help="search (text), embed (image upload), or both")
    ap.add_argument("--seconds", type=float, default=10, help="duration of each phase (default 10)")
    ap.add_argument("--k", type=int, default=10, help="results per search (default 10)")
    ap.add_argument("--max-batch", type=int, default=32, help="the batched server's --max-batch (default 32)")
    ap.add_argument("--batch-wait-ms", type=float, default=2.0, help="the batched server's --batch-wait-ms (default 2)")
    ap.add_argument("--threads", type=int, help="both servers' --threads (default: theirs, the cores less one)")
    ap.add_argument("--log", default="serve_load.server.log", help="where the servers' output goes (.NAME added)")
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.endpoints = [e.strip() for e in args.endpoints.split(",")]
    if min(args.clients) < 1 or args.seconds <= 0 or not set(args.endpoints) <= {"search", "embed"}:
        ap.error("--clients >= 1, --seconds > 0, --endpoints from search, embed")

    roof = Roofline.measure()
    t0 = time.perf_counter()
    servers = start_both(args)
    try:
        print(f"servers ready in {time.perf_counter() - t0:.1f} s; index: "
              f"{httpx.get(servers[0].base + 'health').json()['index']}")
        rows = measure(servers, args)
    finally:
        for s in servers:
            s.proc.terminate()
            try:
                s.proc.wait(15)
            except subprocess.TimeoutExpired:
                s.proc.kill()

    print(f"\n{len(os.sched_getaffinity(0))} CPU cores; k={args.k}; {args.seconds:.0f} s a phase; x1 = the same "
          "server's one-client req/s; batch = mean items per model call; model / other / client ms = per request: "
          "time in model calls, the server's other CPU, the clients' CPU; ceiling = cores / (other + client) req/s")
    for endpoint, table in rows.items():
        print_table(table, endpoint)
        print(verdict(table))
    if "search" in rows:
        roofline_report(roof, request_flops(args.bundle, args.index), rows["search"])
    errors = sum(r["errors"] for t in rows.values() for r in t)
    if errors:
        print(f"ERRORS: {errors}, e.g. {[e for t in rows.values() for r in t for e in r['first_errors']][:3]}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
