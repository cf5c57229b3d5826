"""A FAISS index over a dataset's items, embedded by a bundle: `anybind index` and `anybind search`.

    idx = build_index("bundles/clipart", "openclipart", "indexes/clipart")
    hits = search_index("indexes/clipart", text="a red bird", k=5)
    hits.ids[0], hits.scores[0], hits.paths[0]

The gallery vectors are the bundle's embeddings of the items as its evaluation ranked them: the
features come from the feature cache (`anybind.features.extract`, at the bundle's layers,
pooling and compute precision, stored fp16 like `Bundle.features` rounds), so indexing is
batched, shows a progress bar, skips and reports a corrupt item instead of failing, resumes an
interrupted run shard by shard, and is instant when the features are already cached.

The bundle's retrieval correction ranks gallery item g for query q by ``q . g' - offset_g``; an
inner-product index applies it exactly by augmenting the vectors: ``g'' = [g', -offset_g]`` and
``q'' = [q, 1]``. The offsets were fitted for cross-modal queries (text -> image), so a query of
the gallery's own modality (image -> image) uses ``q'' = [q, 0]``: plain cosine against g'.

On disk (a folder): ``index.faiss``, ``items.parquet`` (row, item_id, sub, ref, path) and
``index.json`` (the bundle's path and the fingerprint of its bundle.json, kind, dims, count,
dataset, search parameters, skipped items). A flat index is exact; IVF-Flat and HNSW are for
collections where exact search is too slow (``kind="auto"``: flat below 50,000 items, HNSW above).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
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

INDEX_FORMAT = "anybind.index/1"
KINDS = ("auto", "flat", "ivf", "hnsw")
#: below this many items `kind="auto"` builds an exact (flat) index
EXACT_BELOW = 50_000
#: rows projected into the shared space at a time while building (bounds the memory)
CHUNK = 16_384
INDEX_FILE, ITEMS_FILE, INFO_FILE = "index.faiss", "items.parquet", "index.json"


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

    def records(self, query: int = 0) -> list[dict]:
        """One query's hits as dicts: rank, item_id, score, path."""
        return [{"rank": r + 1, "item_id": i, "score": s, "path": p} for r, (i, s, p) in
                enumerate(zip(self.ids[query], self.scores[query], self.paths[query], strict=True))]


class VectorIndex:
    """A built index, loaded: `.search(vectors, k)` over the bundle's shared space."""

    def __init__(self, path: Path, info: dict, index, items: dict[str, list]):
        self.path, self.info, self.index = path, info, index
        self.item_ids: list[str] = items["item_id"]
        self.refs: list[str] = items["ref"]
        self.paths: list[str] = items["path"]
        self._row_of = {i: r for r, i in enumerate(self.item_ids)}  # first row of an item
        self._set_params(info.get("params") or {})

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorIndex:
        """Open an index folder written by `build_index` (memory-resident; the items table too)."""
        import pyarrow.parquet as pq

        faiss = _faiss()
        path = Path(path)
        try:
            info = json.loads((path / INFO_FILE).read_text())
        except (OSError, ValueError) as e:
            raise VectorIndexError(f"{path} is not an anybind index ({INFO_FILE} unreadable: {e}); "
                                   "build one with `anybind index --bundle B --data D --out DIR`") from e
        if info.get("format") != INDEX_FORMAT:
            raise VectorIndexError(f"{path}: index format {info.get('format')!r}; this anybind reads {INDEX_FORMAT}: "
                                   "rebuild it with `anybind index`")
        try:
            index = faiss.read_index(str(path / INDEX_FILE))
            items = pq.read_table(path / ITEMS_FILE).to_pydict()
        except (OSError, RuntimeError) as e:
            raise VectorIndexError(f"{path}: cannot read the index files ({e}); rebuild it with `anybind index`") from e
        if index.ntotal != len(items["item_id"]) or index.ntotal != info.get("count"):
            raise VectorIndexError(f"{path}: the index holds {index.ntotal} vectors but lists {len(items['item_id'])} "
                                   "items: it is damaged; rebuild it with `anybind index --overwrite`")
        return cls(path, info, index, items)

    # ---- what it is ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """The bundle's shared dimension (queries have this many values)."""
        return int(self.info["dim"])

    @property
    def kind(self) -> str:
        return str(self.info["kind"])

    @property
    def modality(self) -> str:
        return str(self.info["modality"])

    @property
    def augmented(self) -> bool:
        return bool(self.info.get("augmented"))

    def __repr__(self) -> str:
        return f"VectorIndex({self.path}, {self.kind}, {len(self)} x {self.dim}, {self.info.get('dataset')})"

    def reference(self, item_id: str) -> str | None:
        """The resolved reference (a file path, tar://, idx://) of an indexed item; None if not indexed."""
        row = self._row_of.get(item_id)
        return None if row is None else self.paths[row]

    def _set_params(self, params: dict) -> None:
        faiss = _faiss()
        if "nprobe" in params:
            faiss.extract_index_ivf(self.index).nprobe = int(params["nprobe"])
        if "ef_search" in params:
            faiss.downcast_index(self.index).hnsw.efSearch = int(params["ef_search"])

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
    def search(self, vectors, k: int = 10, corrected: bool = True) -> Hits:
        """The k best items for each query vector (the bundle's L2-normalised embeddings, [n, dim]).

        Scores are ``q . g' - offset_g`` (the bundle's retrieval ranking); ``corrected=False``
        drops the offsets (for queries of the gallery's own modality): plain ``q . g'``.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise VectorIndexError(f"k must be a positive integer, not {k!r}")
        q = vectors.detach().cpu().float().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors, np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise VectorIndexError(f"query vectors must be [n, {self.dim}] (the bundle's dimension), not {list(q.shape)}")
        if self.augmented:
            q = np.hstack([q, np.full((len(q), 1), 1.0 if corrected else 0.0, np.float32)])
        k = min(int(k), len(self))
        if k == 0:
            return Hits([[] for _ in q], [[] for _ in q], [[] for _ in q], [[] for _ in q])
        scores, rows = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        out = Hits([], [], [], [])
        for s_row, r_row in zip(scores, rows, strict=True):
            keep = r_row >= 0  # an approximate index may find fewer than k
            rr = [int(r) for r in r_row[keep]]
            out.rows.append(rr)
            out.ids.append([self.item_ids[r] for r in rr])
            out.paths.append([self.paths[r] for r in rr])
            out.scores.append([float(s) for s in s_row[keep]])
        return out


def search_index(index: str | os.PathLike | VectorIndex, text: str | Sequence[str] | None = None, image: Any = None,
                 k: int = 10, bundle=None) -> Hits:
    """Encode a text (or an image: a path, PIL image or array) with the index's bundle and search.

    `bundle` is a loaded bundle or a bundle path (default: the one the index was built with).
    """
    idx = index if isinstance(index, VectorIndex) else VectorIndex.load(index)
    if (text is None) == (image is None):
        raise VectorIndexError("give a text query or an image query (one of them)")
    if _is_bundle(bundle):  # already loaded
        idx.check_bundle(bundle)
        model = bundle
    else:
        model = idx.open_bundle(bundle)
    if text is not None:
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise VectorIndexError("the text query is empty: give some words to search for")
        q, modality = model.encode_text(texts), "text"
    else:
        q, modality = model.encode_image([image]), "image"
    return idx.search(q, k, corrected=modality != idx.modality)


# ---- building ----------------------------------------------------------------------------------------
def build_index(
    bundle,
    data,
    out: str | os.PathLike,
    *,
    kind: str = "auto",
    modality: str = "image",
    field: str | None = None,
    cache: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> VectorIndex:
    """Embed every `modality` item of dataset `data` with `bundle` and write a FAISS index to `out`.

    `bundle` is a bundle folder or a loaded bundle; `data` any spec `anybind.data.load_dataset`
    takes (``openclipart``, ``karpathy:PATH``, ``table:FILE`` ...) or a `DatasetIndex`. An
    existing `out` built from the same bundle, items and kind is returned as it is; another one
    needs `overwrite` (and is replaced only once the new index is complete).

    >>> build_index("bundles/clipart", "openclipart", "indexes/clipart")  # doctest: +SKIP
    """
    choice("kind", kind, KINDS, error=VectorIndexError)
    model, index, field = _open_inputs(bundle, data, modality, field, cache)
    out = Path(out)
    ids, subs, refs = index.field_rows(field)
    want = {"bundle_fingerprint": bundle_fingerprint(model.path), "modality": modality, "field": field,
            "dataset": index.name, "items_fingerprint": _rows_hash(ids, subs, refs)}
    existing = _existing(out, want, kind, overwrite)
    if existing is not None:
        return existing
    side = model.info["modalities"][modality]
    store = _gallery_store(side, index, field, modality, batch_size=batch_size, num_workers=num_workers,
                           cache=cache, device=device, progress=progress)
    vectors, augmented = _gallery_vectors(model, store, modality, side["layers"])
    faiss_index, params, kind = _make_index(vectors, kind)
    info = {"format": INDEX_FORMAT, **want, "bundle": str(Path(model.path).resolve()), "kind": kind,
            "dim": model.dim, "vector_dim": vectors.shape[1], "augmented": augmented, "metric": "inner_product",
            **_provenance(model, store, index, data), "params": params}
    _write(out, faiss_index, _items(store, index, field, refs), info, overwrite)
    return VectorIndex.load(out)


def _open_inputs(bundle, data, modality: str, field: str | None, cache):
    """(the loaded bundle, the dataset index, the field to index), checked to fit together."""
    from ..bundle import load
    from ..data import load_dataset
    from ..features.extract import default_field

    model = bundle if _is_bundle(bundle) else load(bundle)
    if modality not in model.info["modalities"]:
        raise VectorIndexError(f"this bundle binds {', '.join(model.modalities)}, not '{modality}': "
                               "pass --modality with one of them")
    index = load_dataset(str(data), cache=cache) if isinstance(data, (str, os.PathLike)) else data
    field = field or default_field(index, modality)
    if index.modality(field) != modality:
        raise VectorIndexError(f"field '{field}' of '{index.name}' is {index.modality(field)}, not {modality}")
    return model, index, field


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


def _provenance(model, store, index, data) -> dict:
    """What index.json records beside the vectors: correction, dataset, skipped items, versions."""
    skipped = store.skipped
    info = {"correction": _correction_name(model), "count": len(store),
            "dataset_spec": index.meta.get("spec", str(data) if isinstance(data, (str, os.PathLike)) else None),
            "root": index.root, "skipped": len(skipped), "skipped_items": skipped[:100],
            "store": str(store.path), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
        raise VectorIndexError(f"{out} exists and holds something else (another bundle, dataset or kind): "
                               "choose another --out or pass --overwrite")
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
    """(faiss index holding `vectors`, search parameters, the kind built)."""
    faiss = _faiss()
    n, d = vectors.shape
    if kind == "auto":
        kind = "flat" if n < EXACT_BELOW else "hnsw"
    params: dict = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 200
        params["ef_search"] = index.hnsw.efSearch = 128
    else:  # ivf: about 4 sqrt(n) lists, each trained on >= 39 points
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = vectors[np.sort(rng.choice(n, min(n, 256 * nlist), replace=False))]
        index.train(sample)
        params.update(nlist=nlist, nprobe=max(1, min(nlist, max(8, nlist // 16))))
        index.nprobe = params["nprobe"]
    index.add(vectors)
    return index, params, kind


def _write(out: Path, faiss_index, items: dict, info: dict, overwrite: bool) -> None:
    """Write the three files into a staged folder moved into place whole: never a half-written
    index, and an index being replaced stays until the new one is complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    faiss = _faiss()
    table = pa.table({"row": pa.array(items["row"], pa.int64()), "item_id": pa.array(items["item_id"], pa.string()),
                      "sub": pa.array(items["sub"], pa.int32()), "ref": pa.array(items["ref"], pa.string()),
                      "path": pa.array(items["path"], pa.string())})
    with staged_dir(out, replace=overwrite, is_ours=_is_index_folder) as stage:
        write_with(stage / INDEX_FILE, lambda tmp: faiss.write_index(faiss_index, str(tmp)))
        write_with(stage / ITEMS_FILE, lambda tmp: pq.write_table(table, tmp))
        write_json(stage / INFO_FILE, info)
