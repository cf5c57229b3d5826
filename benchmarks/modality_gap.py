"""The modality gap of bound spaces, and what per-modality centring does to a mixed-modality index.

For each bound model (a training run folder, or a model folder with its fold: LABEL=PATH[@FOLD]) and
its fold's test items that have a spoken caption: embed one image, one caption (caption 0) and one
speech clip (rendering 0) per item, then report

  - the modality gap of every pair (Liang et al. 2022: the distance between the centroids of the
    L2-normalised embeddings; `anybind.metrics.gap`),
  - in one mixed index of those rows (images + captions, and images + captions + speech when the
    model binds audio), the share of each query's top-10 (itself left out) from its own modality,
    beside the share expected if modality did not matter (its share of the other rows),
  - cross-modal recall@10 text -> image and audio -> image (ranked as the model ranks),

without and with centring (`BoundModel.centred`: each modality's mean over the fold's *training*
split subtracted before the final normalisation), mean ± sd over the folds. A training-free
reference (procrustes image-text, audio through a procrustes map onto its text side) is fitted per
fold with `--reference`. Results merge into OUT/results.json, so models trained later (joint,
bridged) add their rows by running the script again with their folders:

    python benchmarks/emergent_speech.py --disjoint '' --out runs/emergent-speech     # the default + audio runs
    python benchmarks/modality_gap.py --reference \\
        --model "default + audio (progressive)=runs/emergent-speech/spoken_openclipart/fold0-seed0" ... (one per fold)
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from anybind.align.bound import BoundModel, is_bound_model, run_fold, split_features
from anybind.evaluate.emergent import (
    gallery_rows,
    query_rows,
    score_pairs,
    split_items,
)
from anybind.metrics.gap import expected_own_share, null_gap, own_modality_share, pairwise_gaps

STORES = {"image": ("efficientnet-lite0", "openclipart"), "text": ("minilm-l6", "openclipart"),
          "audio": ("whisper-tiny-en", "openclipart-speech:3000"), "spoken": ("minilm-l6", "openclipart-speech:3000")}
K = 10


def open_stores(overrides: dict[str, str]) -> dict:
    """The evaluation stores (cached extractions), or the folders given with --store MODALITY=PATH."""
    from anybind.data import load_dataset
    from anybind.features import FeatureStore, extract

    out = {}
    for modality, (encoder, data) in STORES.items():
        out[modality] = (FeatureStore.open(overrides[modality]) if modality in overrides
                         else extract(encoder, load_dataset(data), layers="final", progress=False))
    return out


def parse_model(arg: str) -> tuple[str, BoundModel, int | None]:
    """LABEL=PATH[@FOLD]: a run folder (its fold read from its checkpoint) or a bound-model folder."""
    label, _, where = arg.partition("=")
    path, _, fold = where.partition("@")
    path = Path(path)
    folder = path / "model" if is_bound_model(path / "model") else path
    fold = int(fold) if fold else run_fold(path)
    return label, BoundModel.load(folder), fold


def test_items(stores: dict, fold: int | None) -> set[str]:
    """The fold's test items that have a speech clip and were in no training or validation of the audio edge."""
    from anybind.align.data import row_splits

    items = split_items(stores["image"], "test", fold) & set(stores["audio"].item_ids)
    edge = stores["audio"]
    return items - {i for i, s in zip(edge.item_ids, row_splits(edge, fold)) if s in ("train", "val")}


def index_features(model: BoundModel, stores: dict, items: set[str], modalities: list[str]) -> dict:
    """Features of one row per item and modality, in the same item order: the image, caption 0,
    speech clip 0 (at the layers the model reads)."""
    from anybind.align.data import Side

    rows, where = gallery_rows(stores["image"], items)
    picked = {"image": rows}
    for m in modalities[1:]:
        q = query_rows(stores[m], where, 0)
        if sorted(q.gallery_index.tolist()) != list(range(len(rows))):
            raise SystemExit(f"{stores[m].path.name}: not exactly one row 0 per test item")
        picked[m] = q.rows[np.argsort(q.gallery_index)]
    layers = {m: model.layers_of(m) for m in modalities}
    return {m: Side(m, stores[m], layers[m], [stores[m].array(x) for x in layers[m]]).rows(r) for m, r in picked.items()}


def measure(model: BoundModel, stores: dict, items: set[str], feats: dict, train: dict) -> dict:
    """Gaps (test items, with their null; training split), own-modality shares (and their chance)
    of the mixed index of `feats`' modalities, recall@10 to images."""
    emb = {m: model.encode(m, f).numpy() for m, f in feats.items()}
    labels = np.concatenate([[m] * len(z) for m, z in emb.items()])
    queries = {m: (m, stores[m], 0) for m in list(feats)[1:]}
    scores = score_pairs(model, ("image", stores["image"]), queries, items, ks=(K,))
    null = {f"{a}-{b}": null_gap(emb[a], emb[b]) for a, b in combinations(emb, 2)}
    train_gap = pairwise_gaps({m: model.encode(m, train[m]).numpy() for m in feats})
    return {"rows": {m: len(z) for m, z in emb.items()}, "gap": pairwise_gaps(emb), "gap_null": null,
            "gap_train": train_gap, "own_share": own_modality_share(np.concatenate(list(emb.values())), labels, k=K),
            "expected_share": expected_own_share(labels),
            "recall": {f"{m}->image": scores[m][f"{m}_to_image_R@{K}"] for m in queries},
            "chance": {f"{m}->image": scores[m]["chance"][f"{m}_to_image_R@{K}"] for m in queries}}


def records_of(label: str, model: BoundModel, stores: dict, fold: int | None) -> dict[str, dict]:
    """Every index (image + text, and + audio) x centring: none, on the fold's training split (the
    option), on the index's own rows (transductive: removes the test items' offset exactly)."""
    items = test_items(stores, fold)
    modalities = [m for m in ("image", "text", "audio") if m in model.modalities]
    feats = index_features(model, stores, items, modalities)
    train = split_features(model, {m: stores[m] for m in modalities}, fold)
    variants = {"no": model, "training split": model.centred(train), "test items": model.centred(feats)}
    out = {}
    for centring, m in variants.items():
        for n in range(2, len(modalities) + 1):
            key = f"{label}|{'+'.join(modalities[:n])}|{centring}|fold {fold}"
            out[key] = {"model": label, "index": "+".join(modalities[:n]), "centred": centring, "fold": fold,
                        "items": len(items), **measure(m, stores, items, {x: feats[x] for x in modalities[:n]}, train)}
    return out


def reference_model(stores: dict, fold: int | None) -> BoundModel:
    """Training-free: procrustes image-text, audio mapped onto its text side by a procrustes map."""
    from anybind.align.data import PairedFeatures
    from anybind.align.fit import added_map_model, baseline_model

    base = PairedFeatures({"image": stores["image"], "text": stores["text"]}, fold=fold)
    model = baseline_model("procrustes", {}, base, base.pairs("train"))
    edge = PairedFeatures({"text": stores["spoken"], "audio": stores["audio"]}, {"text": model.layers_of("text")},
                          fold=fold, anchor="text")
    return added_map_model("procrustes", {}, model, "audio", edge, edge.pairs("train"))


# ---- mean ± sd over folds, and the table -------------------------------------------------------------
def summarise(results: dict[str, dict]) -> list[dict]:
    """One row per (model, index, centring): every number as (mean, sd) over its folds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results.values():
        groups.setdefault((r["model"], r["index"], r["centred"]), []).append(r)
    rows = []
    for (model, index, centred), runs in groups.items():
        row = {"model": model, "index": index, "centred": centred, "folds": sorted(str(r["fold"]) for r in runs),
               "items": _mean_sd([r["items"] for r in runs])}
        for part in ("gap", "gap_null", "gap_train", "own_share", "expected_share", "recall", "chance"):
            row[part] = {k: _mean_sd([r[part][k] for r in runs]) for k in runs[0][part]}
        rows.append(row)
    return rows


def _mean_sd(values) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _num(v, pct: bool = False) -> str:
    scale = 100 if pct else 1
    return f"{scale * v[0]:.1f} ± {scale * v[1]:.1f}" if pct else f"{v[0]:.3f} ± {v[1]:.3f}"


def format_table(rows: list[dict]) -> str:
    """Markdown: the gaps (training split; test items, with their null), then each mixed index's
    own-modality share of the top-10 (its chance in brackets) and recall@10."""
    pairs = ["image-text", "image-audio", "text-audio"]
    head = ("| model | centring | " + " | ".join(f"gap {p}: train / test (null)" for p in pairs) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    widest = {}
    for r in rows:  # the gaps of every pair a model binds: its largest index
        if len(r["index"]) > len(widest.get((r["model"], r["centred"]), {}).get("index", "")):
            widest[(r["model"], r["centred"])] = r
    for (model, centring), r in widest.items():
        gaps = [f"{r['gap_train'][p][0]:.3f} / {_num(r['gap'][p])} ({r['gap_null'][p][0]:.3f})" if p in r["gap"]
                else "–" for p in pairs]
        lines.append(f"| {model} | {centring} | " + " | ".join(gaps) + " |")
    head = ("| model | index | centring | own-modality share of top-10, % (chance): image / text / audio | "
            "text→image R@10 % | audio→image R@10 % (chance) |")
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        shares = " / ".join(f"{_num(r['own_share'][m], True)} ({100 * r['expected_share'][m][0]:.0f})"
                            for m in r["index"].split("+"))
        recall = [_num(r["recall"][q], True) if q in r["recall"] else "–" for q in ("text->image", "audio->image")]
        chance = r["chance"].get("audio->image") or r["chance"]["text->image"]
        lines.append(f"| {r['model']} | {r['index'].replace('+', ' + ')} | {r['centred']} | {shares} | {recall[0]} | "
                     f"{recall[1]} ({100 * chance[0]:.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="LABEL=RUN_OR_MODEL_FOLDER[@FOLD], repeated")
    p.add_argument("--reference", action="store_true", help="also the training-free procrustes reference, "
                   "fitted on the folds of the given models (or --folds)")
    p.add_argument("--folds", default="", help="folds of the reference when no model is given, e.g. 0,1,2,3,4")
    p.add_argument("--store", action="append", default=[], help="MODALITY=STORE_FOLDER instead of the default")
    p.add_argument("--out", default="benchmarks/results/gap")
    args = p.parse_args(argv)
    t0, out = time.perf_counter(), Path(args.out)
    stores = open_stores(dict(s.split("=", 1) for s in args.store))
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    folds = [int(f) for f in args.folds.split(",") if f]
    for arg in args.model:
        label, model, fold = parse_model(arg)
        results.update(records_of(label, model, stores, fold))
        folds.append(fold)
        print(f"{label} fold {fold}: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.reference:
        for fold in sorted(set(folds), key=str):
            results.update(records_of("procrustes (training-free)", reference_model(stores, fold), stores, fold))
            print(f"reference fold {fold}: {time.perf_counter() - t0:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    table = format_table(summarise(results))
    (out / "table.md").write_text(table + "\n")
    print(table + f"\n\n{time.perf_counter() - t0:.0f} s; results: {path}")


if __name__ == "__main__":
    main()
