"""`anybind bridge A B --via text --out C`: two bound models joined through a modality they share.

A and B are bundles (`anybind export`) or bound-model folders (a run's ``model/``). C is A's space
with each of B's other modalities added onto A's `via` through a map fitted on a corpus of `via`
alone (`anybind.align.bridge`). When A and B are bundles C is a bundle too (`anybind.load(C)`,
`anybind serve C`): A's bundle.json entries and model files as they were, plus B's encoder entry
for each added modality; otherwise C is a bound-model folder.

The corpus: a dataset (``corpus="wordnet-speech:2000"``: its `via` field, extracted through each
bundle's own encoder at the layers, pooling, precision and stored dtype that bundle reads, cached
as any store), or two feature stores of the same items (``corpus_stores=(A's, B's)``), which bare
bound-model folders need (they do not say which encoder made their features).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import atomic
from ..errors import AnybindError
from .model import MODEL_DIR, is_bundle, load, read_info


@dataclass
class Bridged:
    """What `bridge` wrote: the folder, whether it is a bundle, and the fit's report."""

    out: Path
    is_bundle: bool
    added: list[str]
    report: dict


def _open(path: str | os.PathLike, which: str):
    """(bound model, bundle.json or None) of a bundle, a bound-model folder or a run folder."""
    from ..align.bound import BoundModel, is_bound_model

    path = Path(path)
    if is_bundle(path):
        return BoundModel.load(path / MODEL_DIR), read_info(path)
    for folder in (path, path / MODEL_DIR):
        if is_bound_model(folder):
            return BoundModel.load(folder), None
    raise AnybindError(f"{which} ({path}) is neither a bundle nor a bound model: give a folder written by "
                       "`anybind export` or a training run's model/")


def _corpus(a, b, via: str, info_a, info_b, corpus: str | None, corpus_stores, cache, progress: bool):
    from ..align.bridge import corpus_from_stores
    from ..features import FeatureStore

    if corpus_stores:
        store_a, store_b = (s if hasattr(s, "item_ids") else FeatureStore.open(s) for s in corpus_stores)
        return corpus_from_stores(store_a, store_b, a, b, via)
    if not corpus:
        raise AnybindError(f"give a corpus of {via} to fit the bridge on: a dataset (--corpus wordnet-speech:2000) "
                           "or two stores of the same items (--corpus-stores A_STORE B_STORE)")
    if info_a is None or info_b is None:
        raise AnybindError("--corpus DATASET needs two bundles (they name their encoders); for bound-model folders "
                           "extract the corpus with each model's encoder and pass --corpus-stores A_STORE B_STORE")
    from ..data import load_dataset
    from ..features import extract

    index = load_dataset(corpus, cache=cache)
    stores = [extract(e["encoder"], index, layers=e["layers"], pooling=e.get("pooling"),
                      precision=e.get("precision") or "auto", dtype=e.get("dtype", "float16"), cache=cache,
                      progress=progress) for e in (info_a["modalities"][via], info_b["modalities"][via])]
    return corpus_from_stores(*stores, a, b, via, name=corpus)


def bridge(a: str | os.PathLike, b: str | os.PathLike, *, out: str | os.PathLike, via: str = "text",
           maps: str | list[str] = "auto", corpus: str | None = None, corpus_stores=None, seed: int = 0,
           overwrite: bool = False, cache=None, progress: bool = True) -> Bridged:
    """Bridge B into A's space through `via`; write C to `out` (a bundle when A and B are bundles).

    >>> bridge("bundles/image-text", "bundles/audio-text", via="text", out="bundles/c",
    ...        corpus="wordnet-speech:2000")  # doctest: +SKIP
    """
    from ..align.bridge import bridge_models, check_bridgeable

    out = Path(out)
    model_a, info_a = _open(a, "A")
    model_b, info_b = _open(b, "B")
    added = check_bridgeable(model_a, model_b, via)  # before any extraction
    as_bundle = info_a is not None and info_b is not None
    atomic.check_replaceable(out, overwrite, is_bundle if as_bundle else _is_model)
    data = _corpus(model_a, model_b, via, info_a, info_b, corpus, corpus_stores, cache, progress)
    model_c, report = bridge_models(model_a, model_b, via, data, maps, seed)
    report = {**report, "a": str(a), "b": str(b)}
    with atomic.staged_dir(out, replace=overwrite, is_ours=is_bundle if as_bundle else _is_model) as stage:
        if as_bundle:
            _write_bundle(stage, Path(a), model_c, info_a, info_b, added, report)
        else:
            model_c.save(stage)
    return Bridged(out, as_bundle, added, report)


def _is_model(path) -> bool:
    from ..align.bound import is_bound_model

    return is_bound_model(path)


def _write_bundle(stage: Path, a: Path, model, info_a: dict, info_b: dict, added: list[str], report: dict) -> None:
    """bundle.json (A's, plus B's encoder per added modality), model/, A's recipe, the card; loaded once."""
    import json

    from .export import model_card_markdown

    model.save(stage / MODEL_DIR)
    info = {**info_a, "modalities": {**info_a["modalities"], **{m: info_b["modalities"][m] for m in added}},
            "added": {**(info_a.get("added") or {}), **{m: {"to": report["via"], "kind": model.added[m].kind}
                                                       for m in added}},
            "bridged": {k: report[k] for k in ("a", "b", "via", "corpus", "chosen")},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    card = json.loads((a / "card.json").read_text()) if (a / "card.json").exists() else {}
    card["added"] = [*(card.get("added") or []), *({"modality": m, "to": report["via"], "bridged_from": report["b"],
                                                    "dataset": f"bridge corpus {report['corpus']['name']}",
                                                    "train": {"pairs": report["corpus"]["rows"]}} for m in added)]
    card["bridge"] = report
    card.setdefault("training_data", {})
    card.setdefault("evaluation", [])
    card.setdefault("recipe", "bridged")
    if (a / "recipe.yaml").exists():
        atomic.write_text(stage / "recipe.yaml", (a / "recipe.yaml").read_text())
    atomic.write_json(stage / "bundle.json", info)
    atomic.write_json(stage / "card.json", card)
    atomic.write_text(stage / "card.md", model_card_markdown(card, info, model))
    load(stage)  # refuse to swap in a bundle that does not load
