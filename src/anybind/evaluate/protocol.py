"""The protocol: models over cross-validation folds x seeds, tuned on validation only, resumable.

    spec = ModelSpec("default", recipe="default")
    doc = run_model(spec, suite, folds=range(5), seeds=range(3), out="evals/default")

Every (model settings, fold, seed, split) result is one line of ``log.jsonl`` keyed by a hash of
the settings, so an interrupted evaluation or sweep resumes where it stopped and a finished one
is read back instantly. Trained models live under ``runs/<hash>/`` (the trainer's own
checkpoints make a killed training resume too).

Tuning (`tune`) gives every model the same budget: a few candidate settings, each trained on one
fold's train split and scored on that fold's *validation* split, never on a test fold.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic
from .._hashing import hash_obj
from ..checks import slug
from ..errors import AnybindError
from . import results as res
from .suite import Suite

log = logging.getLogger("anybind.eval")
PROTOCOL_VERSION = 2  # 2: trained runs hold one bound model (blend fitted on the same pairs as its projectors)


@dataclass(frozen=True)
class ModelSpec:
    """One model setting: a recipe (trained) or a training-free baseline, plus a correction."""

    name: str
    recipe: str | None = None  # a built-in recipe name or a YAML path
    overrides: tuple[str, ...] = ()  # --set style recipe overrides
    baseline: str | None = None  # procrustes | cca | asif | nn-transfer
    options: tuple[tuple[str, Any], ...] = ()  # baseline options
    correction: tuple[tuple[str, Any], ...] | None = None  # overrides the recipe's correction

    def __post_init__(self):
        if (self.recipe is None) == (self.baseline is None):
            raise AnybindError(f"model {self.name!r} needs exactly one of a recipe or a baseline")

    @property
    def trained(self) -> bool:
        return self.recipe is not None

    def with_overrides(self, *extra: str, name: str | None = None) -> ModelSpec:
        return replace(self, overrides=self.overrides + tuple(extra), name=name or self.name)

    def with_options(self, name: str | None = None, **opts) -> ModelSpec:
        merged = dict(self.options) | opts
        return replace(self, options=tuple(sorted(merged.items())), name=name or self.name)

    def recipe_obj(self, seed: int | None = None):
        from ..align.recipe import load_recipe

        extra = [f"train.seed={seed}"] if seed is not None else []
        r = load_recipe(self.recipe, list(self.overrides) + extra)
        if self.correction is not None:
            r.correction = dict(self.correction)
        return r

    def training_settings(self) -> dict:
        """What the trained projectors depend on: not the correction (fitted after training); the
        blend counts (validation and early stopping read the blended model)."""
        d = self.settings()
        for k in ("correction", "name"):
            d.pop(k, None)
        if "resolved" in d:
            d["resolved"] = {k: v for k, v in d["resolved"].items() if k not in ("correction", "name", "description")}
            d.pop("overrides")
        return d

    def settings(self) -> dict:
        """What the result depends on (the display name excluded)."""
        d = asdict(self)
        d.pop("name")
        if self.trained:  # the resolved recipe, so editing a recipe file invalidates old results
            d["resolved"] = self.recipe_obj().to_dict()
        return d


def baseline_spec(name: str, **options) -> ModelSpec:
    return ModelSpec(name, baseline=name, options=tuple(sorted(options.items())))


# ---- one (model, fold, seed) ------------------------------------------------------------------------
def fit_model(spec: ModelSpec, suite: Suite, fold: int | None, seed: int, run_dir: Path,
              max_train_pairs: int | None = None, progress: bool = False):
    """The fitted bound model of one fold and seed (correction included), and info."""
    from ..align.fit import baseline_model
    from ..align.trainer import subsample_items, train

    fd = suite.fold_data(fold)
    train_pairs = fd.split_pairs["train"]
    if max_train_pairs is not None:
        train_pairs = subsample_items(train_pairs, max_train_pairs, seed)
    info: dict[str, Any] = {"train_items": int(len(np.unique(train_pairs.item)))}
    if not spec.trained:
        correction = dict(spec.correction) if spec.correction else None
        return baseline_model(spec.baseline, dict(spec.options), fd.data, train_pairs, correction, seed), info
    t0 = time.perf_counter()
    result = train(spec.recipe_obj(seed), suite.stores, out=run_dir, layers=suite.layers, fold=fold,
                   progress=progress, baselines=False, max_train_pairs=max_train_pairs, anchor=suite.anchor)
    info |= {"best_step": result.best_step, "steps": result.steps, "train_seconds": round(time.perf_counter() - t0, 1),
             "metrics_jsonl": str(run_dir / "metrics.jsonl")}
    return result.model, info


# ---- the results log ----------------------------------------------------------------------------------
class ResultsLog:
    """Append-only JSONL of finished (settings, fold, seed, split) results: what makes runs resumable."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._done: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: that run is simply redone
                    continue
                self._done[rec["key"]] = rec

    def get(self, key: str) -> dict | None:
        return self._done.get(key)

    def add(self, rec: dict) -> None:
        atomic.append_json(self.path, rec)
        self._done[rec["key"]] = rec


def result_key(spec: ModelSpec, suite: Suite, fold, seed, split, max_train_pairs, tasks) -> str:
    return hash_obj({"v": PROTOCOL_VERSION, "model": spec.settings(), "suite": suite_identity(suite),
                     "fold": fold, "seed": seed, "split": split, "max_train_pairs": max_train_pairs,
                     "tasks": sorted(tasks)})


def suite_identity(suite: Suite) -> dict:
    ident = {"stores": {k: str(s.path.name) for k, s in suite.stores.items()}, "layers": suite.layers,
             "splits": suite.splits_fingerprint,
             "probe": None if suite.probe is None else [suite.probe.name, len(suite.probe.labels)],
             "classes": suite.class_names, "templates": suite.templates}
    if suite.zeroshot_set is not None:
        ident["zeroshot_set"] = [suite.zeroshot_set.name, len(suite.zeroshot_set.labels)]
    return ident


def evaluate_one(spec: ModelSpec, suite: Suite, fold: int | None, seed: int, out: Path, log_: ResultsLog,
                 split: str = "test", max_train_pairs: int | None = None,
                 tasks: Sequence[str] = ("retrieval", "zeroshot", "probe"), progress: bool = False) -> dict:
    """One result record, from the log when it is there, else fitted and evaluated now."""
    seed_used = seed if (spec.trained or max_train_pairs) else -1  # a baseline does not depend on a seed
    key = result_key(spec, suite, fold, seed_used, split, max_train_pairs, tasks)
    done = log_.get(key)
    if done is not None:
        return done
    t0 = time.perf_counter()
    # the trained model depends on neither the split evaluated nor the tasks: tuning's run is reused
    run_dir = out / "runs" / hash_obj({"v": PROTOCOL_VERSION, "model": spec.training_settings(), "fold": fold,
                                       "seed": seed_used, "max_train_pairs": max_train_pairs,
                                       "suite": suite_identity(suite)["stores"], "layers": suite.layers,
                                       "splits": suite.splits_fingerprint})
    model, info = fit_model(spec, suite, fold, seed_used, run_dir, max_train_pairs, progress)
    metrics, per_class, ev_info = suite.evaluate(model, fold, split, tasks)
    rec = {"key": key, "model": spec.name, "fold": fold, "seed": seed_used, "split": split,
           "max_train_pairs": max_train_pairs, "metrics": metrics, "per_class": per_class,
           "info": info | ev_info | {"seconds": round(time.perf_counter() - t0, 1)}}
    log_.add(rec)
    return rec


def run_model(spec: ModelSpec, suite: Suite, folds: Iterable[int | None], seeds: Iterable[int], out: str | os.PathLike,
              split: str = "test", max_train_pairs: int | None = None,
              tasks: Sequence[str] = ("retrieval", "zeroshot", "probe"), progress: bool = True,
              protocol_note: str = "") -> dict:
    """A results document (schema `results.SCHEMA`) for `spec` over every fold x seed."""
    from tqdm.auto import tqdm

    out = Path(out)
    log_ = ResultsLog(out / "log.jsonl")
    folds, seeds = list(folds), list(seeds)
    if not folds or not seeds:
        raise AnybindError(f"nothing to evaluate: folds {folds}, seeds {seeds}")
    seeds_used = seeds if (spec.trained or max_train_pairs) else [seeds[0]]
    doc = res.new_results(
        model={"name": spec.name, "kind": "trained" if spec.trained else "baseline",
               "recipe": spec.recipe_obj().to_dict() if spec.trained else None,
               "settings": {k: v for k, v in spec.settings().items() if k != "resolved"}},
        data=data_section(suite),
        protocol={"folds": [-1 if f is None else f for f in folds], "seeds": seeds_used, "split": split,
                  "max_train_pairs": max_train_pairs,
                  "description": protocol_note or protocol_description(split, folds)})
    jobs = [(f, s) for f in folds for s in seeds_used]
    bar = tqdm(jobs, desc=f"eval {spec.name}", unit="run", disable=not progress)
    for fold, seed in bar:
        rec = evaluate_one(spec, suite, fold, seed, out, log_, split, max_train_pairs, tasks)
        res.add_run(doc, -1 if fold is None else fold, rec["seed"], rec["metrics"], per_class=rec["per_class"],
                    info=rec["info"])
    bar.close()
    doc["chance"] = _mean_dicts([suite.chance(f, split) for f in folds])
    doc["reference"] = {"majority class": _mean_dicts([suite.majority(f, split) for f in folds])}
    if suite.probe is not None and "probe" in tasks:
        doc["reference"]["frozen encoder (probe)"] = suite.frozen_probe()
    return doc


def tune(candidates: Sequence[ModelSpec], suite: Suite, out: str | os.PathLike, fold: int = 0, seed: int = 0,
         metric: str = "suite/score", tasks: Sequence[str] = ("retrieval", "zeroshot", "probe"),
         progress: bool = True) -> tuple[ModelSpec, list[dict]]:
    """The candidate with the best validation `metric` on one fold (test folds are never read)."""
    from tqdm.auto import tqdm

    log_ = ResultsLog(Path(out) / "log.jsonl")
    scores = []
    for spec in tqdm(candidates, desc="tune", unit="setting", disable=not progress):
        rec = evaluate_one(spec, suite, fold, seed, Path(out), log_, split="val", tasks=tasks)
        if metric not in rec["metrics"]:
            raise AnybindError(f"tuning metric {metric} not measured; measured: {', '.join(rec['metrics'])}")
        scores.append({"model": spec.name, "settings": {k: v for k, v in spec.settings().items() if k != "resolved"},
                       "val": rec["metrics"][metric]})
    best = int(np.argmax([s["val"] for s in scores]))
    return candidates[best], scores


def data_section(suite: Suite) -> dict:
    first = next(iter(suite.stores.values()))
    return {"dataset": first.key["dataset"], "dataset_fingerprint": first.key.get("dataset_fingerprint"),
            "stores": {k: {"spec": s.key["encoder"]["spec"], "layers": suite.layers.get(k) or ["final"], "path": str(s.path)}
                       for k, s in suite.stores.items()},
            "probe": None if suite.probe is None else {"name": suite.probe.name, "rows": int(len(suite.probe.labels)),
                                                       "train": int(suite.probe.is_train.sum())},
            "zeroshot_classes": suite.class_names}


def protocol_description(split: str, folds: Sequence = ()) -> str:
    if list(folds) == [None]:
        return f"the dataset index's fixed split (train / val / test by group hash), scored on {split}"
    return (f"group {('cross-validation folds' if split == 'test' else 'folds, validation split')}: test = one fold, "
            "val = half of the next fold's groups, train = the rest; groups over 2.5% of the items always train")


def _mean_dicts(ds: list[dict]) -> dict:
    keys = set().union(*ds) if ds else set()
    return {k: float(np.mean([d[k] for d in ds if k in d])) for k in sorted(keys)}


@dataclass
class Grid:
    """A tuning grid: the same number of candidate settings for every model."""

    lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    baseline_grids: dict[str, tuple[dict, ...]] = field(default_factory=lambda: {
        "procrustes": ({"dim": 128}, {"dim": 256}, {}),
        "cca": ({"reg": 0.1}, {"reg": 0.3}, {"reg": 1.0}),
        "asif": ({"k": 200}, {"k": 800}, {"k": 1600}),
        "nn-transfer": ({"k": 5}, {"k": 10}, {"k": 20}),
    })

    def candidates(self, spec: ModelSpec) -> list[ModelSpec]:
        if spec.trained:
            lr = spec.recipe_obj().optimizer.lr
            return [spec.with_overrides(f"optimizer.lr={lr * f:.3g}", name=spec.name) for f in self.lr_factors]
        grid = self.baseline_grids.get(spec.baseline, ({},))
        return [spec.with_options(**g) for g in grid]


# ---- whole comparisons and sweeps -----------------------------------------------------------------------
def compare_models(specs: Sequence[ModelSpec], suite: Suite, out: str | os.PathLike, folds: Sequence[int] = range(5),
                   seeds: Sequence[int] = range(3), grid: Grid | None = None, tune_fold: int = 0,
                   tasks: Sequence[str] = ("retrieval", "zeroshot", "probe"), progress: bool = True,
                   loggers: Sequence = ()) -> list[dict]:
    """Tune each model on `tune_fold`'s validation split (same grid size for all), then run the
    chosen setting over every fold x seed; writes ``results/<model>.json`` and returns the documents.
    `loggers` (`anybind.tracking`) get each model's settings (its resolved recipe) and its summary."""
    out = Path(out)
    docs = []
    for spec in specs:
        chosen, scores = spec, []
        if grid is not None:
            chosen, scores = tune(grid.candidates(spec), suite, out, fold=tune_fold, tasks=tasks, progress=progress)
            log.info("%s: tuned on fold %d val -> %s", spec.name, tune_fold, chosen.overrides or chosen.options)
        doc = run_model(chosen, suite, folds, seeds, out, tasks=tasks, progress=progress)
        doc["model"]["tuning"] = {"fold": tune_fold, "split": "val", "candidates": scores} if scores else None
        res.write_results(doc, out / "results" / f"{slug(spec.name)}.json")
        docs.append(doc)
        if loggers:
            from ..tracking import as_loggers

            loggers = as_loggers(loggers)  # one that fails is dropped for the next models too
            loggers.log_params({slug(spec.name): doc["model"]["recipe"] or doc["model"]["settings"]})
            loggers.log_summary({slug(spec.name): res.summarise(doc)})
    return docs


def sweep(spec: ModelSpec, suite: Suite, key: str, values: Sequence, out: str | os.PathLike,
          folds: Sequence[int] = (0,), seeds: Sequence[int] = range(3), metric: str = "suite/score",
          tasks: Sequence[str] = ("retrieval", "zeroshot", "probe"), progress: bool = True) -> list[dict]:
    """Score against one setting: ``n`` (training items; "all" = every one: the data-efficiency
    curve) or any recipe field (``loss.structure_weight``). Resumable through the results log."""
    points = []
    for value in values:
        if key == "n":
            n = None if str(value) == "all" else int(value)
            doc = run_model(spec, suite, folds, seeds, out, max_train_pairs=n, tasks=tasks, progress=progress)
        else:
            if not spec.trained:
                raise AnybindError(f"--sweep {key} changes a recipe setting, but {spec.name} is a training-free baseline")
            doc = run_model(spec.with_overrides(f"{key}={value}"), suite, folds, seeds, out, tasks=tasks, progress=progress)
        summary = res.summarise(doc)
        if metric not in summary:
            raise AnybindError(f"sweep metric {metric} not measured; measured: {', '.join(summary)}")
        n_items = [r["info"].get("train_items") for r in doc["runs"]]
        points.append({"value": value, "mean": summary[metric]["mean"], "sd": summary[metric]["sd"],
                       "n_runs": summary[metric]["n"], "train_items": int(np.mean(n_items)) if n_items else None,
                       "summary": summary})
    return points
