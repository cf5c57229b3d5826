"""A FAISS index over a dataset's items, embedded by a bundle: `anybind index` and `anybind search`.

    idx = build_index("bundles/clipart", "openclipart", "indexes/clipart")
    hits = search_index("indexes/clipart", text="a red bird", k=5)
    hits.ids[0], hits.scores[0], hits.paths[0]

    # several modalities in one index; any query against the rows of one of them (or all)
    idx = build_index("bundles/clipart-audio", "openclipart-speech", "indexes/av", modality=["image", "audio"])
    hits = search_index(idx, audio="bird.wav", k=5, modality="image")

The gallery vectors are the bundle's embeddings of the items as its evaluation ranked them: the
features come from the feature cache (`anybind.features.extract`, at the bundle's layers,
pooling and compute precision, stored fp16 like `Bundle.features` rounds), so indexing is
batched, shows a progress bar, skips and reports a corrupt item instead of failing, resumes an
interrupted run shard by shard, and is instant when the features are already cached.

The bundle's retrieval correction ranks gallery item g for query q by ``q . g' - offset_g``; an
inner-product index applies it exactly by augmenting the vectors: ``g'' = [g', -offset_g]`` and
``q'' = [q, 1]``. The offsets were fitted for cross-modal queries (text -> image), so a query
ranked on the gallery's own side (image -> image; audio added onto text -> text) uses
``q'' = [q, 0]``: plain cosine against g'. A query against several modalities is searched in each
(with its own offsets or none) and the hits merged by score.

On disk (a folder): one FAISS file per modality (``index-0.faiss``, ...), ``items.parquet``
(row, item_id, sub, ref, path, modality: the rows of each modality in turn) and ``index.json``
(the bundle's path and the fingerprint of its bundle.json, kind, dims, count, dataset, search
parameters, skipped items, and per modality under ``parts``). Indexes of format 1 (one modality,
``index.faiss``) still load. A flat index is exact; IVF-Flat and HNSW are for collections where
exact search is too slow (``kind="auto"``: flat below 50,000 items, HNSW above). An approximate
index is built to a recall: its search breadth (efSearch, nprobe) is the narrowest that finds 95%
of the true top 10 of 256 of its own rows, and ``params.recall_at_10`` records what it found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as _field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._deps import require
from ..atomic import staged_dir, write_json, write_with
from ..checks import choice
from ..errors import AnybindError

log = logging.getLogger(__name__)

INDEX_FORMAT = "anybind.index/2"  # 2: several modalities, one FAISS file each
LEGACY_FORMAT = "anybind.index/1"  # one modality in index.faiss: still loads
KINDS = ("auto", "flat", "ivf", "hnsw")
#: below this many items `kind="auto"` builds an exact (flat) index
EXACT_BELOW = 50_000
#: rows projected into the shared space at a time while building (bounds the memory)
CHUNK = 16_384
INDEX_FILE, ITEMS_FILE, INFO_FILE = "index.faiss", "items.parquet", "index.json"
#: `modality=` of a search that looks at every modality the index holds
ALL = "all"


class VectorIndexError(AnybindError):
    """An index folder that cannot be built, read, or used with the given bundle."""


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs which CPU build it tried
    return require("faiss", "vector indexes (anybind index / search / serve)", "faiss-cpu", extra="serve")


def bundle_fingerprint(bundle_path: str | os.PathLike) -> str:
    """Hash of the bundle's bundle.json: an index records it, so a re-exported bundle is noticed."""
    try:
        return hashlib.sha256((Path(bundle_path) / "bundle.json").read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise VectorIndexError(f"{bundle_path} is not a bundle (no readable bundle.json): {e}") from e


# ---- searching ---------------------------------------------------------------------------------------
@dataclass
class Hits:
    """Search results: one list per query, best first (fewer than k when the index is smaller)."""

    ids: list[list[str]]
    paths: list[list[str]]
    scores: list[list[float]]
    rows: list[list[int]]
    modalities: list[list[str]] = _field(default_factory=list)  # each hit's modality
    subs: list[list[int]] = _field(default_factory=list)  # each hit's value number in its field (caption, clip)

    def records(self, query: int = 0) -> list[dict]:
        """One query's hits as dicts: rank, item_id, score, path, modality."""
        mods = self.modalities[query] if self.modalities else [None] * len(self.ids[query])
        return [{"rank": r + 1, "item_id": i, "score": s, "path": p, "modality": m} for r, (i, s, p, m) in
                enumerate(zip(self.ids[query], self.scores[query], self.paths[query], mods, strict=True))]


class VectorIndex:
    """A built index, loaded: `.search(vectors, k)` over the bundle's shared space, one FAISS
    index per modality (`parts`), rows numbered over all of them (`item_ids[row]`)."""

    def __init__(self, path: Path, info: dict, parts: dict, items: dict[str, list]):
        self.path, self.info, self.parts = path, info, parts
        self.index = parts[self.modality]  # the first (or only) modality's FAISS index
        self.item_ids: list[str] = items["item_id"]
        self.refs: list[str] = items["ref"]
        self.paths: list[str] = items["path"]
        self.subs: list[int] = [int(x) for x in items["sub"]]
        self.row_modalities: list[str] = items["modality"]
        self.start, row = {}, 0
        for m in self.modalities:  # each modality's rows follow the one before
            self.start[m], row = row, row + int(parts[m].ntotal)
        self._row_of: dict[tuple, int] = {}
        for r, (m, i, sub) in enumerate(zip(self.row_modalities, self.item_ids, self.subs, strict=True)):
            self._row_of.setdefault((m, i), r)  # first row of an item in a modality
            self._row_of.setdefault((m, i, sub), r)
        for m in self.modalities:
            _set_params(parts[m], self.part(m).get("params") or {})

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorIndex:
        """Open an index folder written by `build_index` (memory-resident; the items table too)."""
        import pyarrow.parquet as pq

        faiss = _faiss()
        path = Path(path)
        info = _read_info(path)
        try:
            parts = {m: faiss.read_index(str(path / p["file"])) for m, p in info["parts"].items()}
            items = pq.read_table(path / ITEMS_FILE).to_pydict()
        except (OSError, RuntimeError) as e:
            raise VectorIndexError(f"{path}: cannot read the index files ({e}); rebuild it with `anybind index`") from e
        items.setdefault("modality", [info["modality"]] * len(items["item_id"]))  # format 1: one modality
        total = sum(int(x.ntotal) for x in parts.values())
        if total != len(items["item_id"]) or total != info.get("count") or any(
                int(parts[m].ntotal) != p["count"] for m, p in info["parts"].items()):
            raise VectorIndexError(f"{path}: the index holds {total} vectors but lists {len(items['item_id'])} "
                                   "items: it is damaged; rebuild it with `anybind index --overwrite`")
        return cls(path, info, parts, items)

    # ---- what it is ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        """The bundle's shared dimension (queries have this many values)."""
        return int(self.info["dim"])

    @property
    def kind(self) -> str:
        return str(self.info["kind"])

    @property
    def modality(self) -> str:
        """The first (or only) modality indexed."""
        return str(self.info["modality"])

    @property
    def modalities(self) -> list[str]:
        """Every modality indexed, in the order of their rows."""
        return list(self.info["modalities"])

    def part(self, modality: str) -> dict:
        """index.json's entry of one modality: field, count, kind, vector_dim, augmented, params, file."""
        if modality not in self.info["parts"]:
            raise VectorIndexError(f"this index holds {', '.join(self.modalities)} rows, not '{modality}': "
                                   f"search one of them (or '{ALL}'), or build an index with --modality {modality}")
        return self.info["parts"][modality]

    def count(self, modality: str) -> int:
        return int(self.part(modality)["count"])

    @property
    def augmented(self) -> bool:
        return bool(self.info.get("augmented"))

    def __repr__(self) -> str:
        return (f"VectorIndex({self.path}, {self.kind}, {len(self)} x {self.dim}, {'+'.join(self.modalities)}, "
                f"{self.info.get('dataset')})")

    def reference(self, item_id: str, modality: str | None = None, sub: int | None = None) -> str | None:
        """The resolved reference (a file path, tar://, idx://) of an indexed item (its row of
        `modality`, or of the first modality holding it; its `sub`-th value, or its first); None if
        not indexed."""
        for m in [modality] if modality else self.modalities:
            row = self._row_of.get((m, item_id) if sub is None else (m, item_id, int(sub)))
            if row is not None:
                return self.paths[row]
        return None

    # ---- the bundle it was built with ------------------------------------------------------------
    def open_bundle(self, bundle: str | os.PathLike | None = None, device: str = "cpu"):
        """Load the bundle the index was built with (or `bundle`), refusing one that changed since."""
        from ..bundle import load

        model = load(bundle or self.info["bundle"], device)
        self.check_bundle(model)
        return model

    def check_bundle(self, model) -> None:
        """Refuse a bundle whose bundle.json differs from the one the index was built with."""
        fp = bundle_fingerprint(model.path)
        if fp != self.info.get("bundle_fingerprint"):
            raise VectorIndexError(
                f"{model.path} is not the bundle {self.path} was built with (its bundle.json changed since, or it "
                f"is another bundle): rebuild the index with `anybind index --bundle {model.path} --overwrite ...`")

    # ---- search ----------------------------------------------------------------------------------
    def search(self, vectors, k: int = 10, corrected: bool | dict[str, bool] = True,
               modality: str | None = None) -> Hits:
        """The k best items for each query vector (the bundle's L2-normalised embeddings, [n, dim]).

        Scores are ``q . g' - offset_g`` (the bundle's retrieval ranking); ``corrected=False``
        drops the offsets (for queries of the gallery's own side): plain ``q . g'``; a dict gives
        it per modality. `modality` picks the rows searched: one modality, or all (None, ``"all"``:
        each searched and the hits merged by score).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise VectorIndexError(f"k must be a positive integer, not {k!r}")
        q = vectors.detach().cpu().float().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors, np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise VectorIndexError(f"query vectors must be [n, {self.dim}] (the bundle's dimension), not {list(q.shape)}")
        mods = self.modalities if modality in (None, ALL) else [modality]
        found = [self._search_part(m, q, int(k), corrected if isinstance(corrected, bool) else corrected.get(m, True))
                 for m in mods]
        out = Hits([], [], [], [], [], [])
        for i in range(len(q)):
            hits = sorted((h for part in found for h in part[i]), key=lambda h: -h[0])[: int(k)]  # stable: ties by part
            out.scores.append([s for s, _ in hits])
            out.rows.append([r for _, r in hits])
            out.ids.append([self.item_ids[r] for _, r in hits])
            out.paths.append([self.paths[r] for _, r in hits])
            out.modalities.append([self.row_modalities[r] for _, r in hits])
            out.subs.append([self.subs[r] for _, r in hits])
        return out

    def _search_part(self, modality: str, q: np.ndarray, k: int, corrected: bool) -> list[list[tuple[float, int]]]:
        """Per query, (score, row) of one modality's k best rows."""
        part, index = self.part(modality), self.parts[modality]
        if part.get("augmented"):
            q = np.hstack([q, np.full((len(q), 1), 1.0 if corrected else 0.0, np.float32)])
        k = min(k, int(index.ntotal))
        if k == 0:
            return [[] for _ in q]
        scores, rows = index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        start = self.start[modality]
        return [[(float(s), start + int(r)) for s, r in zip(s_row, r_row, strict=True) if r >= 0]  # approximate: < k
                for s_row, r_row in zip(scores, rows, strict=True)]


def _read_info(path: Path) -> dict:
    """index.json, checked; a format-1 index (one modality) described as format 2 describes it."""
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError) as e:
        raise VectorIndexError(f"{path} is not an anybind index ({INFO_FILE} unreadable: {e}); "
                               "build one with `anybind index --bundle B --data D --out DIR`") from e
    if info.get("format") not in (LEGACY_FORMAT, INDEX_FORMAT):
        raise VectorIndexError(f"{path}: index format {info.get('format')!r}; this anybind reads {INDEX_FORMAT}: "
                               "rebuild it with `anybind index`")
    if info["format"] == LEGACY_FORMAT:
        m = info["modality"]
        info = {**info, "modalities": [m], "parts": {m: {
            "field": info.get("field"), "count": info.get("count"), "kind": info.get("kind"), "file": INDEX_FILE,
            "vector_dim": info.get("vector_dim"), "augmented": info.get("augmented"), "params": info.get("params")}}}
    return info


def _set_params(index, params: dict) -> None:
    faiss = _faiss()
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "ef_search" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])


QUERY_KINDS = ("text", "image", "audio")


def search_index(index: str | os.PathLike | VectorIndex, text: str | Sequence[str] | None = None, image: Any = None,
                 k: int = 10, bundle=None, *, audio: Any = None, modality: str | None = None) -> Hits:
    """Encode a text, an image (a path, PIL image or array) or an audio clip (a path, bytes, an
    (array, rate) pair) with the index's bundle and search the rows of `modality` (default: all).

    `bundle` is a loaded bundle or a bundle path (default: the one the index was built with).
    """
    idx = index if isinstance(index, VectorIndex) else VectorIndex.load(index)
    given = {m: q for m, q in zip(QUERY_KINDS, (text, image, audio), strict=True) if q is not None}
    if len(given) != 1:
        raise VectorIndexError("give one query: a text, an image or an audio clip")
    if modality not in (None, ALL):
        idx.part(modality)  # refuse a modality the index does not hold before encoding anything
    if _is_bundle(bundle):  # already loaded
        idx.check_bundle(bundle)
        model = bundle
    else:
        model = idx.open_bundle(bundle)
    (kind, query), = given.items()
    if kind == "text":
        texts = [query] if isinstance(query, str) else list(query)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise VectorIndexError("the text query is empty: give some words to search for")
        q = model.encode_text(texts)
    else:
        q = model.encode(kind, [query])
    return idx.search(q, k, corrected=corrections(model, kind, idx.modalities), modality=modality)


def corrections(model, query: str, modalities: Sequence[str]) -> dict[str, bool]:
    """Per gallery modality, whether a `query`-modality query ranks with the correction's offsets:
    only across sides (an added modality ranks as the one it was bound into)."""
    side = getattr(model, "side", None) or (lambda m: m)
    return {m: side(query) != side(m) for m in modalities}


# ---- building ----------------------------------------------------------------------------------------
def build_index(
    bundle,
    data,
    out: str | os.PathLike,
    *,
    kind: str = "auto",
    modality: str | Sequence[str] = "image",
    field: str | dict[str, str] | None = None,
    cache: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> VectorIndex:
    """Embed every `modality` item of dataset `data` with `bundle` and write a FAISS index to `out`.

    `bundle` is a bundle folder or a loaded bundle; `data` any spec `anybind.data.load_dataset`
    takes (``openclipart``, ``karpathy:PATH``, ``table:FILE`` ...) or a `DatasetIndex`.
    `modality` may name several modalities (``["image", "audio"]``): one index holds the rows of
    each, tagged with it; `field` is the field to index (one modality) or a dict per modality
    (default: the dataset's field of that modality). An existing `out` built from the same
    bundle, items and kind is returned as it is; another one needs `overwrite` (and is replaced
    only once the new index is complete).

    >>> build_index("bundles/clipart", "openclipart", "indexes/clipart")  # doctest: +SKIP
    """
    choice("kind", kind, KINDS, error=VectorIndexError)
    model, index, fields = _open_inputs(bundle, data, modality, field, cache)
    out = Path(out)
    rows = {m: index.field_rows(f) for m, f in fields.items()}
    first = next(iter(fields))
    want = {"bundle_fingerprint": bundle_fingerprint(model.path), "modality": first, "field": fields[first],
            "modalities": list(fields), "fields": fields, "dataset": index.name,
            "items_fingerprint": _items_hash({m: _rows_hash(*r) for m, r in rows.items()})}
    existing = _existing(out, want, kind, overwrite)
    if existing is not None:
        return existing
    options = {"batch_size": batch_size, "num_workers": num_workers, "cache": cache, "device": device,
               "progress": progress}
    built = {m: _build_part(model, index, m, f, rows[m][2], kind, options, f"index-{n}.faiss")
             for n, (m, f) in enumerate(fields.items())}
    head = built[first]["info"]
    info = {"format": INDEX_FORMAT, **want, "bundle": str(Path(model.path).resolve()), "kind": head["kind"],
            "dim": model.dim, "vector_dim": head["vector_dim"], "augmented": any(b["info"]["augmented"] for b in
                                                                               built.values()),
            "metric": "inner_product", **_provenance(model, {m: b["store"] for m, b in built.items()}, index, data),
            "params": head["params"], "parts": {m: b["info"] for m, b in built.items()}}
    items = {c: [x for b in built.values() for x in b["items"][c]] for c in ("item_id", "sub", "ref", "path", "modality")}
    _write(out, {m: b["faiss"] for m, b in built.items()}, {"row": list(range(len(items["item_id"]))), **items},
           info, overwrite)
    return VectorIndex.load(out)


def _build_part(model, index, modality: str, field: str, refs: list, kind: str, options: dict, file: str) -> dict:
    """One modality's FAISS index, its rows for items.parquet, and its entry in index.json."""
    side = model.info["modalities"][modality]
    store = _gallery_store(side, index, field, modality, **options)
    vectors, augmented = _gallery_vectors(model, store, modality, side["layers"])
    faiss_index, params, kind = _make_index(vectors, kind)
    items = _items(store, index, field, refs)
    items["modality"] = [modality] * len(store)
    info = {"field": field, "count": len(store), "kind": kind, "file": file,
            "vector_dim": int(vectors.shape[1]), "augmented": augmented, "params": params,
            "skipped": len(store.skipped), "store": str(store.path)}
    return {"faiss": faiss_index, "store": store, "items": items, "info": info}


def _open_inputs(bundle, data, modality: str | Sequence[str], field: str | dict | None, cache):
    """(the loaded bundle, the dataset index, {modality: the field to index}), checked to fit together."""
    from ..bundle import load
    from ..data import load_dataset
    from ..features.extract import default_field

    model = bundle if _is_bundle(bundle) else load(bundle)
    modalities = [modality] if isinstance(modality, str) else list(dict.fromkeys(modality))
    if not modalities:
        raise VectorIndexError("name at least one modality to index (--modality image)")
    for m in modalities:
        if m not in model.info["modalities"]:
            raise VectorIndexError(f"this bundle binds {', '.join(model.modalities)}, not '{m}': "
                                   "pass --modality with one of them")
    fields = _fields_given(field, modalities)
    index = load_dataset(str(data), cache=cache) if isinstance(data, (str, os.PathLike)) else data
    fields = {m: fields.get(m) or default_field(index, m) for m in modalities}
    for m, f in fields.items():
        if index.modality(f) != m:
            raise VectorIndexError(f"field '{f}' of '{index.name}' is {index.modality(f)}, not {m}")
    return model, index, fields


def _fields_given(field: str | dict | None, modalities: list[str]) -> dict[str, str]:
    if field is None:
        return {}
    if isinstance(field, dict):
        unknown = [m for m in field if m not in modalities]
        if unknown:
            raise VectorIndexError(f"a field is given for {', '.join(unknown)}, which is not indexed "
                                   f"({', '.join(modalities)})")
        return dict(field)
    if len(modalities) > 1:
        raise VectorIndexError(f"one field for {len(modalities)} modalities: give it per modality "
                               "(--field MODALITY=FIELD)")
    return {modalities[0]: field}


def _items_hash(hashes: dict[str, str]) -> str:
    """One modality: its rows' fingerprint as it is; several: a hash over each modality's."""
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def _gallery_store(side: dict, index, field: str, modality: str, **options):
    """The items' features from the feature cache, at the bundle's layers, pooling and precision."""
    from ..features.extract import extract

    store = extract(side["encoder"], index, field=field, layers=side["layers"], pooling=side.get("pooling"),
                    precision=side.get("precision") or "fp32", dtype=side.get("dtype", "float16"), **options)
    if store is None:
        raise VectorIndexError("anybind index runs in one process: do not start it under torchrun")
    weights = store.key["encoder"].get("weights")
    if side.get("weights") and weights and weights != side["weights"]:
        log.warning("the installed %s (weights %s) is not the one the bundle was trained with (%s): "
                    "its embeddings may not match the evaluation", side["encoder"], weights, side["weights"])
    if len(store) == 0:
        raise VectorIndexError(f"no {modality} item of '{index.name}' could be read ({store.manifest['skipped']} skipped): "
                               f"see {store.path / 'skipped.jsonl'}")
    return store


def _items(store, index, field: str, refs: list) -> dict[str, list]:
    """items.parquet: each vector's item, caption number, the dataset's own reference and the
    resolved path."""
    rows = store.rows.to_pydict()
    raw = index.column(field)
    item_pos = {i: p for p, i in enumerate(index.item_ids)}
    pairs = list(zip(rows["item_id"], rows["caption_index"], strict=True))
    return {"row": list(range(len(pairs))), "item_id": rows["item_id"], "sub": rows["caption_index"],
            "ref": [_raw_ref(raw[item_pos[i]], s) for i, s in pairs],
            "path": [None if refs[r] is None else str(refs[r]) for r in rows["source_row"]]}


def _provenance(model, stores: dict, index, data) -> dict:
    """What index.json records beside the vectors: correction, dataset, skipped items, versions."""
    skipped = [{**row, "modality": m} if len(stores) > 1 else row for m, st in stores.items() for row in st.skipped]
    info = {"correction": _correction_name(model), "count": sum(len(st) for st in stores.values()),
            "dataset_spec": index.meta.get("spec", str(data) if isinstance(data, (str, os.PathLike)) else None),
            "root": index.root, "skipped": len(skipped), "skipped_items": skipped[:100],
            "store": str(next(iter(stores.values())).path),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "faiss": getattr(_faiss(), "__version__", None)}
    if getattr(model.correction, "score_fn", None) is not None:
        info["note"] = (f"correction {info['correction']} ranks by a non-linear key; the index ranks by its "
                        "offsets (cosine - offset), which an inner product can apply")
        log.warning("%s", info["note"])
    return info


def _correction_name(model) -> str:
    """The bundle's retrieval correction by its registered name ("none" without one)."""
    return getattr(model.correction, "name", None) or "none"


def _is_bundle(obj) -> bool:
    """A loaded bundle (anything with the bundle API), not a path to one."""
    return obj is not None and not isinstance(obj, (str, os.PathLike)) and hasattr(obj, "gallery")


def _raw_ref(value, sub: int):
    """The dataset's own reference of one row (a caption list gives its sub-th caption)."""
    if isinstance(value, list):
        value = value[sub] if sub < len(value) else None
    return None if value is None else str(value)


def _rows_hash(ids: list, subs: list, refs: list) -> str:
    from ..data.index import rows_fingerprint

    return rows_fingerprint(ids, subs, [None if r is None else str(r) for r in refs])


def _is_index_folder(path: Path) -> bool:
    return (path / INFO_FILE).exists()


def _existing(out: Path, want: dict, kind: str, overwrite: bool) -> VectorIndex | None:
    """An up-to-date index already at `out`, or None: build one (replacing `out` with `overwrite`)."""
    if not out.exists() or not any(out.iterdir()):
        return None
    if not overwrite and _is_index_folder(out):
        try:
            have = json.loads((out / INFO_FILE).read_text())
        except ValueError:
            have = {}
        if all(have.get(k) == v for k, v in want.items()) and kind in ("auto", have.get("kind")):
            log.info("%s is up to date (same bundle, items and kind)", out)
            return VectorIndex.load(out)
    if not overwrite:
        raise VectorIndexError(f"{out} exists and holds something else (another bundle, dataset, modalities or kind, "
                               "or an index of an older anybind): choose another --out or pass --overwrite")
    if not _is_index_folder(out):  # checked before the work, not after it
        raise VectorIndexError(f"{out} is not an anybind index: refusing to overwrite it "
                               "(remove it yourself, or choose another --out)")
    return None


def _gallery_vectors(model, store, modality: str, layers: list[str]) -> tuple[np.ndarray, bool]:
    """[n, dim] (or [n, dim + 1] with the correction's -offset column) float32 gallery vectors."""
    parts, offsets = [], []
    arrays = [store[lay] for lay in layers]
    with torch.inference_mode():
        for lo in range(0, len(store), CHUNK):
            rows = np.arange(lo, min(lo + CHUNK, len(store)))
            feats = [torch.from_numpy(a.read(rows)).float() for a in arrays]  # fp16 values, as the bundle rounds
            emb = model.project(modality, feats)  # L2-normalised shared-space rows
            g, off = model.gallery(modality, emb)
            parts.append(g.float().cpu().numpy())
            offsets.append(None if off is None else off.float().cpu().numpy())
    vectors = np.concatenate(parts).astype(np.float32)
    if all(o is None for o in offsets):
        return np.ascontiguousarray(vectors), False
    off = np.concatenate([np.zeros(len(p), np.float32) if o is None else o for p, o in zip(parts, offsets, strict=True)])
    return np.ascontiguousarray(np.hstack([vectors, -off[:, None].astype(np.float32)])), True


def _make_index(vectors: np.ndarray, kind: str):
    """(faiss index holding `vectors`, search parameters, the kind built). An approximate index's
    search breadth (HNSW efSearch, IVF nprobe) is the smallest on its ladder whose recall@10, measured
    on a sample of the indexed rows, reaches `TARGET_RECALL`; the params record that recall."""
    faiss = _faiss()
    n, d = vectors.shape
    if kind == "auto":
        kind = "flat" if n < EXACT_BELOW else "hnsw"
    params: dict = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, params, kind
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40  # 200 took 14.1 s at 100k rows (recall@10 1.000), 40 2.9 s (0.994)
        name, ladder = "ef_search", EF_LADDER
    else:  # ivf: about 4 sqrt(n) lists, each trained on >= 39 points
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(vectors[np.sort(rng.choice(n, min(n, 256 * nlist), replace=False))])
        params["nlist"] = nlist
        name, ladder = "nprobe", [p for p in NPROBE_LADDER if p < nlist] + [nlist]
    index.add(vectors)
    params.update(_tuned_breadth(index, vectors, name, ladder))
    return index, params, kind


#: an approximate index searches as broadly as this recall@10 on its own rows needs (or its widest)
TARGET_RECALL = 0.95
EF_LADDER = (64, 128, 256, 512, 1024)
NPROBE_LADDER = (8, 16, 32, 64, 128, 256, 512, 1024)
RECALL_QUERIES = 256


def _tuned_breadth(index, vectors: np.ndarray, name: str, ladder: Sequence[int], k: int = 10) -> dict:
    """{name: the first breadth on `ladder` reaching TARGET_RECALL (else the last), "recall_at_10": its
    recall}: RECALL_QUERIES seeded indexed rows searched approximately and exactly, each row itself
    left out of both answers; a hit counts when it scores as high as the exact k-th (ties between
    duplicate rows are not misses). Exact search of a few queries costs O(n), like adding the rows."""
    faiss = _faiss()
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), min(len(vectors), RECALL_QUERIES), replace=False))
    queries = np.ascontiguousarray(vectors[rows])
    exact = _others(*faiss.knn(queries, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT), rows, k)
    kth = [s[-1] if len(s) else np.inf for s in exact]  # the score a hit must reach
    for breadth in ladder:
        _set_params(index, {name: breadth})
        got = _others(*index.search(queries, k + 1), rows, k)
        hits = [min(k, int(np.sum(g >= t - 1e-6))) if np.isfinite(t) else k for g, t in zip(got, kth, strict=True)]
        recall = float(np.mean(hits)) / k if len(vectors) > k else 1.0
        if recall >= TARGET_RECALL:
            break
    return {name: int(breadth), "recall_at_10": round(recall, 4)}


def _others(scores: np.ndarray, found: np.ndarray, rows: np.ndarray, k: int) -> list[np.ndarray]:
    """Each query's best k scores among hits other than its own row (and faiss's -1 padding)."""
    return [s[(f != row) & (f >= 0)][:k] for s, f, row in zip(scores, found, rows, strict=True)]


def _write(out: Path, parts: dict, items: dict, info: dict, overwrite: bool) -> None:
    """Write the files into a staged folder moved into place whole: never a half-written index,
    and an index being replaced stays until the new one is complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    faiss = _faiss()
    table = pa.table({"row": pa.array(items["row"], pa.int64()), "item_id": pa.array(items["item_id"], pa.string()),
                      "sub": pa.array(items["sub"], pa.int32()), "ref": pa.array(items["ref"], pa.string()),
                      "path": pa.array(items["path"], pa.string()),
                      "modality": pa.array(items["modality"], pa.string())})
    with staged_dir(out, replace=overwrite, is_ours=_is_index_folder) as stage:
        for modality, index in parts.items():
            write_with(stage / info["parts"][modality]["file"], lambda tmp, index=index: faiss.write_index(index, str(tmp)))
        write_with(stage / ITEMS_FILE, lambda tmp: pq.write_table(table, tmp))
        write_json(stage / INFO_FILE, info)
