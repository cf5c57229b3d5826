"""`anybind export`: a trained run -> a bundle folder anyone can load in one line.

Layout (no pickles; every tensor in safetensors):

    bundle.json          format, modalities (encoder spec, layers, pooling, precision, preprocessing,
                         weights hash, licence), shared dimension, blend and correction settings
    projectors/          the trained projectors (config + safetensors per modality)
    blend/               the fitted training-free space blended in, when the recipe blends
    correction/          the fitted retrieval correction and its bank, when the recipe uses one
    recipe.yaml          the resolved training recipe
    card.json, card.md   the model card: training data, encoders and their licences, evaluation

The blend and the correction are fitted here exactly as the evaluation fits them
(`evaluate.protocol.fit_baseline` / `fit_correction`) on the run's training split, so the
bundle ships what was evaluated.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..errors import AnybindError
from .model import BUNDLE_FORMAT, load


def export_bundle(run: str | os.PathLike, out: str | os.PathLike, results: list[str | os.PathLike] | None = None,
                  overwrite: bool = False) -> Path:
    """Write the bundle of a finished `anybind train` run (its ``best`` model) to `out`.

    `results` are results documents (`anybind eval`) whose summaries go into the model card.

    >>> export_bundle("runs/default-20261122", "bundles/clipart")  # doctest: +SKIP
    """
    from ..align.data import PairedFeatures
    from ..align.model import BoundModel
    from ..align.recipe import load_recipe
    from ..evaluate.protocol import fit_baseline, fit_correction
    from ..evaluate.results import package_versions, read_results, summarise
    from ..evaluate.suite import BlendEmbedder, FoldData
    from ..features import FeatureStore

    run, out = Path(run), Path(out)
    if not (run / "best" / "bound.json").exists() or not (run / "stores.json").exists():
        raise AnybindError(f"{run} is not a finished training run (no best/bound.json or stores.json): "
                           "train one with `anybind train`")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise AnybindError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
        shutil.rmtree(out)
    recipe = load_recipe(run / "recipe.yaml")
    stores = {k: FeatureStore.open(v) for k, v in json.loads((run / "stores.json").read_text()).items()}
    projectors = BoundModel.load(run / "best")
    data = PairedFeatures(stores, projectors.layers)
    fd = FoldData(data, None, {"train": data.pairs("train")})

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    projectors.save(tmp / "projectors")
    space = projectors
    blend = dict(recipe.blend)
    if blend.get("name", "none") != "none":
        opts = {k: v for k, v in blend.items() if k not in ("name", "weight")}
        base = fit_baseline(blend["name"], opts, fd, None, recipe.train.seed)
        base.baseline.save(tmp / "blend")
        blend["weight"] = float(blend.get("weight", 0.5))
        space = BlendEmbedder(projectors, base, blend["weight"])
    correction = fit_correction(recipe.correction, space, fd, recipe.train.seed)
    if correction is not None:
        correction.save(tmp / "correction")
    recipe.save(tmp / "recipe.yaml")

    modalities = {}
    for name, store in stores.items():
        key = store.key["encoder"]
        modalities[name] = {"encoder": key["spec"], "layers": projectors.layers[name], "pooling": key.get("pooling"),
                            "precision": key.get("precision"), "preprocess": key.get("preprocess"),
                            "weights": key.get("weights"), "licence": _encoder_licence(key["spec"])}
    anchor = stores[data.anchor_name]
    probe = [torch.zeros(1, anchor.layers[lay]) for lay in projectors.layers[data.anchor_name]]
    dim = int(space.encode(data.anchor_name, probe).shape[1])
    info = {"format": BUNDLE_FORMAT, "modalities": modalities, "dim": dim, "blend": blend,
            "correction": dict(recipe.correction), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(), "run": str(run)}
    (tmp / "bundle.json").write_text(json.dumps(info, indent=1))

    docs = [read_results(p) for p in results or []]
    dataset = data.sides[data.anchor_name].store.key["dataset"]
    card = {"recipe": recipe.name, "description": recipe.description.strip(),
            "training_data": {"dataset": dataset, "licence": _dataset_licence(dataset), **data.summary()},
            "encoders": {m: {"spec": v["encoder"], "licence": v["licence"], "layers": v["layers"]}
                         for m, v in modalities.items()},
            "evaluation": [{"model": d["model"]["name"], "protocol": d["protocol"], "summary": summarise(d),
                            "chance": d.get("chance", {})} for d in docs],
            "zeroshot_classes": next((d["data"].get("zeroshot_classes") for d in docs if d["data"].get("zeroshot_classes")), []),
            "templates": "clipart" if dataset.startswith("openclipart") else "default"}
    (tmp / "card.json").write_text(json.dumps(card, indent=1))
    (tmp / "card.md").write_text(model_card_markdown(card, info))
    os.replace(tmp, out)
    load(out)  # refuse to leave a bundle that does not load
    return out


def model_card_markdown(card: dict, info: dict) -> str:
    lines = [f"# anybind bundle: {card['recipe']}", "", card.get("description") or "", "",
             "## Encoders (frozen)", "", "| modality | encoder | layers | licence |", "|---|---|---|---|"]
    for m, e in card["encoders"].items():
        lines.append(f"| {m} | `{e['spec']}` | {', '.join(e['layers'])} | {e['licence'] or 'see the encoder'} |")
    td = card["training_data"]
    lines += ["", "## Training data", "",
              f"{td['dataset']} (licence: {td['licence'] or 'unknown'}): {td['train']['pairs']} pairs of "
              f"{td['train']['items']} items in the train split.", "",
              f"Shared space: {info['dim']} dimensions"
              + (f"; blended with {info['blend']['name']} (weight {info['blend']['weight']})" if info["blend"].get("name", "none") != "none" else "")
              + (f"; retrieval correction {info['correction']['name']}" if info["correction"].get("name", "none") != "none" else "")
              + "."]
    for ev in card["evaluation"]:
        lines += ["", f"## Evaluation: {ev['model']}", "", f"{ev['protocol'].get('description', '')}", "",
                  "| metric | mean | sd | runs | chance |", "|---|---|---|---|---|"]
        for k, v in ev["summary"].items():
            ch = ev["chance"].get(k)
            lines.append(f"| {k} | {100 * v['mean']:.1f} | {100 * v['sd']:.1f} | {v['n']} | "
                         + (f"{100 * ch:.1f}" if ch is not None else "") + " |")
    lines += ["", f"Made with anybind {info['versions'].get('anybind')} on {info['created']}.", ""]
    return "\n".join(lines)


def _encoder_licence(spec: str) -> str | None:
    from ..encoders import list_encoders

    return next((r.get("licence") for r in list_encoders() if r.get("spec") == spec), None) or None


def _dataset_licence(name: str) -> str | None:
    from ..data import list_datasets

    base = name.split("-spread")[0].split("[")[0]
    return next((d.get("licence") for d in list_datasets() if d.get("name") == base), None)
