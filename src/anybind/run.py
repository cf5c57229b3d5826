"""`anybind run RUN.yaml`: one experiment from raw data to an evaluated, exported model.

    extract -> assess -> train + evaluate -> export -> report

A run file names encoders per modality, a dataset, a recipe (plus overrides), the evaluation and
the export; it does not repeat the recipe. Every stage is cached: features in the feature cache,
and each stage's outputs in the run folder keyed by a hash of its inputs (``stages.json``), so a
second run of the same file loads no encoder and a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ._hashing import hash_obj
from .errors import AnybindError

log = logging.getLogger("anybind.run")
RUNS_DIR = Path(__file__).resolve().parent / "configs" / "runs"


class RunFileError(AnybindError, ValueError):
    """A run file with an unknown key or a bad value."""


@dataclass
class EncoderSpec:
    spec: str
    layers: str = "final"  #: comma list, 'all', or 'auto' (the assessment's recommendation)
    pooling: str | None = None


@dataclass
class AssessSpec:
    enabled: bool = True
    items: int = 2000  #: paired items (an evenly spread subset) scored at every layer pair
    metric: str = "mutual_knn"


@dataclass
class EvalSpec:
    suite: str = "builtin"  #: builtin (openclipart + Fashion-MNIST probe), or custom: the run's data + the sets below
    zeroshot: str | None = None  #: custom suite: a labelled image set for zero-shot (imagenet:DIR, folder:DIR)
    probe: str | None = None  #: custom suite: a labelled image set for the linear probe
    templates: str = "openai_imagenet"  #: custom suite: zero-shot prompt templates
    folds: list = field(default_factory=lambda: ["fixed"])  #: "fixed" (the index's split) or fold numbers
    seeds: list = field(default_factory=lambda: [0])
    tasks: list = field(default_factory=lambda: ["retrieval", "zeroshot", "probe"])
    probe_sizes: list = field(default_factory=lambda: [10000, 2000])
    baselines: list = field(default_factory=lambda: ["nn-transfer", "procrustes"])
    sweep_n: list = field(default_factory=list)  #: training items for a data-efficiency curve, e.g. [500, 1000, all]


@dataclass
class RunFile:
    name: str = "run"
    description: str = ""
    data: str = "openclipart"
    items: int | None = None  #: an evenly spread subset of the dataset (a quick trial), or all of it
    encoders: dict = field(default_factory=dict)  # modality -> EncoderSpec
    assess: AssessSpec = field(default_factory=AssessSpec)
    recipe: str = "default"
    overrides: list = field(default_factory=list)
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    export: bool = True

    def __post_init__(self):
        if len(self.encoders) != 2:
            raise RunFileError(f"encoders must name two modalities (e.g. image and text), not {list(self.encoders)}")
        self.encoders = {m: e if isinstance(e, EncoderSpec) else _build(EncoderSpec, e, f"encoders.{m}.")
                         for m, e in self.encoders.items()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_run_file(name_or_path: str | os.PathLike = "default") -> RunFile:
    """A built-in run file by name (configs/runs) or a YAML path; every key is checked."""
    p = Path(name_or_path)
    if not p.exists():
        p = RUNS_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        known = ", ".join(sorted(x.stem for x in RUNS_DIR.glob("*.yaml")))
        raise RunFileError(f"no run file {name_or_path!r}: give a YAML path or a built-in name ({known})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunFileError(f"{p} is not valid YAML: {e}") from e
    return _build(RunFile, data, "")


def _build(cls, data, prefix):
    if not isinstance(data, dict):
        raise RunFileError(f"{prefix.rstrip('.') or 'the run file'} must be a mapping, not {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise RunFileError(f"unknown run-file key(s) {', '.join(prefix + k for k in unknown)}: "
                           f"{prefix.rstrip('.') or 'a run file'} has {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kw = {k: _build(hints[k], v, f"{prefix}{k}.") if dataclasses.is_dataclass(hints[k]) else v for k, v in data.items()}
    try:
        return cls(**kw)
    except TypeError as e:
        raise RunFileError(f"{prefix.rstrip('.') or 'run file'}: {e}") from e


# ---- the stage cache -----------------------------------------------------------------------------------
class Stages:
    """stages.json: per stage, the hash of its inputs, its outputs and its time."""

    def __init__(self, folder: Path):
        self.path = folder / "stages.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.times: dict[str, float] = {}

    def cached(self, stage: str, key: str) -> dict | None:
        rec = self.data.get(stage)
        return rec["outputs"] if rec and rec["key"] == key else None

    def done(self, stage: str, key: str, outputs: dict, seconds: float) -> None:
        self.data[stage] = {"key": key, "outputs": outputs, "seconds": round(seconds, 1)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def run_pipeline(run: RunFile | str | os.PathLike, out: str | os.PathLike | None = None, cache=None,
                 progress: bool = True) -> Path:
    """Run every stage of a run file into one folder; returns the folder (report.html inside)."""
    from .data import load_dataset
    from .evaluate.suite import probe_index
    from .features import FeatureStore

    run = run if isinstance(run, RunFile) else load_run_file(run)
    out = Path(out or f"runs/{run.name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    stages = Stages(out)
    t_all = time.perf_counter()

    def stage(name: str, inputs: dict, fn):
        key = hash_obj(inputs)
        hit = stages.cached(name, key)
        if hit is not None and all(Path(p).exists() for p in _paths(hit)):
            log.info("stage %s: cached", name)
            stages.times[name] = 0.0
            return hit
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        outputs = fn()
        stages.done(name, key, outputs, time.perf_counter() - t0)
        stages.times[name] = time.perf_counter() - t0
        return outputs

    # 1. extract ---------------------------------------------------------------------------------
    index = load_dataset(run.data, cache=cache)
    if run.items:
        index = index.spread(run.items)
    stores = {}
    for modality, enc in run.encoders.items():
        layers = enc.layers
        if layers == "auto" and run.assess.enabled:
            layers = None  # decided after the assessment below
        if layers is not None:
            stores[modality] = _extract_stage(stage, f"extract.{modality}", enc, layers, index, cache, progress)

    # 2. assess: every layer of both encoders on a spread subset, heatmaps, the recommended layers ----
    assessment = None
    if run.assess.enabled:
        sub = index.spread(run.assess.items)
        all_stores = {m: _extract_stage(stage, f"extract.{m}.all-layers", e, "all", sub, cache, progress)
                      for m, e in run.encoders.items()}

        def do_assess():
            from .assess import assess

            assess({m: [FeatureStore.open(s["store"])] for m, s in all_stores.items()}, n=run.assess.items,
                   metric=run.assess.metric, out=out / "assess", cache=cache, progress=progress)
            return {"assessment": str(out / "assess" / "assessment.json")}

        assessment = stage("assess", {"stores": all_stores, "n": run.assess.items, "metric": run.assess.metric}, do_assess)
        for modality, enc in run.encoders.items():
            if enc.layers == "auto":
                rec = json.loads(Path(assessment["assessment"]).read_text())["recommendation"]["encoders"]
                chosen = ",".join(rec[enc.spec]["layers"])
                stores[modality] = _extract_stage(stage, f"extract.{modality}", enc, chosen, index, cache, progress)
    layers = {m: list(s["layers"]) for m, s in stores.items()}

    # 3. train + evaluate (the evaluated model is the one exported) ------------------------------------
    ev = run.evaluate
    probe = None
    if "probe" in ev.tasks and ev.suite == "builtin":
        pidx = probe_index(*ev.probe_sizes, cache=cache)
        probe = (_extract_stage(stage, "extract.probe", run.encoders["image"], ",".join(layers["image"]), pidx,
                                cache, progress), pidx)
    eval_out = stage("evaluate", {"stores": stores, "layers": layers, "recipe": run.recipe, "overrides": run.overrides,
                                  "evaluate": dataclasses.asdict(ev), "probe": probe[0] if probe else None,
                                  "recipe_text": _recipe_text(run.recipe)},
                     lambda: _evaluate(run, stores, layers, probe, out, progress))

    # 4. export ----------------------------------------------------------------------------------
    bundle = None
    if run.export:
        def do_export():
            from .bundle import export_bundle

            export_bundle(eval_out["train_run"], out / "bundle", results=[eval_out["results"][0]], overwrite=True)
            return {"bundle": str(out / "bundle")}

        bundle = stage("export", {"evaluate": eval_out}, do_export)["bundle"]

    # 5. report ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    from .report_html import write_run_report

    stage_times = {k: v.get("seconds") for k, v in stages.data.items()}
    write_run_report(out, run, eval_out, assessment, bundle, stage_times, stages.times,
                     total=time.perf_counter() - t_all)
    stages.times["report"] = time.perf_counter() - t0
    return out


def _extract_stage(stage, name, enc: EncoderSpec, layers: str, index, cache, progress) -> dict:
    def do():
        from .features import extract

        store = extract(enc.spec, index, layers=layers, pooling=enc.pooling, cache=cache, progress=progress)
        # the layers asked for: a cache hit may be a store holding more of them
        return {"store": str(store.path), "layers": store.report["layers"]}

    return stage(name, {"v": 2, "spec": enc.spec, "layers": layers, "pooling": enc.pooling, "dataset": index.name,
                        "fingerprint": index.fingerprint}, do)


def _evaluate(run: RunFile, stores: dict, layers: dict, probe, out: Path, progress: bool) -> dict:
    from .evaluate import report as rep
    from .evaluate import results as res
    from .evaluate.protocol import ModelSpec, baseline_spec, run_model, sweep
    from .evaluate.suite import Suite
    from .features import FeatureStore

    ev = run.evaluate
    if set(stores) != {"image", "text"}:
        raise RunFileError("the evaluation suites need an image and a text encoder")
    if ev.suite == "builtin":
        suite = Suite.builtin_from_stores(FeatureStore.open(stores["image"]["store"]),
                                          FeatureStore.open(stores["text"]["store"]), layers,
                                          FeatureStore.open(probe[0]["store"]) if probe else None,
                                          probe[1] if probe else None)
    elif ev.suite == "custom":  # the run's own paired data for retrieval, the named labelled sets
        layer_text = {m: ",".join(v) for m, v in layers.items()}
        suite = Suite.from_datasets(run.encoders["image"].spec, run.encoders["text"].spec, run.data,
                                    zeroshot=ev.zeroshot, probe=ev.probe, templates=ev.templates,
                                    layers={m: v.split(",") for m, v in layer_text.items()}, progress=progress)
        ev.tasks = [t for t in ev.tasks if (t != "zeroshot" or ev.zeroshot) and (t != "probe" or ev.probe)]
    else:
        raise RunFileError(f"evaluate.suite must be builtin or custom, not {ev.suite!r}")
    folds = [None if f == "fixed" else int(f) for f in ev.folds]
    seeds = [int(s) for s in ev.seeds]
    spec = ModelSpec(Path(run.recipe).stem, recipe=run.recipe, overrides=tuple(run.overrides))
    docs = [run_model(spec, suite, folds, seeds, out / "eval", tasks=ev.tasks, progress=progress)]
    for b in ev.baselines:
        docs.append(run_model(baseline_spec(b), suite, folds, seeds, out / "eval", tasks=ev.tasks, progress=progress))
    paths = [str(res.write_results(d, out / "eval" / "results" / f"{d['model']['name']}.json")) for d in docs]
    extra = {}
    if ev.sweep_n:
        points = sweep(spec, suite, "n", ev.sweep_n, out / "eval", folds=folds, seeds=seeds, tasks=ev.tasks,
                       progress=progress)
        extra["sweep"] = [{"value": p["train_items"], "mean": p["mean"], "sd": p["sd"], "n": p["value"]} for p in points]
        (out / "eval" / "sweep.json").write_text(json.dumps(extra["sweep"], indent=1))
    rep.write_report(docs, out / "eval", reference=spec.name, metric="suite/score")
    first = docs[0]["runs"][0]
    train_run = str(Path(first["info"]["metrics_jsonl"]).parent)
    return {"results": paths, "train_run": train_run, "report": str(out / "eval" / "report.md"), **extra}


def _recipe_text(name: str) -> str:
    from .align.recipe import load_recipe

    return json.dumps(load_recipe(name).to_dict(), sort_keys=True)


def _paths(outputs: dict) -> list[str]:
    found = []
    for k, v in outputs.items():
        if k in ("store", "assessment", "bundle", "train_run", "report") and isinstance(v, str):
            found.append(v)
        elif k == "results" and isinstance(v, list):
            found += v
    return found
