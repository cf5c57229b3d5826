"""The feature store (format v1): one encoder x one dataset x one field, on disk.

A folder holding ``request.json`` (what is being extracted, written first), finished
``shard-NNNNN.safetensors`` files (one [n, d] tensor per layer plus ``_row``, the planned row
of each stored vector), then ``rows.parquet`` (row -> item_id, caption_index, split, fold, group), ``skipped.jsonl``
(item_id, reason) and ``manifest.json``, written last: a store without a manifest is unfinished.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .._hashing import hash_obj
from ..atomic import write_json, write_text, write_with
from ..checks import slug
from ..config import cache_root
from ..data.index import fold_of, split_of
from ..errors import StoreError
from .safetensors_io import DTYPES, canonical_dtype, map_tensor, read_header, write_shard

FORMAT_VERSION = 1
MANIFEST, REQUEST, ROWS, SKIPPED = "manifest.json", "request.json", "rows.parquet", "skipped.jsonl"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def stores_dir(cache: str | os.PathLike | None = None) -> Path:
    return cache_root(cache) / "stores"


def _slug(text: str) -> str:
    """A folder-name part: anybind.checks.slug, trimmed to 60 characters."""
    return slug(text).strip("_")[:60] or "x"


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
        enc = _slug(self.encoder["spec"].replace(":", "_").replace("/", "_"))
        return f"{enc}--{_slug(self.dataset)}--{self.field}--{self.hash[:12]}-{hash_obj(sorted(layers), 6)}"


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
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for p in np.unique(part_of):
            sel = np.nonzero(part_of == p)[0]
            out[sel] = self._convert(self.parts[p][rows[sel] - self.offsets[p]], dtype)
        return out

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
        self.path, self.manifest = Path(path), manifest
        self._headers = None
        self._rows = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        path = Path(path)
        mf = path / MANIFEST
        if not mf.exists():
            if (path / REQUEST).exists():
                raise StoreError(f"{path} is an unfinished store (no manifest): run the same `anybind extract` again to resume it")
            raise StoreError(f"{path} is not a feature store (no {MANIFEST})")
        manifest = json.loads(mf.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise StoreError(f"{path}: store format {manifest.get('format')} is not supported (this anybind reads v{FORMAT_VERSION})")
        return cls(path, manifest)

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
            self._rows = pq.read_table(self.path / ROWS)
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
            self._headers = [(self.path / s["file"], *read_header(self.path / s["file"])) for s in self.manifest["shards"]]
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
    """A finished store under the cache whose key matches and which holds all `layers`."""
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
            return FeatureStore(mf.parent, manifest)
    return None


def list_stores(cache=None) -> list[dict]:
    """Finished and unfinished stores under the cache root, for `anybind cache ls`."""
    out = []
    root = stores_dir(cache)
    for d in sorted(root.iterdir()) if root.exists() else []:
        if not d.is_dir():
            continue
        if (d / MANIFEST).exists():
            try:
                out.append({"status": "done", **FeatureStore.open(d).summary()})
            except StoreError as e:
                out.append({"status": f"broken: {e}", "path": str(d)})
        elif (d / REQUEST).exists():
            req = json.loads((d / REQUEST).read_text())
            done = len(list(d.glob("shard-*.safetensors")))
            out.append({"status": f"partial {done}/{req.get('num_shards', '?')} shards", "path": str(d),
                        "encoder": req["key"]["encoder"]["spec"], "dataset": req["key"]["dataset"],
                        "field": req["key"]["field"], "layers": ",".join(req.get("layers", []))})
    return out


def remove_store(path: str | os.PathLike) -> None:
    path = Path(path)
    if not ((path / MANIFEST).exists() or (path / REQUEST).exists()):
        raise StoreError(f"{path} is not a feature store; refusing to delete it")
    shutil.rmtree(path)


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
) -> FeatureStore:
    """Write features computed elsewhere (or synthetic ones) as a store: bring your own embeddings.

    `arrays` maps layer names to [n, d] arrays aligned with `item_ids`. Splits default to the
    dataset index's rule (a hash of the group, or of the item id when no group is given).
    """
    path = Path(path)
    n = len(item_ids)
    if not arrays or any(a.ndim != 2 or len(a) != n for a in arrays.values()):
        raise StoreError(f"every array must be [n={n}, d]: got " + ", ".join(f"{k} {a.shape}" for k, a in arrays.items()))
    dtype = canonical_dtype(dtype)
    groups = list(groups) if groups is not None else list(item_ids)
    splits = list(splits) if splits is not None else [split_of(g) for g in groups]
    folds = list(folds) if folds is not None else [fold_of(g) for g in groups]
    caption_index = list(caption_index) if caption_index is not None else [0] * n
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(DTYPES[dtype][1]) for k, a in arrays.items()}
    tensors["_row"] = torch.arange(n, dtype=torch.int64)
    write_shard(path / shard_name(0), tensors, {"anybind": json.dumps({"format": FORMAT_VERSION, "skipped": []})})
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
                "shards": [{"file": shard_name(0), "rows": n}], "skipped": 0}
    write_json(path / MANIFEST, manifest)
    return FeatureStore.open(path)
