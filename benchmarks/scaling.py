"""Cost growth: the time and peak memory of every step as the number of rows grows.

Each (step, n) runs in its own subprocess, so its peak memory is its own: the table reports the
seconds of the step (setup excluded), the process's peak anonymous memory above what it held when
the step began (RssAnon sampled every 10 ms from /proc/self/status: memory-mapped store pages are
file-backed and not counted) and its VmHWM (all resident memory, mapped pages included). The
growth exponent is log(t2 / t1) / log(n2 / n1) on the two largest n: about 1 is linear, n log n
reads about 1.05-1.1 over a decade; above 1.15 is flagged as worse than n log n.

Inputs are synthetic and written once per n under --work (kept between runs): an image and a text
store (32-d features, correlated, one caption per item) through the store's own `write_store`, a
Parquet table for the lister, and 256-value grey thumbnails with planted near-duplicates.

Steps:
- list: `load_dataset("table:...")` of an n-row table (id, image path, caption), no cache hit.
- near-dups: `look_keys` on n thumbnails (1 in 10 a noisy copy of another, 1 in 50 blank).
- cache-hit: `sync_splits` of an n-row store against its index (the path of every extract hit).
- pairing: `PairedFeatures` on the two stores (join on item id, finite check).
- curate: `curate_pool` selecting a fixed --curate-n items from the n-item pool over 1,000 random
  concepts, near-duplicates (cosine > 0.95) skipped: each selection is checked against the items
  selected so far (O(n_selected^2 d)), not the pool's all pairs (it was O(n^2 d)).
- train-epoch: `train` for one epoch of the linear recipe (batch 1024, dim 64), no blend,
  validation once at the end; the stores' val and test splits are 5,000 items each (a tenth below
  50k): the trainer validates on the whole val split, all pairs, so a val split growing with n
  would make this step quadratic.
- blend-<name>: fitting each training-free baseline on the train pairs and encoding a fixed
  --blend-queries rows (ASIF's encoding is dense in n_anchors = n train items).
- retrieval: recall@k on a fixed gallery of --gallery pairs drawn from n (the way to report at scale).
- index-build / index-query: `serve.index._make_index` (kind auto: flat below 100k, HNSW above)
  and a search of --queries vectors.

    python benchmarks/scaling.py --quick            # 10k, 100k
    python benchmarks/scaling.py                    # 10k, 100k, 1M
    python benchmarks/scaling.py --sizes 10000,100000,1000000,10000000 --steps near-dups,index-build
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

DIM = 32
THUMB = 256
STEPS = ("list", "near-dups", "cache-hit", "pairing", "curate", "train-epoch", "blend-procrustes", "blend-cca",
         "blend-nn-transfer", "blend-asif", "retrieval", "index-build", "index-query")
FLAG_ABOVE = 1.15
HELD_OUT = 5000  # val and test items of the synthetic stores
CONCEPTS = 1000  # the curate step's vocabulary
INPUTS = {"list": ("table",), "cache-hit": ("table",), "near-dups": ("thumbs",)}  # others read the stores


# ---- memory ---------------------------------------------------------------------------------------
def _status(field: str) -> int:
    """A /proc/self/status field in KiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class AnonPeak:
    """The peak RssAnon of this process while the block runs, sampled by a thread."""

    def __init__(self, every: float = 0.01):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            self._stop.wait(self.every)

    def __enter__(self) -> AnonPeak:
        self.start = _status("RssAnon")
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


# ---- synthetic inputs -----------------------------------------------------------------------------
def item_ids(n: int) -> list[str]:
    return [f"i{k:08d}" for k in range(n)]


def prepare(work: Path, n: int, step: str, shard_size: int | None = None) -> Path:
    """The inputs of `step` at size n, each written once (at 10M rows the thumbnails alone are 10 GB,
    so a step writes only what it reads): the stores, the table, the thumbnails."""
    folder = work / (f"n{n}" if shard_size is None else f"n{n}-shards{shard_size}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    needs = INPUTS.get(step, ("stores",))
    if "stores" in needs and not (folder / "stores.done").exists():
        write_stores(folder, item_ids(n), rng, shard_size)
        (folder / "stores.done").write_text("")
    if "table" in needs and not (folder / "table.parquet").exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = item_ids(n)
        pq.write_table(pa.table({"id": ids, "image": [f"img/{i}.png" for i in ids],
                                 "caption": [f"a drawing number {k}" for k in range(n)]}), folder / "table.parquet")
    if "thumbs" in needs and not (folder / "thumbs.npy").exists():
        np.save(folder / "thumbs.npy", synthetic_thumbnails(n, np.random.default_rng([n, 1])))
    return folder


def fixed_splits(n: int, held_out: int = HELD_OUT) -> list[str]:
    """val and test of a fixed size (at most a tenth each), the rest train: evaluation on a gallery of
    fixed size, as large datasets report it (COCO's 5k test), so an epoch's cost is the training's."""
    m = min(held_out, n // 10)
    return ["val"] * m + ["test"] * m + ["train"] * (n - 2 * m)


def write_stores(folder: Path, ids: list[str], rng: np.random.Generator, shard_size: int | None = None) -> None:
    """An image and a text store of correlated DIM-d features, one caption per item, in one shard or in
    shards of `shard_size` rows (extraction writes 1,024-row shards: 9,766 a store at 10M rows)."""
    from anybind.features.store import write_store

    n = len(ids)
    image = rng.standard_normal((n, DIM), dtype=np.float32)
    text = (image @ rng.standard_normal((DIM, DIM), dtype=np.float32) / math.sqrt(DIM)
            + 0.5 * rng.standard_normal((n, DIM), dtype=np.float32))
    splits = fixed_splits(n)
    for name, x in (("image", image), ("text", text)):
        write_store(folder / name, {"final": x}, ids, modality=name, field=name if name == "image" else "caption",
                    dataset=f"synthetic-{n}", splits=splits, shard_size=shard_size)


def synthetic_thumbnails(n: int, rng: np.random.Generator, chunk: int = 1 << 16) -> np.ndarray:
    """n grey thumbnails: smooth random images; 1 in 10 a noisy copy of an earlier one, 1 in 50 blank."""
    out = np.empty((n, THUMB), dtype=np.float32)
    basis = rng.standard_normal((16, THUMB)).astype(np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        out[lo:lo + m] = 128 + 30 * rng.standard_normal((m, 16), dtype=np.float32) @ basis / 4 \
            + 20 * rng.standard_normal((m, THUMB), dtype=np.float32)
    copies = np.nonzero(rng.random(n) < 0.1)[0]
    copies = copies[copies > 0]
    sources = (rng.random(len(copies)) * copies).astype(np.int64)
    out[copies] = out[sources] + rng.normal(0, 2, (len(copies), THUMB)).astype(np.float32)
    out[rng.random(n) < 0.02] = 250.0
    return out


# ---- the steps (each: setup untimed, then the timed callable) --------------------------------------
def step_list(folder: Path, args):
    from anybind.data import load_dataset

    cache = Path(tempfile.mkdtemp(dir=folder))
    return lambda: load_dataset(f"table:{folder / 'table.parquet'}", cache=cache)


def step_near_dups(folder: Path, args):
    from anybind.data.near_duplicates import look_keys

    thumbs = list(np.load(folder / "thumbs.npy"))
    return lambda: look_keys(thumbs)


def step_cache_hit(folder: Path, args):
    from anybind.data import load_dataset
    from anybind.features import FeatureStore
    from anybind.features.extract import sync_splits

    index = load_dataset(f"table:{folder / 'table.parquet'}", cache=Path(tempfile.mkdtemp(dir=folder)))
    if not (folder / "hit.done").exists():  # a store as extracted from this index: the splits agree
        from anybind.features.store import write_store

        write_store(folder / "hit", {"final": np.zeros((len(index), 4), np.float32)}, index.item_ids,
                    modality="image", field="image", dataset="table", splits=index.column("split"),
                    folds=index.column("fold"), groups=index.column("group"))
        (folder / "hit.done").write_text("")
    store = FeatureStore.open(folder / "hit")
    return lambda: sync_splits(store, index)


def step_pairing(folder: Path, args):
    from anybind.align.data import PairedFeatures
    from anybind.features import FeatureStore

    stores = {m: FeatureStore.open(folder / m) for m in ("image", "text")}
    return lambda: PairedFeatures(stores)


def step_curate(folder: Path, args):
    from anybind.align.curate import Pool, curate_pool
    from anybind.features import FeatureStore

    stores = {m: FeatureStore.open(folder / m) for m in ("image", "text")}
    image, text = (stores[m]["final"].read() for m in ("image", "text"))
    pool = Pool(stores["image"].item_ids, image, text, np.arange(len(text)))  # one caption an item
    concepts = np.random.default_rng(0).standard_normal((CONCEPTS, DIM)).astype(np.float32)
    names = [f"c{k}" for k in range(CONCEPTS)]
    return lambda: curate_pool(pool, names, concepts, args.curate_n, duplicate_cosine=0.95)


def step_train_epoch(folder: Path, args):
    from anybind.align.data import PairedFeatures
    from anybind.align.recipe import load_recipe
    from anybind.align.trainer import train
    from anybind.features import FeatureStore

    stores = {m: FeatureStore.open(folder / m) for m in ("image", "text")}
    steps = max(1, len(PairedFeatures(stores).pairs("train")) // 1024)
    recipe = load_recipe("linear", ["dim=64", "train.batch_size=1024", f"train.max_steps={steps}",
                                    f"train.val_every={steps}", f"train.checkpoint_every={steps}"])
    out = Path(tempfile.mkdtemp(dir=folder))
    return lambda: train(recipe, stores, out=out, device="cpu", progress=False, baselines=False, resume=False)


def _train_arrays(folder: Path):
    from anybind.align.data import PairedFeatures
    from anybind.features import FeatureStore

    data = PairedFeatures({m: FeatureStore.open(folder / m) for m in ("image", "text")})
    return data, data.pairs("train")


def step_blend(name: str):
    def setup(folder: Path, args):
        from anybind.align.fit import fit_baseline

        data, pairs = _train_arrays(folder)
        queries = data.side("image").rows(np.arange(args.blend_queries))[-1].numpy()

        def run():
            model = fit_baseline(name, {}, data, pairs)
            model.encode("image", queries)
            return model
        return run
    return setup


def step_retrieval(folder: Path, args):
    from anybind.features import FeatureStore
    from anybind.metrics.retrieval import retrieval_metrics

    stores = {m: FeatureStore.open(folder / m) for m in ("image", "text")}
    n = len(stores["image"])
    rows = np.sort(np.random.default_rng(0).choice(n, min(n, args.gallery), replace=False))
    return lambda: retrieval_metrics(stores["image"]["final"][rows], stores["text"]["final"][rows],
                                     np.arange(len(rows)))


def _unit_vectors(folder: Path) -> np.ndarray:
    from anybind.features import FeatureStore

    x = FeatureStore.open(folder / "image")["final"].read()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def step_index_build(folder: Path, args):
    from anybind.serve.index import _faiss, _make_index

    x = _unit_vectors(folder)

    def run():
        index, params, _ = _make_index(x, "auto")
        _faiss().write_index(index, str(folder / "index.faiss"))  # for index-query
        (folder / "index.json").write_text(json.dumps(params))
    return run


def step_index_query(folder: Path, args):
    from anybind.serve.index import _faiss, _set_params

    index = _faiss().read_index(str(folder / "index.faiss"))
    _set_params(index, json.loads((folder / "index.json").read_text()))
    q = _unit_vectors(folder)[: args.queries].copy()
    return lambda: index.search(q, 10)


SETUPS = {"list": step_list, "near-dups": step_near_dups, "cache-hit": step_cache_hit, "pairing": step_pairing,
          "curate": step_curate,
          "train-epoch": step_train_epoch, "retrieval": step_retrieval, "index-build": step_index_build,
          "index-query": step_index_query}
SETUPS.update({s: step_blend(s.removeprefix("blend-")) for s in STEPS if s.startswith("blend-")})


def run_child(step: str, n: int, args) -> dict:
    """One step at one size, in this process: its seconds and peak memory."""
    import torch

    torch.set_num_threads(args.threads)
    folder = prepare(Path(args.work), n, step, args.shard_size)
    run = SETUPS[step](folder, args)
    with AnonPeak() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"step": step, "n": n, "seconds": seconds, "cpu_seconds": cpu, "peak_anon_mib": (mem.peak - mem.start) / 1024,
            "hwm_mib": _status("VmHWM") / 1024}


# ---- the driver -----------------------------------------------------------------------------------
def measure(step: str, n: int, args) -> dict:
    """The step at size n in --repeat fresh processes: the median seconds, the largest peaks."""
    runs = [measure_once(step, n, args) for _ in range(args.repeat)]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    return {"step": step, "n": n, "seconds": float(np.median([r["seconds"] for r in ok])), "runs": len(ok),
            "cpu_seconds": float(np.median([r["cpu_seconds"] for r in ok])),
            "peak_anon_mib": max(r["peak_anon_mib"] for r in ok), "hwm_mib": max(r["hwm_mib"] for r in ok)}


def measure_once(step: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", step, str(n), "--work", args.work, "--queries", str(args.queries),
           "--gallery", str(args.gallery), "--blend-queries", str(args.blend_queries), "--threads", str(args.threads),
           "--curate-n", str(args.curate_n)] + (["--shard-size", str(args.shard_size)] if args.shard_size else [])
    threads = str(args.threads)  # BLAS and OpenMP (faiss) pools too: spinning threads on a busy machine
    env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"step": step, "n": n, "error": f"over the {args.timeout:.0f} s timeout"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        said = (done.stderr.strip().splitlines() or [""])[-1][:120]
        if done.returncode < 0:  # SIGKILL with nothing said is most often the kernel's out-of-memory killer
            said = f"killed by signal {-done.returncode}" + (" (out of memory?)" if done.returncode == -9 else "")
        return {"step": step, "n": n, "error": said or f"exit status {done.returncode}"}
    return json.loads(lines[-1])


def exponent(rows: list[dict], key: str = "seconds") -> float | None:
    ok = [r for r in rows if key in r]
    if len(ok) < 2:
        return None
    (n1, t1), (n2, t2) = [(r["n"], max(r[key], 1e-4)) for r in ok[-2:]]
    return math.log(t2 / t1) / math.log(n2 / n1)


def print_table(results: dict[str, list[dict]]) -> None:
    """Seconds and CPU seconds, each with its exponent (with one thread on a shared machine the CPU
    seconds are the steadier: waiting for the disk or for the other cores is not in them)."""
    print("| step | n | seconds | CPU seconds | peak anon MiB | VmHWM MiB | exponent (two largest n): wall / CPU |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for step, rows in results.items():
        e, ec = exponent(rows), exponent(rows, "cpu_seconds")
        for i, r in enumerate(rows):
            mark = ""
            if i == len(rows) - 1 and e is not None:
                mark = f"{e:.2f} / {ec:.2f}" + (" **worse than n log n**" if max(e, ec) > FLAG_ABOVE else "")
            if "error" in r:
                print(f"| {step} | {r['n']:,} | failed: {r['error']} | | | | |")
            else:
                print(f"| {step} | {r['n']:,} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | {r['peak_anon_mib']:.0f} "
                      f"| {r['hwm_mib']:.0f} | {mark} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10k and 100k rows only")
    p.add_argument("--sizes", help="comma-separated row counts (default 10k,100k,1M)")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated, of: " + ", ".join(STEPS))
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "anybind-scaling"),
                   help="where the synthetic inputs are written (kept between runs)")
    p.add_argument("--queries", type=int, default=1000, help="fixed query count (blend encoding, index search)")
    p.add_argument("--blend-queries", type=int, default=200,
                   help="rows each baseline encodes (ASIF's output is [rows, n anchors], dense)")
    p.add_argument("--gallery", type=int, default=5000, help="fixed retrieval gallery size")
    p.add_argument("--curate-n", type=int, default=2000, help="items the curate step selects from the n-item pool")
    p.add_argument("--shard-size", type=int, help="rows per store shard (default: one shard; extraction writes 1024)")
    p.add_argument("--threads", type=int, default=2, help="torch, BLAS and OpenMP threads of each step")
    p.add_argument("--repeat", type=int, default=1, help="runs per (step, n); the median time is kept")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one step may take")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=2, metavar=("STEP", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child[0], int(args.child[1]), args)))
        return
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
        [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    results: dict[str, list[dict]] = {}
    for step in args.steps.split(","):
        for n in sizes:
            t0 = time.perf_counter()
            results.setdefault(step, []).append(measure(step, n, args))
            print(f"# {step} n={n:,}: {json.dumps(results[step][-1])} ({time.perf_counter() - t0:.0f} s wall)",
                  file=sys.stderr, flush=True)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
