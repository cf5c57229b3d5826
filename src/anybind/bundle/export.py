"""`anybind export`: a trained run -> a bundle folder anyone can load in one line.

Layout (no pickles; every tensor in safetensors):

    bundle.json          format, anchor, modalities (encoder spec, layers, pooling, compute precision,
                         stored dtype, preprocessing, weights hash, licence), shared dimension
    model/               the run's bound model as training saved and evaluation scored it
                         (projectors, blend, correction: `anybind.align.bound.BoundModel`)
    recipe.yaml          the resolved training recipe
    card.json, card.md   the model card: training data, encoders and their licences, evaluation

Nothing is refitted here: the bundle ships the model the run reported.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .. import atomic
from ..errors import AnybindError
from .model import BUNDLE_FORMAT, MODEL_DIR, is_bundle, load


def export_bundle(run: str | os.PathLike, out: str | os.PathLike, results: list[str | os.PathLike] | None = None,
                  overwrite: bool = False) -> Path:
    """Write the bundle of a finished `anybind train` run (its ``model``) to `out`.

    `results` are results documents (`anybind eval`) whose summaries go into the model card. The
    bundle is built and checked beside `out` and swapped in only then; `overwrite` replaces an
    existing bundle, never a folder anybind did not write.

    >>> export_bundle("runs/default-20261122", "bundles/clipart")  # doctest: +SKIP
    """
    from ..align.bound import BoundModel, is_bound_model
    from ..align.recipe import load_recipe
    from ..features import FeatureStore

    run, out = Path(run), Path(out)
    atomic.check_replaceable(out, overwrite, is_bundle)  # before any work
    if not is_bound_model(run / MODEL_DIR) or not (run / "stores.json").exists():
        raise AnybindError(f"{run} is not a finished training run of this anybind (no model/ or stores.json): "
                           "train one with `anybind train`")
    recipe = load_recipe(run / "recipe.yaml")
    model = BoundModel.load(run / MODEL_DIR)
    stores = {k: FeatureStore.open(v) for k, v in json.loads((run / "stores.json").read_text()).items()}
    info = bundle_info(model, stores, run)
    card = model_card(recipe, stores[model.anchor], results, _training_data(run))
    with atomic.staged_dir(out, replace=overwrite, is_ours=is_bundle) as stage:
        model.save(stage / MODEL_DIR)
        recipe.save(stage / "recipe.yaml")
        atomic.write_json(stage / "bundle.json", info)
        atomic.write_json(stage / "card.json", card)
        atomic.write_text(stage / "card.md", model_card_markdown(card, info, model))
        load(stage)  # refuse to swap in a bundle that does not load
    return out


def bundle_info(model, stores: dict, run: Path) -> dict:
    """bundle.json: how to rebuild each modality's features, and what the model is."""
    from ..evaluate.results import package_versions
    from ..features.encode import store_encoding

    modalities = {}
    for name in model.modalities:
        store = stores[name]
        key = store.key["encoder"]
        modalities[name] = {**store_encoding(store), "layers": model.layers[name],
                            "preprocess": key.get("preprocess"), "weights": key.get("weights"),
                            "licence": _encoder_licence(key["spec"])}
    return {"format": BUNDLE_FORMAT, "anchor": model.anchor, "modalities": modalities, "dim": model.dim,
            "model": MODEL_DIR, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(), "run": str(run)}


def _training_data(run: Path) -> dict:
    summary = run / "summary.json"
    return json.loads(summary.read_text()).get("data", {}) if summary.exists() else {}


def model_card(recipe, anchor_store, results, data_summary: dict) -> dict:
    from ..evaluate.results import read_results, summarise

    docs = [read_results(p) for p in results or []]
    dataset = anchor_store.key["dataset"]
    return {"recipe": recipe.name, "description": recipe.description.strip(),
            "training_data": {"dataset": dataset, "licence": _dataset_licence(dataset), **data_summary},
            "evaluation": [{"model": d["model"]["name"], "protocol": d["protocol"], "summary": summarise(d),
                            "chance": d.get("chance", {})} for d in docs],
            "zeroshot_classes": next((d["data"].get("zeroshot_classes") for d in docs
                                      if d["data"].get("zeroshot_classes")), []),
            "templates": "clipart" if dataset.startswith("openclipart") else "default"}


def model_card_markdown(card: dict, info: dict, model) -> str:
    lines = [f"# anybind bundle: {card['recipe']}", "", card.get("description") or "", "",
             "## Encoders (frozen)", "", "| modality | encoder | layers | licence |", "|---|---|---|---|"]
    for m, e in info["modalities"].items():
        lines.append(f"| {m} | `{e['encoder']}` | {', '.join(e['layers'])} | {e['licence'] or 'see the encoder'} |")
    td = card["training_data"]
    train = td.get("train") or {}
    lines += ["", "## Training data", "",
              f"{td['dataset']} (licence: {td['licence'] or 'unknown'}): {train.get('pairs', '?')} pairs of "
              f"{train.get('items', '?')} items in the train split.", "", _space_line(info, model)]
    for ev in card["evaluation"]:
        lines += ["", f"## Evaluation: {ev['model']}", "", f"{ev['protocol'].get('description', '')}", "",
                  "| metric | mean | sd | runs | chance |", "|---|---|---|---|---|"]
        for k, v in ev["summary"].items():
            ch = ev["chance"].get(k)
            lines.append(f"| {k} | {100 * v['mean']:.1f} | {100 * v['sd']:.1f} | {v['n']} | "
                         + (f"{100 * ch:.1f}" if ch is not None else "") + " |")
    lines += ["", f"Made with anybind {info['versions'].get('anybind')} on {info['created']}.", ""]
    return "\n".join(lines)


def _space_line(info: dict, model) -> str:
    line = f"Shared space: {info['dim']} dimensions"
    if model.blended:
        line += f"; blended with {model.baseline.name} (weight {model.weight})"
    elif model.space is None:
        line += f"; training-free {model.baseline.name}"
    if model.correction is not None:
        line += f"; retrieval correction {model.correction.name}"
    return line + "."


def _encoder_licence(spec: str) -> str | None:
    from ..encoders import list_encoders

    return next((r.get("licence") for r in list_encoders() if r.get("spec") == spec), None) or None


def _dataset_licence(name: str) -> str | None:
    from ..data import list_datasets

    base = name.split("-spread")[0].split("[")[0]
    return next((d.get("licence") for d in list_datasets() if d.get("name") == base), None)
