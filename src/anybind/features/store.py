"""The feature store (format v1): one encoder x one dataset x one field, on disk.

A folder holding ``request.json`` (what is being extracted, written first), finished
``shard-NNNNN.safetensors`` files (one [n, d] tensor per layer plus ``_row``, the planned row
of each stored vector), then ``rows.parquet`` (row -> item_id, caption_index, split, fold, group), ``skipped.jsonl``
(item_id, reason) and ``manifest.json``, written last: a store without a manifest is unfinished.

The manifest records each shard's byte size and sha256. Every open and every cache hit checks
cheaply that the shards are there at those sizes and that rows.parquet has the manifest's row
count; `FeatureStore.verify` (``anybind cache verify``) recomputes the hashes. A hit that fails
the cheap check is turned back into an unfinished store, so extraction recomputes what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .._hashing import hash_obj
from ..atomic import explain, write_json, write_text, write_with
from ..checks import slug
from ..config import cache_location, cache_root
from ..data.index import fold_of, split_of
from ..errors import StoreError
from .safetensors_io import (
    DTYPES,
    RemoteTensor,
    canonical_dtype,
    map_tensor,
    read_header,
    write_shard,
)
from .storage import (
    ObjectPath,
    arrow_source,
    as_path,
    cached_copy,
    is_url,
    open_read,
    read_cache_dir,
    rmtree,
)

FORMAT_VERSION = 1
MANIFEST, REQUEST, ROWS, SKIPPED = "manifest.json", "request.json", "rows.parquet", "skipped.jsonl"

log = logging.getLogger("anybind.store")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def stores_dir(cache: str | os.PathLike | None = None) -> Path | ObjectPath:
    """<cache root>/stores: a local folder, or a prefix on an object store (``s3://...``)."""
    where = cache_location(cache)
    return as_path(where) / "stores" if is_url(where) else cache_root(where) / "stores"


@dataclass(frozen=True)
class StoreKey:
    """What a store holds, apart from its layers: reusing a store needs all of this to match."""

    encoder: dict  # Encoder.fingerprint(): spec, weights hash, preprocessing, pooling, precision
    dataset: str  # dataset name (for people)
    dataset_fingerprint: str  # DatasetIndex.field_fingerprint(field): item ids + field values
    field: str

    def as_dict(self) -> dict:
        """The key as it reads back from JSON (tuples become lists), so comparisons are exact."""
        return json.loads(json.dumps({"encoder": self.encoder, "dataset": self.dataset,
                                      "dataset_fingerprint": self.dataset_fingerprint, "field": self.field}))

    @property
    def hash(self) -> str:
        return hash_obj(self.as_dict())

    def folder_name(self, layers: Iterable[str]) -> str:
        """ENCODER--DATASET--FIELD--KEYHASH-LAYERSHASH: readable parts (anybind.checks.slug, at
        most 60 characters each: a table column may hold any character) and the hashes that
        make the name unique."""
        enc, data, field = (slug(part).strip("_")[:60] or "x" for part in (self.encoder["spec"], self.dataset, self.field))
        return f"{enc}--{data}--{field}--{self.hash[:12]}-{hash_obj(sorted(layers), 6)}"


def describe_mismatch(want: dict, have: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested key dicts."""
    out = []
    for k in sorted(set(want) | set(have)):
        a, b = want.get(k), have.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_mismatch(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: store has {b!r}, request has {a!r}")
    return out


# ---- integrity: what a manifest promises, checked -------------------------------------------------
_MANIFEST_FIELDS = ("key", "modality", "layers", "dtype", "rows", "shards")


def read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """(the manifest, None), or (None, a status saying why it cannot be used: damaged or unsupported)."""
    try:
        manifest = json.loads((as_path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # a truncated or garbled file (UnicodeDecodeError is a ValueError)
        return None, f"damaged: {MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(manifest, dict):
        return None, f"damaged: {MANIFEST} holds {type(manifest).__name__}, not a store manifest"
    if manifest.get("format") != FORMAT_VERSION:
        return None, f"unsupported: store format {manifest.get('format')} (this anybind reads v{FORMAT_VERSION})"
    lacking = [k for k in _MANIFEST_FIELDS if k not in manifest]
    if lacking or not isinstance(manifest["shards"], list):
        return None, f"damaged: {MANIFEST} lacks {', '.join(lacking) or 'a shard list'}"
    return manifest, None


def repair_advice(path: Path) -> str:
    """What to do about a damaged store: re-run its extraction when it has one, else remove it."""
    if (as_path(path) / REQUEST).exists():
        return (f"Run the same `anybind extract` again to repair it (only what is missing is recomputed), "
                f"or remove it with `anybind cache rm {path}`")
    return f"Remove it with `anybind cache rm {path}` and write it again"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_entry(file: Path, rows: int) -> dict:
    """The manifest's record of one finished shard: name, rows, byte size and sha256."""
    file = as_path(file)
    return {"file": file.name, "rows": int(rows), "bytes": file.stat().st_size, "sha256": file_sha256(file)}


def _size_from_header(file: Path) -> int | None:
    """The byte size a shard's own header implies (None when the header is unreadable)."""
    try:
        header, offset = read_header(file)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (StoreError, AttributeError, KeyError, TypeError, IndexError, ValueError):  # garbled, yet JSON
        return None
    return offset + max(ends, default=0)


def _shard_issue(file: Path, entry: dict, full: bool) -> str | None:
    """What is wrong with one shard, or None: missing, the wrong size, or (`full`) other bytes."""
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({explain(e)})"
    want, said = entry.get("bytes"), "the manifest says"
    if want is None:  # written before manifests recorded sizes: its own header says how long it is
        want, said = _size_from_header(file), "its header says"
        if want is None:
            return "has an unreadable header"
    if size != want:
        return f"is {size} bytes, {said} {want}"
    if full and "sha256" in entry and file_sha256(file) != entry["sha256"]:
        return "has other content than the sha256 the manifest records"
    return None


def _rows_issue(path: Path, rows: int) -> str | None:
    if not path.exists():
        return "missing"
    try:
        got = pq.ParquetFile(arrow_source(path)).metadata.num_rows
    except (OSError, ValueError, pa.ArrowException) as e:
        return f"unreadable ({e})"
    return None if got == rows else f"has {got} rows, the manifest says {rows}"


def _bad_shards_by_header(path: Path) -> list[tuple[str, str]]:
    """Shards whose size disagrees with their own header (when the manifest cannot say)."""
    return [(f.name, issue) for f in sorted(path.glob("shard-*.safetensors"))
            for issue in [_shard_issue(f, {}, False)] if issue]


def reopen_for_repair(path: Path, issues: list[tuple[str, str]]) -> None:
    """Turn a damaged finished store back into an unfinished one, so extraction repairs it.

    The manifest (the "finished" mark) goes first, then every damaged shard: the resume path
    recomputes exactly the missing shards, byte-identical to the lost ones, and writes a new
    manifest. Refused for a store that no extraction wrote (no request.json to resume from).
    """
    path = as_path(path)
    what = "; ".join(f"{f} {w}" for f, w in issues)
    try:
        json.loads((path / REQUEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is damaged ({what}) and cannot be recomputed: its {REQUEST} is unreadable "
                         f"({type(e).__name__}). Remove it with `anybind cache rm {path}` and write it again") from e
    log.warning("%s is damaged (%s): not a cache hit; the missing parts are extracted again", path, what)
    (path / MANIFEST).unlink(missing_ok=True)
    for name, _ in issues:
        if name.startswith("shard-"):
            (path / name).unlink(missing_ok=True)


def check_hit(found: FeatureStore | str | os.PathLike) -> FeatureStore | None:
    """A finished store about to be reused, checked cheaply: the store when whole, else None.

    A damaged one (unreadable manifest, a shard missing or of the wrong size, rows.parquet
    missing or short) is reopened for repair (`reopen_for_repair`): the caller then extracts
    into the same folder and the normal resume path recomputes only what is missing.
    """
    if not isinstance(found, FeatureStore):
        path = as_path(found)
        manifest, status = read_manifest(path)
        if status and status.startswith("damaged"):
            reopen_for_repair(path, [(MANIFEST, status.removeprefix("damaged: "))] + _bad_shards_by_header(path))
            return None
        found = FeatureStore.open(path, check=False)  # an unsupported format raises here
    issues = found.issues()
    if issues:
        reopen_for_repair(found.path, issues)
        return None
    return found


_PARTS_POOL: tuple[int, object] | None = None


def _parts_pool():
    """Threads that read remote shards side by side (their own pool: each shard's read uses
    `safetensors_io`'s pool for its ranges, and a pool waiting on itself could stall)."""
    global _PARTS_POOL
    from concurrent.futures import ThreadPoolExecutor

    if _PARTS_POOL is None or _PARTS_POOL[0] != os.getpid():
        _PARTS_POOL = (os.getpid(), ThreadPoolExecutor(8, thread_name_prefix="anybind-s3-shards"))
    return _PARTS_POOL[1]


class LayerArray:
    """One layer of a store as a lazy [rows, dim] array over memory-mapped shards."""

    def __init__(self, parts: list[np.ndarray], dtype: str):
        self.parts, self.stored_dtype = parts, dtype
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), parts[0].shape[1] if parts else 0)

    def __len__(self) -> int:
        return self.shape[0]

    def _convert(self, a: np.ndarray, dtype) -> np.ndarray:
        if self.stored_dtype == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(a)).view(torch.bfloat16)
            return t.float().numpy().astype(dtype, copy=False)
        return np.asarray(a, dtype=dtype)

    def read(self, rows=None, dtype=np.float32) -> np.ndarray:
        """Copy rows (None = all; a slice or an index array) into memory as `dtype`."""
        if rows is None:
            rows = slice(None)
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=dtype)
        picks = self._picks(rows)

        def fetch(pick):
            return self.parts[pick[0]][rows[pick[1]] - self.offsets[pick[0]]]

        # shards on an object store are fetched side by side (a request waits mostly on the network)
        remote = len(picks) > 1 and isinstance(self.parts[0], RemoteTensor)
        for (_, sel), block in zip(picks, _parts_pool().map(fetch, picks) if remote else map(fetch, picks)):
            out[sel] = self._convert(block, dtype)
        return out

    def _picks(self, rows: np.ndarray) -> list[tuple[int, slice | np.ndarray]]:
        """(shard, positions in `rows` of its rows) for each shard read, in shard order: a slice each
        when the rows come sorted, else one sort of the rows by shard. (It was a pass over every row
        per shard: reading a 10M-row store of 1,024-row shards made 10^11 comparisons.)"""
        if not len(rows):
            return []
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        order = None if np.all(part_of[1:] >= part_of[:-1]) else np.argsort(part_of, kind="stable")
        parts = part_of if order is None else part_of[order]
        starts = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1]])
        ends = np.r_[starts[1:], len(parts)]
        return [(int(parts[a]), slice(a, b) if order is None else order[a:b])
                for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, (int, np.integer)):
            return self.read([int(rows)])[0]
        return self.read(rows)

    def __array__(self, dtype=None, copy=None):
        return self.read(dtype=dtype or np.float32)


class FeatureStore:
    """A finished store, opened read-only; vectors are memory-mapped, not loaded.

    >>> store = FeatureStore.open(path)
    >>> store.layers                # {'layer.6': 384, 'final': 384}
    >>> x = store["final"][:1000]   # np.float32 [1000, 384]
    >>> store.item_ids[:3]
    """

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = as_path(path), manifest
        self._headers = None
        self._rows = None

    @classmethod
    def open(cls, path: str | os.PathLike, check: bool = True) -> FeatureStore:
        """Open a finished store; with `check` (the default) a damaged one is refused, named."""
        path = as_path(path)
        manifest, problem = read_manifest(path)
        if problem:
            raise StoreError(f"{path}: {problem}. {repair_advice(path)}")
        store = cls(path, manifest)
        if check:
            store.check()
        return store

    # ---- integrity ---------------------------------------------------------------------------
    def issues(self, full: bool = False) -> list[tuple[str, str]]:
        """(file, what is wrong) pairs; empty when the store is whole.

        The cheap check (every open, every cache hit): each shard present at the byte size the
        manifest records, rows.parquet present with the manifest's row count. `full` also reads
        every shard and compares its sha256 with the manifest's.
        """
        out = [(s["file"], p) for s in self.manifest["shards"]
               for p in [_shard_issue(self.path / s["file"], s, full)] if p]
        listed = sum(int(s["rows"]) for s in self.manifest["shards"])
        if listed != len(self):
            out.append((MANIFEST, f"lists {listed} rows in its shards but says {len(self)}"))
        rows = _rows_issue(self.path / ROWS, len(self))
        return out + ([(ROWS, rows)] if rows else [])

    def problems(self) -> list[str]:
        """What the cheap check finds wrong, one line each ("shard-00003.safetensors missing")."""
        return [f"{f} {what}" for f, what in self.issues()]

    def check(self) -> None:
        """Raise StoreError naming what is damaged and what to do, when the cheap check fails."""
        problems = self.problems()
        if problems:
            raise StoreError(f"{self.path} is damaged ({'; '.join(problems)}). {repair_advice(self.path)}")

    def verify(self) -> list[str]:
        """The full check: the cheap one plus each shard's sha256 against the manifest's."""
        return [f"{f} {what}" for f, what in self.issues(full=True)]

    @property
    def hashed(self) -> bool:
        """Whether the manifest records shard hashes (stores written before it did are size-checked only)."""
        return all("sha256" in s for s in self.manifest["shards"])

    # ---- metadata ----------------------------------------------------------------------------
    @property
    def key(self) -> dict:
        return self.manifest["key"]

    @property
    def layers(self) -> dict[str, int]:
        return dict(self.manifest["layers"])

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    @property
    def field(self) -> str:
        return self.key["field"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    @property
    def rows(self):
        """pyarrow table: row, item_id, caption_index (several captions = several rows)."""
        if self._rows is None:
            self._rows = pq.read_table(arrow_source(self.path / ROWS))
        return self._rows

    @property
    def item_ids(self) -> list[str]:
        return self.rows.column("item_id").to_pylist()

    @property
    def splits(self) -> list[str]:
        """Each row's split (train/val/test) as the dataset index decided it."""
        return self.rows.column("split").to_pylist()

    @property
    def caption_index(self) -> np.ndarray:
        return self.rows.column("caption_index").to_numpy()

    @property
    def skipped(self) -> list[dict]:
        p = self.path / SKIPPED
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    # ---- vectors -----------------------------------------------------------------------------
    def _shard_headers(self):
        if self._headers is None:
            files = [self.path / s["file"] for s in self.manifest["shards"]]
            remote = isinstance(self.path, ObjectPath) and len(files) > 1  # read side by side: latency-bound
            if isinstance(self.path, ObjectPath) and read_cache_dir() is not None:  # copied once, then mapped
                files = list(_parts_pool().map(lambda f: cached_copy(f, read_cache_dir()), files))
                remote = False
            self._headers = [(f, *h) for f, h in zip(files, (_parts_pool().map if remote else map)(read_header, files))]
        return self._headers

    def array(self, layer: str) -> LayerArray:
        if layer not in self.layers:
            raise StoreError(f"store {self.path.name} has no layer '{layer}': it has {', '.join(self.layers)}")
        parts = [map_tensor(p, layer, h, off) for p, h, off in self._shard_headers()]
        return LayerArray(parts, self.dtype)

    def __getitem__(self, layer: str) -> LayerArray:
        return self.array(layer)

    def numpy(self, layer: str, dtype=np.float32) -> np.ndarray:
        return self.array(layer).read(dtype=dtype)

    def summary(self) -> dict:
        return {
            "path": str(self.path), "encoder": self.key["encoder"]["spec"], "dataset": self.key["dataset"],
            "field": self.field, "rows": len(self), "skipped": self.manifest.get("skipped", 0),
            "layers": ",".join(self.layers), "dtype": self.dtype,
            "precision": self.key["encoder"].get("precision"), "pooling": self.key["encoder"].get("pooling"),
            "size_mb": round(sum(f.stat().st_size for f in self.path.iterdir() if f.is_file()) / 2**20, 1),
        }

    def __repr__(self) -> str:
        return f"<FeatureStore {self.path.name}: {len(self)} rows, layers {','.join(self.layers)}>"


# ---- finding and managing stores -------------------------------------------------------------
def find_store(key: StoreKey, layers: Iterable[str], cache=None, any_precision: bool = False) -> FeatureStore | None:
    """A finished store under the cache whose key matches and which holds all `layers`.

    Every match passes the cheap check first (`check_hit`): a damaged one is turned back into an
    unfinished store, so the extraction that follows repairs it, and is not returned.
    """
    root = stores_dir(cache)
    if not root.exists():
        return None
    want, layers = key.as_dict(), set(layers)
    for mf in sorted(root.glob(f"*/{MANIFEST}")):
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError):
            continue
        have = manifest.get("key", {})
        if any_precision:
            have = {**have, "encoder": {**have.get("encoder", {}), "precision": want["encoder"]["precision"]}}
        if have == want and layers <= set(manifest.get("layers", {})):
            store = check_hit(FeatureStore(mf.parent, manifest))  # a damaged store is reopened, not a hit
            if store is not None:
                return store
    return None


def store_folders(cache=None) -> list[Path]:
    """Every folder under the cache's stores root (finished, unfinished or damaged)."""
    root = stores_dir(cache)
    return sorted(d for d in root.iterdir() if d.is_dir()) if root.exists() else []


def list_stores(cache=None) -> list[dict]:
    """Finished, unfinished and damaged stores under the cache root, for `anybind cache ls`.

    Each row's status is "done", "partial i/n shards", "damaged: <what>" (the cheap check) or
    "unsupported: <format>"; reading a damaged store never raises here.
    """
    return [row for d in store_folders(cache) for row in [_store_row(d)] if row is not None]


def _damaged(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"damaged: {problems[0]}{more}"


def _store_row(d: Path) -> dict | None:
    if (d / MANIFEST).exists():
        manifest, status = read_manifest(d)
        if status:
            return {"status": status, "path": str(d)}
        store = FeatureStore(d, manifest)
        problems = store.problems()
        return {"status": _damaged(problems) if problems else "done", **store.summary()}
    if not (d / REQUEST).exists():
        return None
    try:
        req = json.loads((d / REQUEST).read_text(encoding="utf-8"))
        key = req["key"]
        about = {"encoder": key["encoder"]["spec"], "dataset": key["dataset"], "field": key["field"],
                 "layers": ",".join(req.get("layers", []))}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"status": f"damaged: {REQUEST} is unreadable ({type(e).__name__})", "path": str(d)}
    done = len(list(d.glob("shard-*.safetensors")))
    return {"status": f"partial {done}/{req.get('num_shards', '?')} shards", "path": str(d), **about}


def verify_store(path: str | os.PathLike, repair: bool = False) -> str:
    """`anybind cache verify` of one folder: "ok...", "damaged: <what>", "unfinished..." or "unsupported...".

    The full check: shard sizes and sha256s against the manifest, rows.parquet's row count.
    With `repair`, a damaged store is reopened (`reopen_for_repair`) so that running its
    extraction again recomputes the damaged shards.
    """
    path = as_path(path)
    if not (path / MANIFEST).exists():
        if (path / REQUEST).exists():
            return "unfinished: not checked (run the same `anybind extract` again to finish it)"
        raise StoreError(f"{path} is not a feature store (no {MANIFEST})")
    manifest, status = read_manifest(path)
    if status is None:
        store = FeatureStore(path, manifest)
        issues = store.issues(full=True)
        if not issues:
            return "ok" if store.hashed else "ok (sizes checked: this store's manifest records no hashes)"
        status = "damaged: " + "; ".join(f"{f} {w}" for f, w in issues)
    elif status.startswith("damaged"):
        issues = [(MANIFEST, status.removeprefix("damaged: "))] + _bad_shards_by_header(path)
    else:
        return status
    if repair:
        reopen_for_repair(path, issues)
        status += " -> reopened: run the same `anybind extract` again to recompute it"
    return status


def remove_store(path: str | os.PathLike) -> None:
    path = as_path(path)
    if not ((path / MANIFEST).exists() or (path / REQUEST).exists()):
        raise StoreError(f"{path} is not a feature store; refusing to delete it")
    rmtree(path)


def write_store(
    path: str | os.PathLike,
    arrays: dict[str, np.ndarray],
    item_ids: list[str],
    *,
    modality: str,
    field: str,
    dataset: str,
    encoder: str = "external",
    caption_index: list[int] | None = None,
    splits: list[str] | None = None,
    folds: list[int] | None = None,
    groups: list[str] | None = None,
    dtype: str = "float32",
    shard_size: int | None = None,
) -> FeatureStore:
    """Write features computed elsewhere (or synthetic ones) as a store: bring your own embeddings.

    `arrays` maps layer names to [n, d] arrays aligned with `item_ids`. Splits default to the
    dataset index's rule (a hash of the group, or of the item id when no group is given).
    `shard_size` rows per shard (default: one shard).
    """
    path = as_path(path)
    n = len(item_ids)
    if not arrays or any(a.ndim != 2 or len(a) != n for a in arrays.values()):
        raise StoreError(f"every array must be [n={n}, d]: got " + ", ".join(f"{k} {a.shape}" for k, a in arrays.items()))
    dtype = canonical_dtype(dtype)
    groups = list(groups) if groups is not None else list(item_ids)
    splits = list(splits) if splits is not None else [split_of(g) for g in groups]
    folds = list(folds) if folds is not None else [fold_of(g) for g in groups]
    caption_index = list(caption_index) if caption_index is not None else [0] * n
    path.mkdir(parents=True, exist_ok=True)
    shards = _write_given_shards(path, arrays, dtype, shard_size or max(n, 1))
    table = pa.table({
        "row": pa.array(range(n), pa.int64()), "item_id": pa.array(item_ids, pa.string()),
        "caption_index": pa.array(caption_index, pa.int32()), "source_row": pa.array(range(n), pa.int64()),
        "split": pa.array(splits, pa.string()), "fold": pa.array(folds, pa.int8()), "group": pa.array(groups, pa.string()),
    })
    write_with(path / ROWS, lambda tmp: pq.write_table(table, tmp))
    write_text(path / SKIPPED, "")
    key = {"encoder": {"spec": encoder, "modality": modality, "weights": hash_obj(encoder), "preprocess": {},
                       "pooling": "n/a", "precision": "external"},
           "dataset": dataset, "dataset_fingerprint": hash_obj(item_ids), "field": field}
    manifest = {"format": FORMAT_VERSION, "key": key, "modality": modality,
                "layers": {k: int(a.shape[1]) for k, a in arrays.items()}, "dtype": dtype, "rows": n,
                "shards": shards, "skipped": 0}
    write_json(path / MANIFEST, manifest)
    return FeatureStore.open(path)


def _write_given_shards(path, arrays: dict[str, np.ndarray], dtype: str, shard_size: int) -> list[dict]:
    """`write_store`'s shards, `shard_size` rows each; their manifest entries."""
    n = len(next(iter(arrays.values())))
    entries = []
    for i, lo in enumerate(range(0, max(n, 1), shard_size)):
        hi = min(lo + shard_size, n)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(a[lo:hi], dtype=np.float32)).to(DTYPES[dtype][1])
                   for k, a in arrays.items()}
        tensors["_row"] = torch.arange(lo, hi, dtype=torch.int64)
        write_shard(path / shard_name(i), tensors, {"anybind": json.dumps({"format": FORMAT_VERSION, "skipped": []})})
        entries.append(shard_entry(path / shard_name(i), hi - lo))
    return entries
