"""`anybind export`: a trained run -> a bundle folder anyone can load in one line.

Layout (no pickles; every tensor in safetensors):

    bundle.json          format, anchor, modalities (encoder spec, layers, pooling, compute precision,
                         stored dtype, preprocessing, weights hash, licence), shared dimension, which
                         modalities were trained jointly and which were added onto which
    model/               the run's bound model as training saved and evaluation scored it
                         (projectors, blend, correction, added modalities: `anybind.align.bound.BoundModel`)
    recipe.yaml          the resolved training recipe
    card.json, card.md   the model card: training data, encoders and their licences, evaluation

Nothing is refitted here: the bundle ships the model the run reported (with ``centre``, plus the
per-modality means `BoundModel.centred` fits on the run's training split). A run trained with
``--add`` holds only the stores of its own edge (the added modality and its target), so the
encoders of the modalities bound before come from its source (`source.json`): the source run's
``stores.json`` or the source bundle's ``bundle.json``, followed back through sources that were
themselves added runs. The source's model must be the one the run was trained against (its
fingerprint is checked): a retrained source may have changed encoders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import atomic
from ..errors import AnybindError
from .model import BUNDLE_FORMAT, MODEL_DIR, is_bundle, load, read_info


def export_bundle(run: str | os.PathLike, out: str | os.PathLike, results: list[str | os.PathLike] | None = None,
                  overwrite: bool = False, centre: bool = False) -> Path:
    """Write the bundle of a finished `anybind train` run (its ``model``) to `out`.

    `results` are results documents (`anybind eval`) whose summaries go into the model card. The
    bundle is built and checked beside `out` and swapped in only then; `overwrite` replaces an
    existing bundle, never a folder anybind did not write. `centre` centres every modality on its
    mean over the run's training split (`anybind.align.bound.centre_run`: the offset between modality centroids removed).

    >>> export_bundle("runs/default-20261122", "bundles/clipart")  # doctest: +SKIP
    >>> export_bundle("runs/audio-onto-text", "bundles/clipart-audio")  # a `train --add` run  # doctest: +SKIP
    """
    from ..align.bound import BoundModel, centre_run
    from ..align.recipe import load_recipe

    run, out = Path(run), Path(out)
    atomic.check_replaceable(out, overwrite, is_bundle)  # before any work
    _check_run(run)
    recipe = load_recipe(run / "recipe.yaml")
    model = centre_run(run) if centre else BoundModel.load(run / MODEL_DIR)
    lineage = trace(run, model.anchor)
    info = bundle_info(model, lineage, run)
    card = model_card(recipe, lineage, results, joint=info["joint"])
    with atomic.staged_dir(out, replace=overwrite, is_ours=is_bundle) as stage:
        model.save(stage / MODEL_DIR)
        recipe.save(stage / "recipe.yaml")
        atomic.write_json(stage / "bundle.json", info)
        atomic.write_json(stage / "card.json", card)
        atomic.write_text(stage / "card.md", model_card_markdown(card, info, model))
        load(stage)  # refuse to swap in a bundle that does not load
    return out


def _check_run(run: Path) -> None:
    from ..align.bound import is_bound_model

    if not is_bound_model(run / MODEL_DIR) or not (run / "stores.json").exists():
        raise AnybindError(f"{run} is not a finished training run of this anybind (no model/ or stores.json): "
                           "train one with `anybind train`")


# ---- where each modality's encoder and training data come from ---------------------------------------
@dataclass
class Lineage:
    """What a bound model was made of: each modality's encoding (bundle.json's entry without
    layers), the jointly trained data, and each modality added since, in order."""

    encodings: dict[str, dict]
    training: dict  # the joint training: dataset, licence, pairs and items of its splits
    added: list[dict] = field(default_factory=list)  # {modality, to, dataset, licence, train...}
    anchor_dataset: str | None = None
    inherited: dict = field(default_factory=dict)  # a source bundle's zero-shot classes and templates


def trace(run: Path, anchor: str) -> Lineage:
    """The lineage of a training run: its own stores, and for an added run its source's before them
    (`anchor`: the jointly trained modality whose dataset names the training data)."""
    from ..align.frozen import read_source
    from ..features import FeatureStore

    stores = {k: FeatureStore.open(v) for k, v in json.loads((run / "stores.json").read_text()).items()}
    source = read_source(run)
    if source is None:
        first = stores.get(anchor) or next(iter(stores.values()))
        return Lineage({m: store_entry(s) for m, s in stores.items()}, _training(first, run),
                       anchor_dataset=first.key["dataset"])
    modality = source["modality"]
    if modality not in stores:
        raise AnybindError(f"{run}: source.json adds '{modality}' but stores.json has no {modality} store: "
                           "the run folder is damaged; train it again")
    lineage = _trace_source(Path(source["source"]), source, anchor)
    lineage.encodings[modality] = store_entry(stores[modality])
    lineage.added.append({"modality": modality, "to": source["to"], "source": source["source"],
                          **_training(stores[modality], run)})
    return lineage


def _trace_source(path: Path, source: dict, anchor: str) -> Lineage:
    """The lineage of the run or bundle a run was added onto, checked to be the one it trained against."""
    _check_fingerprint(path, source)
    if is_bundle(path):
        info = read_info(path)
        card = json.loads((path / "card.json").read_text()) if (path / "card.json").exists() else {}
        encodings = {m: {k: v for k, v in e.items() if k != "layers"} for m, e in info["modalities"].items()}
        return Lineage(encodings, dict(card.get("training_data") or {}), list(card.get("added") or []),
                       (card.get("training_data") or {}).get("dataset"),
                       {k: card[k] for k in ("zeroshot_classes", "templates") if card.get(k)})
    for run in (path, path.parent):  # a run folder, or its model/ folder
        if (run / "stores.json").exists() and (run / MODEL_DIR).resolve() == Path(source["model"]).resolve():
            return trace(run, anchor)
    raise AnybindError(f"{path} (the source this run was added onto) is a bare bound-model folder: it does not say "
                       "which encoders made its features. Train --add onto the source's run folder or bundle instead")


def _check_fingerprint(path: Path, source: dict) -> None:
    from ..align.frozen import AddSpec

    model = Path(source["model"])
    if not model.is_dir():
        raise AnybindError(f"{model} (the model '{source['modality']}' was added onto) is gone: export needs its "
                           f"encoders; restore {path} or export this run where it still exists")
    now = AddSpec(None, path, model, source["modality"], source["to"]).fingerprint
    if now != source.get("fingerprint"):
        raise AnybindError(f"{path} changed since '{source['modality']}' was added onto it (its model files differ): "
                           "its encoders may not be the ones this run was trained against; train the --add run again")


def store_entry(store) -> dict:
    """A modality's entry in bundle.json (without its layers: the model says those)."""
    from ..features.encode import store_encoding

    key = store.key["encoder"]
    return {**store_encoding(store), "preprocess": key.get("preprocess"), "weights": key.get("weights"),
            "licence": _encoder_licence(key["spec"])}


def bundle_info(model, lineage: Lineage, run: Path) -> dict:
    """bundle.json: how to rebuild each modality's features, and what the model is."""
    from ..evaluate.results import package_versions

    modalities = {}
    for name in model.modalities:
        if name not in lineage.encodings:
            raise AnybindError(f"{run}: nothing says which encoder made the {name} features "
                               f"(found {', '.join(lineage.encodings)}): train the run again")
        entry = dict(lineage.encodings[name])
        modalities[name] = {**{k: entry.pop(k) for k in ("encoder", "pooling", "precision", "dtype")},
                            "layers": model.layers_of(name), **entry}
    added = {m: {"to": a.to, "kind": a.kind} for m, a in model.added.items()}
    centred = {"centred": list(model.centres)} if model.centres else {}  # an index of another bundle.json is refused
    return {"format": BUNDLE_FORMAT, "anchor": model.anchor, "modalities": modalities, "dim": model.dim,
            "joint": list(model.layers), **({"added": added} if added else {}), **centred,
            "model": MODEL_DIR, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(), "run": str(run)}


def _training(store, run: Path) -> dict:
    dataset = store.key["dataset"]
    return {"dataset": dataset, "licence": _dataset_licence(dataset), **_training_data(run)}


def _training_data(run: Path) -> dict:
    summary = run / "summary.json"
    return json.loads(summary.read_text()).get("data", {}) if summary.exists() else {}


def model_card(recipe, lineage: Lineage, results, joint: list[str] | None = None) -> dict:
    from ..evaluate.results import read_results, summarise

    docs = [read_results(p) for p in results or []]
    dataset = lineage.anchor_dataset or lineage.training.get("dataset") or ""
    card = {"recipe": recipe.name, "description": recipe.description.strip(), "training_data": lineage.training,
            "evaluation": [{"model": d["model"]["name"], "protocol": d["protocol"], "summary": summarise(d),
                            "chance": d.get("chance", {})} for d in docs],
            "zeroshot_classes": next((d["data"].get("zeroshot_classes") for d in docs
                                      if d["data"].get("zeroshot_classes")), [])
            or lineage.inherited.get("zeroshot_classes", []),
            "templates": lineage.inherited.get("templates")
            or ("clipart" if dataset.startswith("openclipart") else "default")}
    if joint:
        card["joint"] = list(joint)
    if lineage.added:  # each modality bound since, onto which, on what data
        card["added"] = lineage.added
    return card


def model_card_markdown(card: dict, info: dict, model) -> str:
    lines = [f"# anybind bundle: {card['recipe']}", "", card.get("description") or "", "",
             "## Encoders (frozen)", "", "| modality | encoder | layers | bound | licence |", "|---|---|---|---|---|"]
    added = info.get("added") or {}
    for m, e in info["modalities"].items():
        bound = f"added onto {added[m]['to']}" if m in added else "jointly"
        lines.append(f"| {m} | `{e['encoder']}` | {', '.join(e['layers'])} | {bound} | "
                     f"{e['licence'] or 'see the encoder'} |")
    td = card["training_data"]
    lines += ["", "## Training data", "", f"{' and '.join(info.get('joint') or info['modalities'])} trained jointly "
              f"on {_data_line(td)}"]
    for step in card.get("added") or []:
        lines.append(f"\n{step['modality']} added onto the frozen {step['to']} space, trained on {_data_line(step)}")
    lines += ["", _space_line(info, model)]
    for ev in card["evaluation"]:
        lines += ["", f"## Evaluation: {ev['model']}", "", f"{ev['protocol'].get('description', '')}", "",
                  "| metric | mean | sd | runs | chance |", "|---|---|---|---|---|"]
        for k, v in ev["summary"].items():
            ch = ev["chance"].get(k)
            lines.append(f"| {k} | {100 * v['mean']:.1f} | {100 * v['sd']:.1f} | {v['n']} | "
                         + (f"{100 * ch:.1f}" if ch is not None else "") + " |")
    lines += ["", f"Made with anybind {info['versions'].get('anybind')} on {info['created']}.", ""]
    return "\n".join(lines)


def _data_line(td: dict) -> str:
    train = td.get("train") or {}
    return (f"{td.get('dataset', '?')} (licence: {td.get('licence') or 'unknown'}): {train.get('pairs', '?')} pairs of "
            f"{train.get('items', '?')} items in the train split.")


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
