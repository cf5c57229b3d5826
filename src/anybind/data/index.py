"""The dataset index: every dataset is listed once into a table, and splits are decided here.

Columns: ``item_id`` (stable string), one column per field (``image``: a reference string that
`anybind.data.images.load_image` opens; ``caption``: a list of strings, several captions per
item), ``label`` (string or null), ``group`` (near-duplicates and collections share a group),
``split`` (train/val/test) and ``fold`` (0-4), both from a stable hash of the group, so
near-duplicates never straddle a split or a fold. Later stages use these; they never re-split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from .._hashing import hash_obj
from ..errors import DataError

SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
NUM_FOLDS = 5
INDEX_VERSION = 1


def _unit_hash(text: str, salt: str) -> float:
    """A stable number in [0, 1) from a string (same on every machine and Python)."""
    digest = hashlib.sha256(f"{salt}|{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(group: str, fractions: dict[str, float] = SPLIT_FRACTIONS) -> str:
    u, acc = _unit_hash(group, "split"), 0.0
    for name, frac in fractions.items():
        acc += frac
        if u < acc:
            return name
    return list(fractions)[-1]


def fold_of(group: str, num_folds: int = NUM_FOLDS) -> int:
    return int(_unit_hash(group, "fold") * num_folds)


def rows_fingerprint(ids: list, subs: list, refs: list) -> str:
    """The hash of a field's rows (what `DatasetIndex.field_fingerprint` returns)."""
    h = hashlib.sha256()
    for i, s, r in zip(ids, subs, refs, strict=True):
        h.update(f"{i}\x1f{s}\x1f{r}\x1e".encode())
    return h.hexdigest()[:16]


@dataclass
class DatasetIndex:
    """A listed dataset: a pyarrow table plus which fields it has and their modalities."""

    name: str
    table: pa.Table
    fields: dict[str, str]  # field column -> modality, e.g. {"image": "image", "caption": "text"}
    root: str | None = None  # where relative image references resolve
    meta: dict = field(default_factory=dict)  # provenance: source paths, options, licence

    @classmethod
    def from_records(
        cls,
        name: str,
        records: Sequence[dict],
        fields: dict[str, str],
        root: str | None = None,
        meta: dict | None = None,
    ) -> DatasetIndex:
        """Build from dicts with item_id, the field columns, optional label and group.

        Missing groups default to the item id; split and fold are filled in from the group.
        """
        if not records:
            raise DataError(f"dataset '{name}' has no items")
        ids = [str(r["item_id"]) for r in records]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"dataset '{name}': item_id '{dup}' appears more than once")
        groups = [str(r.get("group") or r["item_id"]) for r in records]
        cols: dict[str, list] = {"item_id": ids}
        listed = set()  # fields with several values per item: captions, or several recordings of one
        for f, modality in fields.items():
            vals = [r.get(f) for r in records]
            if modality == "text" or any(isinstance(v, (list, tuple)) for v in vals):
                vals = [([v] if isinstance(v, str) else list(v or [])) for v in vals]
                listed.add(f)
            cols[f] = vals
        cols["label"] = [None if r.get("label") is None else str(r["label"]) for r in records]
        cols["group"] = groups
        cols["split"] = [
            r.get("split") or split_of(g) for r, g in zip(records, groups, strict=True)
        ]
        cols["fold"] = [fold_of(g) for g in groups]
        schema = []
        for c in cols:
            if c == "fold":
                schema.append(pa.field(c, pa.int8()))
            elif c in listed:
                schema.append(pa.field(c, pa.list_(pa.string())))
            else:
                schema.append(pa.field(c, pa.string()))
        table = pa.table(cols, schema=pa.schema(schema))
        return cls(name, table, dict(fields), root, dict(meta or {}))

    # ---- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()

    @property
    def item_ids(self) -> list[str]:
        return self.column("item_id")

    def modality(self, field_name: str) -> str:
        if field_name not in self.fields:
            raise DataError(
                f"dataset '{self.name}' has no field '{field_name}': it has {', '.join(self.fields)}"
            )
        return self.fields[field_name]

    def field_rows(self, field_name: str) -> tuple[list[str], list[int], list]:
        """One row per extractable value: (item_ids, sub_index, refs).

        A list-valued field (several captions) gives several rows with the same item id and
        sub_index 0, 1, ...; an item with no value gives one row with ref None (it is skipped
        and reported at extraction, not silently dropped).
        """
        self.modality(field_name)
        ids, subs, refs = [], [], []
        for item_id, value in zip(self.item_ids, self.column(field_name), strict=True):
            values = value if isinstance(value, list) else [value]
            if not values:
                values = [None]
            for j, v in enumerate(values):
                ids.append(item_id)
                subs.append(j)
                refs.append(self.resolve(v) if self.fields[field_name] != "text" else v)
        return ids, subs, refs

    def resolve(self, ref):
        """Relative file references resolve against the index root."""
        if isinstance(ref, str) and self.root and "://" not in ref and not os.path.isabs(ref):
            return str(Path(self.root) / ref)
        return ref

    def take(self, rows, name: str | None = None) -> DatasetIndex:
        """A sub-index of the given row positions; splits and folds stay as they were."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        return DatasetIndex(name or f"{self.name}[{len(rows)}]", self.table.take(rows), dict(self.fields),
                            self.root, {**self.meta, "subset_of": self.name})

    def spread(self, n: int, name: str | None = None) -> DatasetIndex:
        """n items evenly spread over the index (deterministic): a representative small sample."""
        import numpy as np

        rows = np.unique(np.linspace(0, len(self) - 1, num=min(n, len(self))).round().astype(np.int64))
        return self.take(rows, name or f"{self.name}-spread{len(rows)}")

    def split_ids(self, split: str) -> list[str]:
        return [i for i, s in zip(self.item_ids, self.column("split"), strict=True) if s == split]

    def field_fingerprint(self, field_name: str) -> str:
        """Keys a feature store: only this field's content, so editing captions never re-extracts images."""
        return rows_fingerprint(*self.field_rows(field_name))

    @property
    def fingerprint(self) -> str:
        return hash_obj(
            {f: self.field_fingerprint(f) for f in self.fields}
            | {"splits": hash_obj(self.column("group"))}
        )

    def summary(self) -> dict:
        splits: dict[str, int] = {}
        for s in self.column("split"):
            splits[s] = splits.get(s, 0) + 1
        labels = {x for x in self.column("label") if x is not None}
        return {
            "name": self.name,
            "items": len(self),
            "fields": self.fields,
            "splits": splits,
            "groups": len(set(self.column("group"))),
            "labels": len(labels),
        }

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index as Parquet (atomically); fields, root and meta go in the schema metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            b"anybind": json.dumps(
                {
                    "version": INDEX_VERSION,
                    "name": self.name,
                    "fields": self.fields,
                    "root": self.root,
                    "meta": self.meta,
                }
            ).encode()
        }
        table = self.table.replace_schema_metadata(meta)
        return atomic.write_with(path, lambda tmp: pq.write_table(table, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DatasetIndex:
        table = pq.read_table(path)
        info = json.loads((table.schema.metadata or {}).get(b"anybind", b"{}"))
        if info.get("version") != INDEX_VERSION:
            raise DataError(
                f"{path} is not an anybind dataset index (version {info.get('version')})"
            )
        return cls(
            info["name"],
            table.replace_schema_metadata(None),
            info["fields"],
            info.get("root"),
            info.get("meta", {}),
        )
