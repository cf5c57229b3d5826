"""Read throughput of one feature store: a local folder (memory-mapped) vs s3:// on the loopback.

Writes one store (`write_store`, fp16, --rows x --dim, shards of --shard-size rows) locally, copies its objects to a bucket
on a moto S3 server started here on 127.0.0.1, then times, interleaved, --repeats times each:
  (a) the whole layer read into memory (`store.numpy(layer)`);
  (b) --batches batches of --batch random rows (what a training loop over a store larger than
      memory asks for), and on s3 again with the local read cache ($ANYBIND_S3_READ_CACHE);
and prints MB/s (stored bytes read / seconds, the median). The local figure is from the page
cache (the store was just written): an upper bound for a disk. Needs the `scale` extra.

    python benchmarks/store_read_s3.py --rows 100000 --dim 768
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def _moto(port: int) -> subprocess.Popen:
    import boto3

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = boto3.client("s3", endpoint_url=os.environ["ANYBIND_S3_ENDPOINT"])
    for _ in range(100):
        try:
            client.create_bucket(Bucket="anybind-bench")
            return proc
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.1)
    raise SystemExit("the moto server did not start")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--shard-size", type=int, default=1024, help="rows per shard (extract's default)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "ANYBIND_S3_ENDPOINT": f"http://127.0.0.1:{port}"})
    from anybind.features import FeatureStore
    from anybind.features.storage import as_path
    from anybind.features.store import write_store

    proc = _moto(port)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            x = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
            local = write_store(f"{tmp}/store", {"final": x}, [f"i{i}" for i in range(args.rows)], modality="text",
                                field="caption", dataset="bench", dtype="fp16", shard_size=args.shard_size)
            remote_path = as_path("s3://anybind-bench/cache/stores/bench")
            t_put = 0.0
            for f in sorted(local.path.iterdir()):  # the same bytes, as objects (the manifest last)
                t_put += _timed(lambda f=f: (remote_path / f.name).write_bytes(f.read_bytes()))
            remote = FeatureStore.open(str(remote_path))
            nbytes = args.rows * args.dim * 2
            picks = [np.random.default_rng(b).choice(args.rows, args.batch, replace=False) for b in range(args.batches)]
            times = {k: [] for k in ("local full", "s3 full", "local batches", "s3 batches", "s3 cached batches")}
            local.numpy("final"), remote.numpy("final")  # warm: page cache, mappings, connections
            for _ in range(args.repeats):  # interleaved: the machine's other load hits both alike
                for name, store in (("local", local), ("s3", remote)):
                    times[f"{name} full"].append(_timed(lambda s=store: s.numpy("final")))
                    times[f"{name} batches"].append(_timed(lambda s=store: [s["final"].read(p) for p in picks]))
            os.environ["ANYBIND_S3_READ_CACHE"] = f"{tmp}/read-cache"  # each shard copied once, then mapped
            t_copy = _timed(lambda: FeatureStore.open(str(remote_path))["final"].parts)
            cached = FeatureStore.open(str(remote_path))
            for _ in range(args.repeats):
                times["s3 cached batches"].append(_timed(lambda: [cached["final"].read(p) for p in picks]))
            assert np.array_equal(local.numpy("final"), remote.numpy("final"))
            print(f"read cache: the {len(remote.manifest['shards'])} shards copied in {t_copy:.2f}s "
                  f"({nbytes / 2**20 / t_copy:.0f} MB/s)")
            print(f"store: {args.rows} rows x {args.dim} fp16 = {nbytes / 2**20:.0f} MiB; "
                  f"uploaded to moto in {t_put:.1f}s ({nbytes / 2**20 / t_put:.0f} MB/s)")
            for k, ts in times.items():
                read = nbytes if "full" in k else args.batches * args.batch * args.dim * 2
                med = statistics.median(ts)
                print(f"{k:14s} {med * 1000:8.1f} ms  {read / 2**20 / med:8.0f} MB/s")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
