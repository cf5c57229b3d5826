"""Emergent alignment: retrieval between modalities that never met in training.

A modality added onto text (spoken captions bound to the text space) is never paired with images,
yet a bound model can rank images for an audio query. This module scores every pair of
modalities a model binds, on one evaluation item set (a dataset's test fold), joining stores of
*different* datasets by item id (a spoken dataset shares openclipart's item ids and groups):

    scores = score_pairs(model, gallery={"image": img_store}, queries={"audio": audio_store,
                         "text": spoken_text_store}, items=test_items)

and folds x seeds runs (`emergent_protocol`) train the base model, add the new modality, and
report each query modality -> image beside the reference (the text that was spoken, as text), a
cascade (speech -> transcript -> text side: `queries["cascade"]`), chance, and the *emergence
ratio*: emergent recall / the same recall with the spoken text as the query.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import AnybindError
from ..features import FeatureStore
from ..metrics.retrieval import chance_retrieval_metrics, retrieval_metrics

KS = (1, 5, 10)
VERSION = 2  # of a results.jsonl record: a record of another version is computed again


@dataclass
class QueryRows:
    """Store rows of one query modality, each with the gallery row of its item."""

    rows: np.ndarray
    gallery_index: np.ndarray  # into the gallery's selected rows


def split_items(store: FeatureStore, split: str, fold: int | None) -> set[str]:
    """Item ids of `split` in the store's dataset: its fixed split, or cross-validation fold `fold`."""
    from ..align.data import row_splits

    return {i for i, s in zip(store.item_ids, row_splits(store, fold)) if s == split}


def gallery_rows(store: FeatureStore, items: set[str]) -> tuple[np.ndarray, dict[str, int]]:
    """The store rows of `items` (one row per item: the first), and item -> position among them."""
    rows, where = [], {}
    for r, item in enumerate(store.item_ids):
        if item in items and item not in where:
            where[item] = len(rows)
            rows.append(r)
    if not rows:
        raise AnybindError(f"{store.path.name} holds none of the {len(items)} evaluation items")
    return np.asarray(rows, dtype=np.int64), where


def query_rows(store: FeatureStore, where: dict[str, int], caption_index: int | None = None,
               gallery: FeatureStore | None = None) -> QueryRows:
    """Rows of a query store whose item is in the gallery (optionally one rendering per item),
    checked to come from the same grouping: a shared item must have the same group on both sides,
    or a cross-dataset join could put a test item's twin in training."""
    ids, sub = store.item_ids, store.caption_index
    keep = [r for r, item in enumerate(ids) if item in where and (caption_index is None or sub[r] == caption_index)]
    if not keep:
        raise AnybindError(f"{store.path.name} shares no item with the evaluation items: was it listed from "
                           "the same items (e.g. openclipart-speech for openclipart)?")
    if gallery is not None:
        _check_same_groups(store, gallery, keep)
    return QueryRows(np.asarray(keep, dtype=np.int64), np.array([where[ids[r]] for r in keep], dtype=np.int64))


def _check_same_groups(query: FeatureStore, gallery: FeatureStore, rows: list[int]) -> None:
    g_of = dict(zip(gallery.item_ids, gallery.rows.column("group").to_pylist()))
    q_ids, q_groups = query.item_ids, query.rows.column("group").to_pylist()
    bad = [q_ids[r] for r in rows if g_of.get(q_ids[r]) != q_groups[r]]
    if bad:
        raise AnybindError(f"{len(bad)} items of {query.path.name} sit in another group than in {gallery.path.name} "
                           f"(e.g. {bad[0]}): the two datasets do not share their grouping, so folds would leak")


def encode_rows(model, modality: str, store: FeatureStore, rows: np.ndarray):
    """The model's shared-space rows of some store rows, at the layers the model reads."""
    from ..align.data import Side

    layers = model.layers_of(modality)
    side = Side(modality, store, layers, [store.array(lay) for lay in layers])
    return model.encode(modality, side.rows(rows))


def score_pairs(model, gallery: tuple[str, FeatureStore], queries: dict[str, tuple[str, FeatureStore, int | None]],
                items: set[str], ks=KS) -> dict[str, dict]:
    """Recall@k of each query set against the gallery, both ways, ranked as the model ranks.

    `gallery` is (modality, store); `queries` maps a label to (modality, store, caption index or
    None for every row). Keys of each result: ``{q}_to_{g}_R@k`` (query -> gallery),
    ``{g}_to_{q}_R@k`` and ``mean_R@k``; plus ``chance`` per label."""
    g_mod, g_store = gallery
    g_rows, where = gallery_rows(g_store, items)
    z_gallery = encode_rows(model, g_mod, g_store, g_rows)
    out = {}
    for label, (q_mod, q_store, sub) in queries.items():
        q = query_rows(q_store, where, sub, g_store)
        z_query = encode_rows(model, q_mod, q_store, q.rows)
        m = retrieval_metrics(**model.ranking_inputs(z_gallery, z_query), text_to_image=q.gallery_index, ks=ks)
        out[label] = _rename(m, label, g_mod)
        out[label]["queries"] = len(q.rows)
        out[label]["gallery"] = len(g_rows)
        out[label]["chance"] = _rename(chance_retrieval_metrics(q.gallery_index, ks=ks), label, g_mod)
    return out


def _rename(metrics: dict, query: str, gallery: str) -> dict:
    """image_to_text / text_to_image -> gallery_to_query / query_to_gallery."""
    return {k.replace("image_to_text", f"{gallery}_to_{query}").replace("text_to_image", f"{query}_to_{gallery}"): v
            for k, v in metrics.items()}


def emergence_ratio(scores: dict, query: str, reference: str, gallery: str = "image", ks=KS) -> dict:
    """Emergent recall / reference recall, per k and direction (query -> gallery and back)."""
    out = {}
    for k in ks:
        for a, b in ((f"{query}_to_{gallery}", f"{reference}_to_{gallery}"),
                     (f"{gallery}_to_{query}", f"{gallery}_to_{reference}")):
            num, den = scores[query].get(f"{a}_R@{k}"), scores[reference].get(f"{b}_R@{k}")
            out[f"{a}_R@{k}"] = num / den if num is not None and den else math.nan
        num, den = scores[query][f"mean_R@{k}"], scores[reference][f"mean_R@{k}"]
        out[f"mean_R@{k}"] = num / den if den else math.nan
    return out


# ---- folds x seeds: train the base, add the new modality, score every pair ------------------------------
@dataclass
class Addition:
    """A modality bound progressively onto the base model's `to` space, from its own edge's stores."""

    modality: str
    stores: dict  # {modality: store, to: store}, e.g. spoken audio and its text
    to: str = "text"


@dataclass
class EmergentSetup:
    """What `emergent_protocol` trains and scores."""

    recipe: object  # the base model's Recipe (image-text, trained per fold and seed)
    base: dict  # {"image": store, "text": store}
    add_recipe: object  # the Recipe of the added modality's projector
    additions: dict  # label -> Addition (e.g. "spoken openclipart", "spoken wordnet")
    queries: dict  # label -> (modality, store, caption index or None), scored against the base's images
    gallery: str = "image"
    reference: str = "spoken"  # the query set the emergence ratio divides by
    emergent: str = "audio"  # the query set the ratio is of
    maps: tuple = ("ridge", "nn-transfer")  # training-free maps into the same space, scored beside
    layers: dict | None = None  # the layers the base reads per modality (default: final)
    anchor: str | None = None  # the base's anchor (default: the store with one row per item)


def emergent_protocol(setup: EmergentSetup, folds, seeds, out, progress: bool = True) -> list[dict]:
    """Every (fold, seed, addition): train (or resume) the base model and the addition, score the
    queries on the fold's test items. Results append to ``out/results.jsonl`` and are reused."""
    import json
    from pathlib import Path

    from .protocol import ResultsLog

    out = Path(out)
    log = ResultsLog(out / "results.jsonl")
    records = []
    for fold in folds:
        for seed in seeds:
            for label, addition in setup.additions.items():
                key = f"v{VERSION}|fold {fold}|seed {seed}|{label}"  # another version's record is redone
                if log.get(key) is None:  # as it reads back from the log: a rerun prints the same
                    record = {**_one_run(setup, fold, seed, label, addition, out, progress), "key": key}
                    log.add(json.loads(json.dumps(record, sort_keys=True)))
                records.append(log.get(key))
    return records


def _one_run(setup: EmergentSetup, fold, seed, label, addition: Addition, out, progress) -> dict:
    from ..align.frozen import AddSpec
    from ..align.trainer import train
    from ..checks import slug

    tag = f"fold{fold}-seed{seed}"
    base = train(_seeded(setup.recipe, seed), setup.base, out=out / "base" / tag, fold=fold, progress=progress,
                 baselines=False, layers=setup.layers, anchor=setup.anchor)
    spec = AddSpec.from_source(base.out, addition.modality, to=addition.to)
    added = train(_seeded(setup.add_recipe, seed), addition.stores, out=out / slug(label) / tag, fold=fold,
                  add=spec, progress=progress, baselines=False)
    gallery_store = setup.base[setup.gallery]
    items = split_items(gallery_store, "test", fold)
    # an item the addition trained on is no test of emergence (its subset may split groups otherwise)
    from ..align.data import row_splits

    edge = addition.stores[addition.to]
    items -= {i for i, s in zip(edge.item_ids, row_splits(edge, fold)) if s in ("train", "val")}
    if setup.emergent in setup.queries:  # one gallery for every query set: the items that have a spoken query
        items &= set(setup.queries[setup.emergent][1].item_ids)
    scores = score_pairs(added.model, (setup.gallery, gallery_store), setup.queries, items)
    ratios = {}
    if setup.emergent in scores and setup.reference in scores:
        ratios[setup.emergent] = emergence_ratio(scores, setup.emergent, setup.reference, setup.gallery)
        if "cascade" in scores:
            ratios["cascade"] = emergence_ratio(scores, "cascade", setup.reference, setup.gallery)
    baselines = _map_baselines(setup, addition, spec.source, fold, items)
    return {"version": VERSION, "fold": fold, "seed": seed, "addition": label, "scores": scores, "ratios": ratios,
            "baselines": baselines,
            "base_val": base.val, "added_val": added.val, "base_run": str(base.out), "added_run": str(added.out)}


def _map_baselines(setup: EmergentSetup, addition: Addition, source, fold, items: set[str]) -> dict:
    """The emergent query set scored through each training-free map (fitted on the addition's train
    pairs of this fold) instead of the trained projector."""
    from ..align.data import PairedFeatures
    from ..align.fit import added_map_model

    if not setup.maps or setup.emergent not in setup.queries:
        return {}
    layers = {addition.to: source.layers_of(addition.to)}
    data = PairedFeatures(addition.stores, layers, fold=fold, anchor=addition.to)
    train_pairs = data.pairs("train")
    query = {setup.emergent: setup.queries[setup.emergent]}
    gallery = (setup.gallery, setup.base[setup.gallery])
    return {name: score_pairs(added_map_model(name, {}, source, addition.modality, data, train_pairs), gallery,
                              query, items)[setup.emergent] for name in setup.maps}


def _seeded(recipe, seed: int):
    import dataclasses

    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, seed=seed))


def summarise(records: list[dict], ks=(1, 10)) -> list[dict]:
    """Mean and sd over folds x seeds: one row per (addition, query set), recall query -> gallery
    and back, its chance, and the emergence ratio where there is one."""
    rows = []
    by_add: dict[str, list[dict]] = {}
    for r in records:
        by_add.setdefault(r["addition"], []).append(r)
    for label, runs in by_add.items():
        # the training-free maps score the emergent query set: their rows keep its metric names
        scored = [{**r["scores"], **{f"map: {m}": v for m, v in r.get("baselines", {}).items()}} for r in runs]
        for query, first in scored[0].items():
            row = {"addition": label, "query": query, "n": len(runs)}
            for key in _metric_keys(first, ks):
                row[key] = _mean_sd([s[query][key] for s in scored])
                row[f"chance {key}"] = _mean_sd([s[query]["chance"][key] for s in scored])
                if query in runs[0]["ratios"]:
                    row[f"ratio {key}"] = _mean_sd([r["ratios"][query][key] for r in runs])
            rows.append(row)
    return rows


def _metric_keys(scores: dict, ks) -> list[str]:
    return [k for k in scores if "_R@" in k and int(k.rsplit("@", 1)[1]) in ks]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


# ---- the built-in speech setup and its table -------------------------------------------------------------
def speech_setup(*, data: str = "openclipart", image: str = "efficientnet-lite0", text: str = "minilm-l6",
                 audio: str = "whisper-tiny-en", speech: str = "openclipart-speech", disjoint: str | None = None,
                 recipe: str = "default", overrides=(), cascade: bool = True, cache=None,
                 progress: bool = True) -> EmergentSetup:
    """Image-text bound on `data`, audio added from `speech` (and from `disjoint`, a spoken dataset
    sharing no item), queries: `speech`'s rendering-0 clips, the spoken text, `data`'s captions and
    (with `cascade`) Whisper's transcripts. Every store is extracted on first use, then cached."""
    from ..align import load_recipe
    from ..data import load_dataset
    from ..features import extract
    from .cascade import transcript_store

    def stores(spec: str, first: str, encoder: str) -> tuple[dict, object]:
        index = load_dataset(spec, cache=cache)
        return {first: extract(encoder, index, layers="final", cache=cache, progress=progress),
                "text": extract(text, index, layers="final", cache=cache, progress=progress)}, index

    base, _ = stores(data, "image", image)
    spoken, speech_index = stores(speech, "audio", audio)
    additions = {f"spoken {speech.split(':')[0].removesuffix('-speech')}": Addition("audio", spoken)}
    if disjoint:
        additions[f"spoken {disjoint.split(':')[0].removesuffix('-speech')}"] = Addition("audio", stores(disjoint, "audio", audio)[0])
    queries = {"audio": ("audio", spoken["audio"], 0), "spoken": ("text", spoken["text"], 0),
               "text": ("text", base["text"], None)}
    if cascade:  # every spoken item; each fold scores its own test items
        items = set(spoken["text"].item_ids)
        queries["cascade"] = ("text", transcript_store(speech_index, items, {"spec": text, "layers": "final"},
                                                       cache=cache, progress=progress), 0)
    return EmergentSetup(recipe=load_recipe(recipe, list(overrides)), base=base,
                         add_recipe=load_recipe(recipe, list(overrides)), additions=additions, queries=queries)


def format_summary(rows: list[dict], gallery: str = "image") -> str:
    """mean +- sd (percent) of query -> gallery R@1 / R@10, gallery -> query R@10, chance and the
    emergence ratio, one line per (addition, query set)."""
    head = (f"{'addition':20s} {'query':18s} {'q->' + gallery + ' R@1':>15s} {'q->' + gallery + ' R@10':>15s} "
            f"{gallery + '->q R@10':>15s} {'chance R@10':>11s} {'ratio R@10':>12s}")
    lines = [head]
    for r in rows:
        q = "audio" if r["query"].startswith("map: ") else r["query"]
        cells = [_pct(r.get(f"{q}_to_{gallery}_R@1")), _pct(r.get(f"{q}_to_{gallery}_R@10")),
                 _pct(r.get(f"{gallery}_to_{q}_R@10"))]
        chance = r.get(f"chance {q}_to_{gallery}_R@10", (math.nan, 0))[0]
        ratio = r.get(f"ratio {q}_to_{gallery}_R@10")
        lines.append(f"{r['addition']:20s} {r['query']:18s} " + " ".join(f"{c:>15s}" for c in cells)
                     + f" {100 * chance:10.1f}%" + (f" {ratio[0]:6.2f} ± {ratio[1]:.2f}" if ratio else ""))
    return "\n".join(lines)


def _pct(value) -> str:
    if value is None:
        return "-"
    mean, sd = value
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"
