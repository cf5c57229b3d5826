"""Training on stores larger than the memory the process may use (issue 16, item 5).

Writes an image and a text store that together take about `--ratio` x the bound B (default 2 x
1 GiB; 1024-d float32 features), then trains the linear recipe for `--steps` steps twice, each in
its own process:

- mapped: ANYBIND_MEMORY_BUDGET=B, so `memory_budget()` keeps the features memory-mapped (they
  are more than B / 4);
- mapped-blocks: the same with `train.shuffle=blocks` (runs of consecutive pairs);
- in-memory: no limit; the features are copied to RAM as usual.

Each reports steps/s (steps over the whole `train()` call: setup, one validation and the saved
model included) and its peak RssAnon (sampled every 10 ms; mapped file pages are not anonymous).
The mapped run must stay under B. A cgroup memory cap would also bound the page cache; here the
cgroup tree belongs to the sandbox and systemd-run has no bus, so the page cache is not capped:
`--cold` additionally drops the stores' pages (posix_fadvise DONTNEED, these files only) before the
mapped run and measures a reader alone: full-shuffle batches against `block_permutation` batches.

    python benchmarks/train_past_memory.py                    # B = 1 GiB, stores ~2 GiB
    python benchmarks/train_past_memory.py --bound-mib 512 --steps 200 --cold
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import AnonPeak  # noqa: E402

DIM = 1024


def prepare(work: Path, bound: int, ratio: float) -> Path:
    """Two stores of about ratio x bound bytes together (written once)."""
    from anybind.features.store import write_store

    rows = int(ratio * bound / (2 * DIM * 4))
    folder = work / f"stores-{rows}"
    if (folder / "done").exists():
        return folder
    rng = np.random.default_rng(0)
    ids = [f"i{k:08d}" for k in range(rows)]
    image = rng.standard_normal((rows, DIM), dtype=np.float32)
    write_store(folder / "image", {"final": image}, ids, modality="image", field="image", dataset="past-memory")
    image += rng.standard_normal((rows, DIM), dtype=np.float32)  # the caption side: a noisy copy, in place
    write_store(folder / "text", {"final": image}, ids, modality="text", field="caption", dataset="past-memory")
    (folder / "done").write_text("")
    return folder


def drop_cache(folder: Path) -> None:
    """Evict these stores' pages from the page cache (only these files)."""
    for f in folder.rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child_train(folder: Path, mode: str, bound: int, steps: int) -> dict:
    """`steps` training steps, mapped (mode "mapped", "mapped-blocks": train.shuffle=blocks) or in memory."""
    import torch

    from anybind.align.recipe import load_recipe
    from anybind.align.trainer import train
    from anybind.features import FeatureStore

    torch.set_num_threads(2)
    store_bytes = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    stores = {m: FeatureStore.open(folder / m) for m in ("image", "text")}
    recipe = load_recipe("linear", ["dim=256", "train.batch_size=1024", f"train.max_steps={steps}",
                                    f"train.val_every={steps}", f"train.checkpoint_every={steps}",
                                    f"train.shuffle={'blocks' if mode == 'mapped-blocks' else 'full'}"])
    out = tempfile.mkdtemp()
    with AnonPeak() as mem:
        t0 = time.perf_counter()
        train(recipe, stores, out=out, device="cpu", progress=False, baselines=False, resume=False)
        seconds = time.perf_counter() - t0
    return {"mode": mode, "steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
            "peak_anon_mib": mem.peak / 1024, "store_mib": store_bytes / 2**20}


def child_read(folder: Path, batches: int) -> dict:
    """Cold reads of `batches` batches of 1024 rows: full shuffle against block shuffle."""
    from anybind.align.data import block_permutation
    from anybind.features import FeatureStore

    arr = FeatureStore.open(folder / "image")["final"]
    out = {}
    for name in ("full shuffle", "block shuffle"):
        drop_cache(folder)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(arr)) if name == "full shuffle" else block_permutation(len(arr), rng)
        t0 = time.perf_counter()
        for b in range(batches):
            arr.read(np.sort(order[b * 1024 : (b + 1) * 1024]))
        out[name] = batches / (time.perf_counter() - t0)
    return {"cold_batches_per_s": out}


def run(args, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--work", args.work, "--bound-mib", str(args.bound_mib), "--ratio", str(args.ratio),
           "--steps", str(args.steps), *extra]
    mapped = any(str(x).startswith("mapped") for x in extra)
    env = dict(os.environ, ANYBIND_MEMORY_BUDGET=f"{args.bound_mib}M") if mapped else None
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bound-mib", type=int, default=1024, help="the anonymous memory bound B")
    p.add_argument("--ratio", type=float, default=2.0, help="stores' size over B")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cold", action="store_true", help="also drop the stores' cached pages and compare read orders")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "anybind-past-memory"))
    p.add_argument("--child", choices=("mapped", "mapped-blocks", "in-memory", "read"), help=argparse.SUPPRESS)
    args = p.parse_args()
    bound = args.bound_mib << 20
    folder = prepare(Path(args.work), bound, args.ratio)
    if args.child == "read":
        print(json.dumps(child_read(folder, 100)))
        return
    if args.child:
        if args.child.startswith("mapped") and args.cold:
            drop_cache(folder)
        print(json.dumps(child_train(folder, args.child, bound, args.steps)))
        return
    cold = ["--cold"] if args.cold else []
    mapped = run(args, "--child", "mapped", *cold)
    blocks = run(args, "--child", "mapped-blocks", *cold)
    memory = run(args, "--child", "in-memory")
    print(f"stores {mapped['store_mib']:.0f} MiB, bound B = {args.bound_mib} MiB, {args.steps} steps of 1024 pairs")
    for r in (mapped, blocks, memory):
        print(f"  {r['mode']:>13}: {r['steps_per_s']:.1f} steps/s, peak RssAnon {r['peak_anon_mib']:.0f} MiB")
    print(f"  steps/s ratio mapped / in-memory: {mapped['steps_per_s'] / memory['steps_per_s']:.2f}")
    print(f"  steps/s ratio mapped with train.shuffle=blocks / mapped: {blocks['steps_per_s'] / mapped['steps_per_s']:.2f}")
    print(f"  mapped runs under B: {max(mapped['peak_anon_mib'], blocks['peak_anon_mib']) < args.bound_mib}")
    if args.cold:
        print(f"  cold reads, batches/s: {run(args, '--child', 'read')['cold_batches_per_s']}")


if __name__ == "__main__":
    main()
