"""`anybind extract`: run a frozen encoder over one field of a dataset into a feature store.

Decoding and preprocessing run in worker processes while the main process runs the forward
pass. Work is written shard by shard, atomically; a killed run resumes at the first missing
shard and ends bit-for-bit equal to an uninterrupted one (same batches, same order). Under
torchrun (RANK / WORLD_SIZE set) each process takes every WORLD_SIZE-th shard and rank 0 merges.
With `engine="ray"` the missing shards are computed by an actor pool on a Ray cluster
(`features/ray_engine.py`) with this module's own shard loop (`_run_shards`), and written here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..atomic import clean_stale_tmp, write_json, write_text, write_with
from ..checks import choice, integer
from ..data.index import rows_fingerprint
from ..device import make_current, select_device
from ..encoders import Encoder, create_encoder
from ..errors import AnybindError, DataError, StoreError
from .layers import resolve_layers
from .lock import StoreLock
from .precision import PRECISIONS, _to, autocast, choose_precision
from .safetensors_io import DTYPES, canonical_dtype, map_tensor, read_header, write_shard
from .storage import as_path
from .store import (
    FORMAT_VERSION,
    MANIFEST,
    REQUEST,
    ROWS,
    SKIPPED,
    FeatureStore,
    StoreKey,
    check_hit,
    describe_mismatch,
    find_store,
    shard_entry,
    shard_name,
    stores_dir,
)

log = logging.getLogger("anybind.extract")


# ---- choices -----------------------------------------------------------------------------------
def default_field(index, modality: str) -> str:
    """The dataset field an encoder of `modality` reads: the only one, or image/caption."""
    fields = [f for f, m in index.fields.items() if m == modality]
    if len(fields) == 1:
        return fields[0]
    preferred = {"image": "image", "text": "caption", "audio": "audio"}.get(modality)
    if preferred in fields:
        return preferred
    if not fields:
        raise DataError(f"dataset '{index.name}' has no {modality} field for this encoder: it has "
                        + ", ".join(f"{f} ({m})" for f, m in index.fields.items()))
    raise DataError(f"dataset '{index.name}' has several {modality} fields ({', '.join(fields)}): pass --field")


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---- the worker side -------------------------------------------------------------------------------
class _Items(torch.utils.data.Dataset):
    """Row position -> (position, model input or None, skip reason or None). Runs in workers."""

    def __init__(self, enc: Encoder, refs: list):
        self.enc, self.refs = enc, refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, pos: int):
        ref = self.refs[pos]
        if ref is None:
            return pos, None, "missing value"
        try:
            return pos, self.enc.preprocess(self.enc.load_item(ref)), None
        except DataError as e:
            return pos, None, str(e)
        except Exception as e:  # a decoder bug on one odd file must not kill a long run
            return pos, None, f"{type(e).__name__}: {e}"


class _Collate:
    def __init__(self, enc: Encoder):
        self.enc = enc

    def __call__(self, items):
        ok = [(p, x) for p, x, _ in items if x is not None]
        skipped = [(p, r) for p, _, r in items if r is not None]
        batch = self.enc.collate([x for _, x in ok]) if ok else None
        return [p for p, _ in ok], batch, skipped


def _batches(shards: list[int], shard_size: int, refs: list, batch_size: int,
             by_length: str | bool = False) -> list[list[int]]:
    """Fixed batches inside each shard: the same on every run, so a resumed run is bit-identical.

    With `by_length` ("text": characters; "audio": file bytes), rows of a shard are batched in
    order of length, so a batch holds captions (clips) of similar length and little padding is
    computed; shards are written back in row order, so the store does not depend on it.
    """
    out = []
    for s in shards:
        rows = list(range(s * shard_size, min((s + 1) * shard_size, len(refs))))
        if by_length:
            rows.sort(key=lambda r: (_length(refs[r], by_length), r))
        out += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return out


def _length(ref, kind) -> int:
    if not isinstance(ref, str):
        return 0
    if kind == "audio":  # a clip's file size stands for its duration; references that are no file: 0
        try:
            return os.path.getsize(ref)
        except OSError:
            return 0
    return len(ref)


# ---- the store folder ------------------------------------------------------------------------------
def _prepare_folder(path: Path, request: dict) -> None:
    """Create the store folder with its request, or check an unfinished one matches it."""
    path.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)  # even before request.json: a writer may have died writing it
    req_file = path / REQUEST
    if req_file.exists():
        have = json.loads(req_file.read_text())
        diffs = describe_mismatch(request, have)
        if diffs:
            raise StoreError(
                f"{path} holds an unfinished store for a different request; it will not be reused:\n  "
                + "\n  ".join(diffs) + f"\nRemove it (`anybind cache rm {path}`) or choose another --out."
            )
    else:
        write_json(req_file, request)


def _rows_table(rows: list[int], ids: list, subs: list, splits: dict) -> pa.Table:
    """rows.parquet: each stored vector's planned row, item, caption and the index's split."""
    return pa.table({
        "row": pa.array(range(len(rows)), pa.int64()),
        "item_id": pa.array([ids[r] for r in rows], pa.string()),
        "caption_index": pa.array([subs[r] for r in rows], pa.int32()),
        "source_row": pa.array(rows, pa.int64()),
        # the dataset index's split decision travels with the store: training and
        # evaluation read it from here and never re-split
        "split": pa.array([splits[ids[r]][0] for r in rows], pa.string()),
        "fold": pa.array([splits[ids[r]][1] for r in rows], pa.int8()),
        "group": pa.array([splits[ids[r]][2] for r in rows], pa.string()),
    })


def _read_shard_rows(path: Path, num_shards: int) -> tuple[list[int], list, list[dict]]:
    """(planned rows in store order, skipped (position, reason) pairs, the manifest's shard list)."""
    rows, skipped, shards = [], [], []
    for s in range(num_shards):
        f = path / shard_name(s)
        header, _ = read_header(f)
        meta = header.get("__metadata__", {})
        n = header["_row"]["shape"][0]
        rows.extend(map_tensor(f, "_row", header).tolist() if n else [])
        skipped.extend(json.loads(meta.get("anybind", "{}")).get("skipped", []))
        shards.append(shard_entry(f, n))  # size and sha256: checked on every hit and by `cache verify`
    return rows, skipped, shards


def _finalize(path: Path, request: dict, ids: list, subs: list, seconds: float, splits: dict) -> FeatureStore:
    """Merge shard row lists into rows.parquet and skipped.jsonl, then write the manifest last."""
    rows, skipped, shards = _read_shard_rows(path, request["num_shards"])
    if not rows:
        raise _nothing_stored(path, request, ids, skipped)
    table = _rows_table(rows, ids, subs, splits)
    write_with(path / ROWS, lambda tmp: pq.write_table(table, tmp))
    write_text(path / SKIPPED, "".join(
        json.dumps({"item_id": ids[pos], "caption_index": subs[pos], "reason": reason}) + "\n"
        for pos, reason in skipped))
    manifest = {
        "format": FORMAT_VERSION, "key": request["key"], "modality": request["modality"],
        "layers": request["layer_dims"], "dtype": request["dtype"], "rows": len(rows),
        "shards": shards, "skipped": len(skipped), "shard_size": request["shard_size"],
        "batch_size": request["batch_size"], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 2), "anybind_version": _version(),
    }
    write_json(path / MANIFEST, manifest)
    return FeatureStore.open(path)


def _nothing_stored(path: Path, request: dict, ids: list, skipped: list) -> StoreError:
    """Every item was skipped: say why (the commonest reasons, counted), and keep no empty store.

    The shards and request are removed, so the next run reads the items again (say, once the
    missing files are back) instead of finding an empty store done.
    """
    reasons = Counter(reason.split(":")[0] for _, reason in skipped)
    counts = ", ".join(f"{c} {r}" for r, c in reasons.most_common(3))
    if len(reasons) > 3:
        counts += f", {sum(reasons.values()) - sum(c for _, c in reasons.most_common(3))} other"
    first = f" (first: item {ids[skipped[0][0]]!r}: {skipped[0][1]})" if skipped else ""
    for s in range(request["num_shards"]):
        (path / shard_name(s)).unlink(missing_ok=True)
    (path / REQUEST).unlink(missing_ok=True)
    field = request["key"]["field"]
    if not request["num_rows"]:
        return StoreError(f"the dataset has no '{field}' values to extract; nothing was stored")
    return StoreError(f"all {request['num_rows']} items were skipped: {counts}{first}; nothing was stored. "
                      f"Check the dataset's '{field}' values (paths, files) and run again.")


def _version() -> str:
    from .. import __version__

    return __version__


# ---- the entry point -------------------------------------------------------------------------------
def extract(
    encoder: str | Encoder,
    data,
    *,
    field: str | None = None,
    layers=None,
    pooling: str | None = None,
    precision: str = "auto",
    dtype: str = "fp16",
    batch_size: int | None = None,
    num_workers: int | None = None,
    shard_size: int = 1024,
    cache: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    assessment: str | os.PathLike | None = None,
    engine: str = "local",
    actors: int | None = None,
    num_gpus: float | None = None,
    ray_address: str | None = None,
) -> FeatureStore | None:
    """Extract features of `encoder` over one field of `data` into a feature store (or reuse one).

    `layers` is anything `resolve_layers` reads ("3,final", "all", "last", "auto" with an
    `assessment`). Returns the store (None on non-zero ranks under torchrun, which only write
    their shards). `engine="ray"` computes the missing shards on a Ray cluster (`actors`,
    `num_gpus` per actor, `ray_address`; see `features.ray_engine`): the same store, bit for bit.

    >>> store = extract("minilm-l6", "openclipart", layers="3,final")
    >>> store["final"].shape        # (rows, 384), memory-mapped
    """
    t0 = time.perf_counter()
    batch_size = _checked_sizes(batch_size, shard_size, precision)
    runner = _engine(engine, actors, num_gpus, ray_address, num_workers, device, encoder)  # before any work
    device = select_device(device)
    enc, index, field = _open_inputs(encoder, data, field, device, cache)
    layers = resolve_layers(layers, enc.layer_dims, assessment, enc.modality, encoder=str(enc.spec), cache=cache)
    pooling, dtype = enc.check_pooling(pooling), canonical_dtype(dtype)
    ids, subs, refs = index.field_rows(field)
    ds_fp = rows_fingerprint(ids, subs, refs)  # = index.field_fingerprint(field), without listing twice
    target = _find_or_place(enc, StoreKey(None, index.name, ds_fp, field), layers, pooling,
                            precision, device, cache, out)
    if target.store is not None:
        return _hit(target.store, t0, index, layers)
    request = {
        "format": FORMAT_VERSION, "key": target.key.as_dict(), "modality": enc.modality, "layers": layers,
        "layer_dims": {lay: enc.output_dim(lay, pooling) for lay in layers}, "dtype": dtype,
        "shard_size": shard_size, "batch_size": batch_size, "num_rows": len(refs),
        "num_shards": max(1, -(-len(refs) // shard_size)),
    }
    # one writer per store: an identical command started meanwhile waits here, then finds it done
    with _store_lock(target.path):
        done = _reusable_out(target.path, target.key, layers)
        if done is not None:
            return _hit(done, t0, index, layers)
        log.info("extracting %s over %s/%s: %d rows, layers %s, %s autocast, stored %s -> %s", enc.spec,
                 index.name, field, len(refs), ",".join(layers), target.precision, dtype, target.path)
        rank, computed = _write_my_shards(enc, refs, request, target, device, num_workers, progress, runner)
        return _finish(target, request, index, ids, subs, t0, computed) if rank == 0 else None


def _checked_sizes(batch_size: int | None, shard_size: int, precision: str) -> int:
    """The batch size (default 64); the shard size and precision checked."""
    integer("shard size", shard_size, minimum=1, error=AnybindError)
    choice("precision", precision, PRECISIONS, error=AnybindError)
    return 64 if batch_size is None else integer("batch size", batch_size, minimum=1, error=AnybindError)


def _engine(engine: str, actors, num_gpus, ray_address, num_workers, device, encoder):
    """None for the local engine, else the Ray engine's runner (its options checked, Ray imported)."""
    choice("engine", engine, ("local", "ray"), error=AnybindError)
    if engine == "local":
        given = [n for n, v in (("actors", actors), ("num_gpus", num_gpus), ("ray_address", ray_address)) if v is not None]
        if given:
            raise AnybindError(f"{', '.join(given)} apply to engine 'ray' only (--engine ray)")
        return None
    from .ray_engine import RayRunner

    return RayRunner.create(encoder, actors=actors, num_gpus=num_gpus, address=ray_address,
                            num_workers=num_workers, device=device)


def _store_lock(path: Path) -> StoreLock:
    """The store's lock; under torchrun one per rank (the ranks of one job write side by side)."""
    rank, world = _rank_world()
    return StoreLock(path, name=".lock" if world == 1 else f".lock.rank{rank}")


def _open_inputs(encoder, data, field: str | None, device: torch.device, cache) -> tuple[Encoder, object, str]:
    """(the encoder on `device`, the dataset index, the field it reads), checked to agree."""
    make_current(device)  # under torchrun: this rank's GPU, not a context on GPU 0 as well
    enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
    enc.to(device)
    if isinstance(data, (str, os.PathLike)):
        from ..data import load_dataset

        data = load_dataset(str(data), cache=cache)
    field = field or default_field(data, enc.modality)
    if data.modality(field) != enc.modality:
        raise DataError(f"field '{field}' of '{data.name}' is {data.modality(field)}, but {enc.spec} encodes {enc.modality}")
    return enc, data, field


class _Target(NamedTuple):
    store: FeatureStore | None  # a finished store to reuse, or None: extract into `path`
    path: Path
    precision: str  # the compute precision (decided, not "auto")
    key: StoreKey | None


def _find_or_place(enc: Encoder, partial: StoreKey, layers: list[str], pooling: str,
                   precision: str, device: torch.device, cache, out) -> _Target:
    """A finished store that answers the request, or the folder to extract into.

    `partial` is the key without its encoder part. Precision "auto" is decided first, by a rule
    that gives the same answer in every cache (`choose_precision`), so the same request always
    names the same store: a store at another precision is not a hit.
    """
    if precision == "auto":
        precision = choose_precision(enc, pooling, device, cache)
    key = StoreKey(enc.fingerprint(pooling, precision), partial.dataset, partial.dataset_fingerprint, partial.field)
    if out is not None:
        return _Target(_reusable_out(as_path(out), key, layers), as_path(out), precision, key)
    return _Target(find_store(key, layers, cache), stores_dir(cache) / key.folder_name(layers), precision, key)


def _reusable_out(path: Path, key: StoreKey, layers: list[str]) -> FeatureStore | None:
    """The finished store at `path` (an explicit --out, or the cache folder once its lock is held)
    when it matches the request; refused when not."""
    if not (path / MANIFEST).exists():
        return None
    store = check_hit(path)  # a damaged store is reopened: the extraction that follows repairs it
    if store is None:
        return None
    diffs = describe_mismatch(key.as_dict(), store.key)
    missing = [lay for lay in layers if lay not in store.layers]
    if diffs or missing:
        raise StoreError(f"{path} holds a store that does not match this request; it will not be reused:\n  "
                         + "\n  ".join(diffs + ([f"layers: store lacks {', '.join(missing)}"] if missing else []))
                         + "\nChoose another --out, or remove it with `anybind cache rm`.")
    return store


def _write_my_shards(enc: Encoder, refs: list, request: dict, target: _Target, device: torch.device,
                     num_workers: int | None, progress: bool, runner=None) -> tuple[int, int]:
    """Extract this rank's missing shards (a resumed run skips finished ones): (rank, shards computed).

    With a Ray `runner` the shards are computed on the cluster and written here as they arrive."""
    rank, world = _rank_world()
    path, num_shards = target.path, request["num_shards"]
    pending = [s for s in range(num_shards) if s % world == rank and not (path / shard_name(s)).exists()]
    if runner is not None:
        runner.plan(len(pending))
    _prepare_folder(path, request)
    done_before = num_shards - len(pending) if world == 1 else None
    if done_before:
        log.info("resuming %s: %d of %d shards already done", path.name, done_before, num_shards)
    if runner is not None:
        runner.run(refs, pending, request, target.precision, lambda shard, tensors, meta: write_shard(
            path / shard_name(shard), tensors, meta), progress)
    else:
        _run_shards(enc, refs, pending, request, path, device, target.precision, request["batch_size"],
                    num_workers, progress)
    return rank, len(pending)


def _finish(target: _Target, request: dict, index, ids: list, subs: list, t0: float,
            computed: int) -> FeatureStore:
    """Rank 0: wait for every shard, merge them into the finished store, report what was skipped."""
    path = target.path
    _wait_for_shards(path, request["num_shards"])
    store = _finalize(path, request, ids, subs, time.perf_counter() - t0, _index_splits(index))
    store.report = {"hit": False, "seconds": time.perf_counter() - t0, "rows": len(store),
                    "skipped": store.manifest["skipped"], "precision": target.precision, "path": str(path),
                    "layers": list(request["layers"]),
                    "shards_computed": computed}  # by this process (or its Ray job); a resumed run: fewer
    if store.manifest["skipped"]:
        reasons = Counter(s["reason"].split(":")[0] for s in store.skipped)
        log.warning("skipped %d of %d items (listed in %s): %s", store.manifest["skipped"], request["num_rows"],
                    path / SKIPPED, ", ".join(f"{r} x{c}" for r, c in reasons.most_common(5)))
    return store


def _index_splits(index) -> dict:
    return dict(zip(index.item_ids, zip(index.column("split"), index.column("fold"), index.column("group"))))


SPLIT_COLUMNS = (("split", pa.string()), ("fold", pa.int8()), ("group", pa.string()))


def _differ(old, new):
    """Per row, whether two columns differ, a null equal only to a null."""
    same = pc.or_(pc.fill_null(pc.equal(old, new), False), pc.and_(pc.is_null(old), pc.is_null(new)))
    return pc.invert(same)


def _index_rows(ids, index_ids):
    """Each store row's position in the index (null: not in it), or None when the store holds the
    index's items in its order (the usual hit: a sequential compare, no hash join of n strings)."""
    if len(ids) == len(index_ids) and ids.type == index_ids.type and ids.equals(index_ids):
        return None
    return pc.index_in(ids, value_set=index_ids)


def sync_splits(store: FeatureStore, index) -> int:
    """Give a store the index's current split, fold and group per row; returns the rows changed.

    A store is found by its field's content, but the split decision belongs to the dataset index:
    when the grouping changes (a caption edit joins two items, better near-duplicate rules), the
    image store found by content must not keep the old folds, or its test items could have twins
    in train. Rewritten atomically; the vectors are not touched.
    """
    rows = store.rows
    at = _index_rows(rows.column("item_id"), index.table.column("item_id"))
    if at is not None and at.null_count:  # not this index's store (cannot happen for a hit by fingerprint)
        return 0
    # in Arrow, not Python tuples: a hit of a 10M-row store held 5.6 GB of them
    table, changed = rows, pa.array(np.zeros(len(rows), dtype=bool))
    for name, kind in SPLIT_COLUMNS:
        new = index.table.column(name)
        old, new = rows.column(name).cast(kind), (new if at is None else new.take(at)).cast(kind)
        changed = pc.or_(changed, _differ(old, new))
        table = table.set_column(table.column_names.index(name), name, new)
    changed = pc.sum(changed).as_py() or 0
    if not changed:
        return 0
    write_with(store.path / ROWS, lambda tmp: pq.write_table(table, tmp))
    store._rows = None
    log.warning("%s: the dataset index regrouped %d of %d rows since extraction; their split, fold and group "
                "were updated from the index (the vectors are unchanged)", store.path.name, changed, len(rows))
    return changed


def _hit(store: FeatureStore, t0: float, index=None, layers: list[str] | None = None) -> FeatureStore:
    log.info("cache hit: %s (%d rows, layers %s)", store.path, len(store), ",".join(store.layers))
    clean_stale_tmp(store.path)  # e.g. from a run killed while it rewrote rows.parquet (sync_splits)
    if index is not None:
        sync_splits(store, index)
    store.report = {"hit": True, "seconds": time.perf_counter() - t0, "rows": len(store),
                    "skipped": store.manifest.get("skipped", 0), "precision": store.key["encoder"]["precision"],
                    "path": str(store.path), "layers": list(layers or store.layers)}  # asked for; a hit may hold more
    return store


def _wait_for_shards(path: Path, num_shards: int, poll: float = 1.0) -> None:
    """Rank 0 waits for the other ranks' shards before merging."""
    waited = 0.0
    while True:
        missing = [s for s in range(num_shards) if not (path / shard_name(s)).exists()]
        if not missing:
            return
        if waited == 0.0:
            log.info("waiting for %d shards from other ranks", len(missing))
        time.sleep(poll)
        waited += poll
        if waited > float(os.environ.get("ANYBIND_SHARD_WAIT", 86400)):
            raise StoreError(f"gave up waiting for shards {missing[:5]}... of {path}; run extract again to finish them")


# ---- the forward pass, shard by shard ----------------------------------------------------------------
class _ShardBuffer:
    """Features of the shard being extracted; written back in row order once the shard is done.

    `sink(shard, tensors, metadata)` receives each finished shard instead of the store folder
    (the Ray engine's actors send it to the driver, which writes it)."""

    def __init__(self, path: Path | None, request: dict, sink=None):
        self.path, self.layers, self.dims = path, request["layers"], request["layer_dims"]
        self.sink = sink or (lambda shard, tensors, meta: write_shard(self.path / shard_name(shard), tensors, meta))
        self.dtype_name, self.st_dtype = request["dtype"], DTYPES[request["dtype"]][1]
        self.shard: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.chunks: dict[str, list] = {lay: [] for lay in self.layers}
        self.rows: list[int] = []
        self.skipped: list = []

    def start(self, shard: int) -> None:
        """Batches arrive shard by shard: a new shard number means the previous one is complete."""
        if self.shard is not None and shard != self.shard:
            self.flush()
        self.shard = shard

    def add(self, positions: list[int], feats: dict[str, torch.Tensor]) -> None:
        """Keep finite rows; an item whose features are NaN/inf, or overflow the stored dtype (fp16
        tops out at 65504), is a reported skip: one bad item must not poison training later."""
        limit = torch.finfo(self.st_dtype).max
        ok = torch.ones(len(positions), dtype=torch.bool)
        for f in feats.values():
            ok &= torch.isfinite(f).all(1) & (f.abs() <= limit).all(1)
        for i in torch.nonzero(~ok).flatten().tolist():
            self.skipped.append((positions[i], f"non-finite features (or beyond {self.dtype_name}: store as fp32)"))
        for lay in self.layers:
            self.chunks[lay].append(feats[lay][ok])
        self.rows.extend(p for p, k in zip(positions, ok.tolist()) if k)

    def flush(self) -> None:
        if self.shard is None:
            return
        order = torch.argsort(torch.tensor(self.rows, dtype=torch.int64))  # back to row order
        tensors = {lay: (torch.cat(self.chunks[lay])[order] if self.chunks[lay]
                         else torch.zeros(0, self.dims[lay])).to(self.st_dtype) for lay in self.layers}
        tensors["_row"] = torch.tensor(self.rows, dtype=torch.int64)[order]
        self.skipped.sort()
        # one metadata key: safetensors writes several keys in a random order, breaking bit-equality
        meta = {"anybind": json.dumps({"format": FORMAT_VERSION, "skipped": self.skipped}, sort_keys=True)}
        self.sink(self.shard, tensors, meta)
        self._reset()


def _loader(enc: Encoder, refs: list, batches: list[list[int]], num_workers: int | None,
            device: torch.device) -> torch.utils.data.DataLoader:
    """Decoding and preprocessing in worker processes, in the fixed batches given."""
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1) if enc.modality != "text" else 0
    ctx = "fork" if num_workers and "fork" in torch.multiprocessing.get_all_start_methods() else None
    return torch.utils.data.DataLoader(
        _Items(enc, refs), batch_sampler=batches, collate_fn=_Collate(enc), num_workers=num_workers,
        multiprocessing_context=ctx, pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None, persistent_workers=False,
    )


def _encode_checked(enc: Encoder, batch, n: int, request: dict, precision: str,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """{layer: float32 [n, d] on the CPU}; a wrong shape is the adapter's bug, said so."""
    layers, dims = request["layers"], request["layer_dims"]
    with autocast(precision, device):
        feats = enc.encode(_to(batch, device), layers, request["key"]["encoder"]["pooling"])
    out = {}
    for lay in layers:
        f = feats[lay].float().cpu()
        if f.shape != (n, dims[lay]):
            raise StoreError(f"{enc.spec} returned shape {tuple(f.shape)} for layer {lay}; expected "
                             f"({n}, {dims[lay]}): the adapter's layer dims are wrong")
        out[lay] = f
    return out


def _run_shards(enc, refs, pending, request, path, device, precision, batch_size, num_workers, progress,
                sink=None) -> None:
    """Extract the `pending` shards into `path` (or `sink`), each as soon as its last batch is done."""
    if not pending:
        return
    shard_size = request["shard_size"]
    by_length = enc.modality if enc.modality in ("text", "audio") else False
    batches = _batches(pending, shard_size, refs, batch_size, by_length=by_length)
    loader = _loader(enc, refs, batches, num_workers, device)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(b) for b in batches), unit="item", desc=f"extract {enc.spec}",
               disable=not progress, smoothing=0.1)
    buffer = _ShardBuffer(path, request, sink)
    with torch.inference_mode():
        for positions, batch, skip in loader:
            buffer.start((positions or [p for p, _ in skip])[0] // shard_size)
            buffer.skipped.extend(skip)
            if batch is not None:
                buffer.add(positions, _encode_checked(enc, batch, len(positions), request, precision, device))
            bar.update(len(positions) + len(skip))
        buffer.flush()
    bar.close()
