"""`anybind run RUN.yaml`: one experiment from raw data to an evaluated, exported model.

    extract -> assess -> train + evaluate -> [add: extract, emergent] -> export -> report

A run file names an encoder per modality (and which modality is the anchor), a dataset, a recipe
(plus overrides), the evaluation and the export; it does not repeat the recipe. The file is
checked whole before any work (`load_run_file`): a mistake is refused with the key that holds it.
Every stage is cached: features in the feature cache, and each stage's outputs in the run folder
keyed by a hash of its inputs (``stages.json``); ``stage-log.jsonl`` says, per invocation, which
stages ran and which were cached, so a second run of the same file loads no encoder and a killed
run resumes where it stopped.

Progressive additions (``add:``) bind a new modality (spoken captions, say) onto the base model's
text space after it is trained, each from its own dataset; the ``emergent:`` stage then trains
the base and every addition per fold and seed (`evaluate.emergent.emergent_protocol`) and scores
each query set against the base's images: the new modality (never paired with images), the text
that was spoken, the base's own captions and, with ``cascade: true``, Whisper's transcripts.
The exported bundle is then the first addition's model (image, text and the new modality).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import types
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ._hashing import hash_obj
from .atomic import append_json, write_json, write_text
from .checks import choice, did_you_mean, flag, integer, slug
from .errors import AnybindError

log = logging.getLogger("anybind.run")
RUNS_DIR = Path(__file__).resolve().parent / "configs" / "runs"
SUITES = ("builtin", "custom")
STAGE_LOG = "stage-log.jsonl"


class RunFileError(AnybindError, ValueError):
    """A run file with an unknown key or a bad value."""


# ---- the schema ------------------------------------------------------------------------------------
@dataclass
class EncoderEntry:
    """One modality's encoder in a run file."""

    spec: str  #: an encoder spec string (`anybind encoders`)
    layers: str = "final"  #: comma list (8,final), 'all', 'last', or 'auto' (the assessment's recommendation)
    pooling: str | None = None  #: cls, mean or cls+mean (default: the encoder's)

    def __post_init__(self):  # YAML gives `layers: 8` or `layers: [8, final]` too
        if isinstance(self.layers, (list, tuple)):
            self.layers = ",".join(str(x) for x in self.layers)
        elif isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = str(self.layers)


@dataclass
class AssessSpec:
    enabled: bool = True
    items: int = 2000  #: paired items (an evenly spread subset) scored at every layer pair
    metric: str = "mutual_knn"  #: an assessment metric (anybind.assess.metrics.METRICS)


@dataclass
class EvalSpec:
    suite: str = "builtin"  #: builtin (openclipart + Fashion-MNIST probe), or custom: the run's data + the sets below
    zeroshot: str | None = None  #: custom suite: a labelled image set for zero-shot (imagenet:DIR, folder:DIR)
    probe: str | None = None  #: custom suite: a labelled image set for the linear probe
    templates: str = "openai_imagenet"  #: custom suite: zero-shot prompt templates
    folds: list = field(default_factory=lambda: ["fixed"])  #: "fixed" (the index's split) or fold numbers
    seeds: list = field(default_factory=lambda: [0])
    tasks: list | None = None  #: default: every task the suite has (builtin: all three)
    probe_sizes: list = field(default_factory=lambda: [10000, 2000])
    baselines: list = field(default_factory=lambda: ["nn-transfer", "procrustes"])
    sweep_n: list = field(default_factory=list)  #: training items for a data-efficiency curve, e.g. [500, 1000, all]


@dataclass
class AddEntry:
    """A modality bound progressively onto the base model's `to` space (`train --add`)."""

    label: str | None = None  #: a name for the addition, e.g. "spoken openclipart" (its folder: the slug)
    modality: str | None = None  #: the new modality, e.g. audio
    encoder: EncoderEntry | None = None  #: its encoder entry ({spec, layers, pooling})
    data: str | None = None  #: a dataset holding that modality and a `to` field (openclipart-speech)
    to: str = "text"  #: the base modality it binds to; its store on `data` is extracted as the base's
    recipe: str | None = None  #: default: the run's recipe
    overrides: list | None = None  #: default: the run's overrides


@dataclass
class EmergentSpec:
    """Scoring every query set against the base's images, per fold and seed, for every addition."""

    queries: str | None = None  #: a dataset sharing the base's items (rendering 0 = the query); default: add[0].data
    folds: list | None = None  #: default: evaluate.folds
    seeds: list | None = None  #: default: evaluate.seeds
    cascade: bool = False  #: also score Whisper's transcripts of the queries through the text side


@dataclass
class RunFile:
    name: str = "run"
    description: str = ""
    data: str = "openclipart"
    encoding: str | None = None  #: text encoding of a table dataset (CSV/TSV/JSONL; default utf-8), e.g. latin-1
    items: int | None = None  #: an evenly spread subset of the dataset (a quick trial), or all of it
    encoders: dict[str, EncoderEntry] = field(default_factory=dict)  #: modality -> encoder entry
    anchor: str | None = None  #: the modality the others bind to (default: the first encoder's)
    assess: AssessSpec = field(default_factory=AssessSpec)
    recipe: str = "default"
    overrides: list = field(default_factory=list)
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    export: bool = True
    add: list = field(default_factory=list)  #: progressive additions (AddEntry), bound after the base
    emergent: EmergentSpec | None = None  #: the emergent stage (default when `add` is given)
    engine: str = "local"  #: extraction engine: local, or ray (a Ray cluster: RAY_ADDRESS, or one started here)

    def __post_init__(self):
        if not isinstance(self.encoders, dict):
            raise RunFileError(f"encoders must map a modality to an encoder entry, not {self.encoders!r}")
        self.encoders = {m: e if isinstance(e, EncoderEntry) else _build(EncoderEntry, e, f"encoders.{m}.")
                         for m, e in self.encoders.items()}
        if self.anchor is None and self.encoders:
            self.anchor = next(iter(self.encoders))
        if self.add is None:
            self.add = []
        if not isinstance(self.add, list):
            raise RunFileError(f"add must be a list of additions ({{label, modality, encoder, data}}), not {self.add!r}")
        self.add = [a if isinstance(a, AddEntry) else _build(AddEntry, a, f"add[{i}].") for i, a in enumerate(self.add)]
        if isinstance(self.emergent, dict):
            self.emergent = _build(EmergentSpec, self.emergent, "emergent.")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if not self.add and self.emergent is None:  # a run without additions dumps as it always did
            del out["add"], out["emergent"]
        if self.engine == "local":  # so does one on the local engine
            del out["engine"]
        return out


def load_run_file(name_or_path: str | os.PathLike = "default") -> RunFile:
    """A built-in run file by name (configs/runs) or a YAML path, checked whole (`validate_run`)."""
    p = Path(name_or_path)
    if not p.exists():
        p = RUNS_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in RUNS_DIR.glob("*.yaml"))
        raise RunFileError(f"no run file {str(name_or_path)!r}{did_you_mean(str(name_or_path), known)}: "
                           f"give a YAML path or a built-in name ({', '.join(known)})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunFileError(f"{p} is not valid YAML: {e}") from e
    return validate_run(_build(RunFile, data, ""))


def _build(cls, data, prefix: str):
    """`cls` from a mapping: unknown keys refused with a did-you-mean, sections built recursively."""
    where = prefix.rstrip(".") or "the run file"
    if not isinstance(data, dict):
        raise RunFileError(f"{where} must be a mapping, not {data!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in fields:
            raise RunFileError(f"unknown run-file key '{prefix}{key}'{did_you_mean(str(key), fields)}: "
                               f"{where} has {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kw = {k: _build(_dataclass_of(hints[k]), v, f"{prefix}{k}.") if _nested(hints[k], v) else v
          for k, v in data.items()}
    try:
        return cls(**kw)
    except TypeError as e:
        raise RunFileError(f"{where}: {e}") from e


def _dataclass_of(hint):
    """The dataclass a field holds (`X` or `X | None`), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None


def _nested(hint, value) -> bool:
    """A section to build: a dataclass field, or an optional one that is given."""
    return _dataclass_of(hint) is not None and (value is not None or dataclasses.is_dataclass(hint))


# ---- checks: every mistake refused before any work, naming its key -------------------------------------
def validate_run(run: RunFile) -> RunFile:
    """Check a run file whole (types, names, encoder specs, layers, the recipe with its overrides,
    baselines, the suite against the data); fills `evaluate.tasks`. Returns `run`."""
    _check_top(run)
    for modality, entry in run.encoders.items():
        _check_encoder(modality, entry)
    _check_assess(run.assess)
    _check_eval(run)
    _check_recipe(run)
    _check_additions(run)
    _check_emergent(run)
    return run


def _check_top(run: RunFile) -> None:
    for key in ("name", "data", "recipe"):
        if not isinstance(getattr(run, key), str) or not getattr(run, key).strip():
            raise RunFileError(f"{key} must be a non-empty string, not {getattr(run, key)!r}")
    if run.items is not None:
        integer("items", run.items, minimum=2, error=RunFileError)
    flag("export", run.export, error=RunFileError)
    if not isinstance(run.overrides, list) or not all(isinstance(o, str) for o in run.overrides):
        raise RunFileError(f"overrides must be a list of KEY=VALUE strings, not {run.overrides!r}")
    if len(run.encoders) < 2:
        raise RunFileError(f"encoders must name at least two modalities (e.g. image and text), not {list(run.encoders)}")
    if len(run.encoders) > 2:
        raise RunFileError(f"encoders: training binds two modalities at a time; this run file names "
                           f"{len(run.encoders)} ({', '.join(run.encoders)})")
    choice("anchor", run.anchor, list(run.encoders), error=RunFileError)
    _check_data(run.data)
    if run.encoding is not None:
        _check_encoding(run.encoding)
    choice("engine", run.engine, ("local", "ray"), error=RunFileError)
    if run.engine == "ray":  # a missing Ray is said before any work
        from .features.ray_engine import require_ray

        require_ray()


def dataset_forms() -> tuple[list[str], list[str]]:
    """(built-in dataset names, spec prefixes such as table or folder), from the data registries."""
    from .data import DATA_PREFIXES, DATASETS

    return DATASETS.names(), DATA_PREFIXES.names()


def _check_data(spec: str, key: str = "data") -> None:
    builtins, prefixes = dataset_forms()
    prefix, sep, rest = spec.partition(":")
    if spec in builtins or (sep and rest and (prefix in prefixes or prefix in builtins)):
        return
    path = Path(spec).expanduser()
    if path.exists() or spec.endswith(".tar"):
        return  # a bare path: load_dataset tells the kind from what is there
    raise RunFileError(f"{key}: unknown dataset '{spec}'{did_you_mean(prefix if sep else spec, builtins + prefixes)}: "
                       f"use a built-in ({', '.join(builtins)}), "
                       f"{', '.join(p + ':PATH' for p in prefixes)}, or an existing path")


def _check_encoding(encoding) -> None:
    import codecs

    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise RunFileError(f"encoding: unknown text encoding {encoding!r}: use e.g. utf-8, latin-1, cp1252") from None


def _check_encoder(modality: str, entry: EncoderEntry, key: str | None = None) -> None:
    from .encoders import POOLINGS, list_encoders, parse_spec

    key = key or f"encoders.{modality}"
    if not isinstance(entry.spec, str):
        raise RunFileError(f"{key}.spec must be an encoder spec string, not {entry.spec!r}")
    try:
        parsed = parse_spec(entry.spec)
    except AnybindError as e:
        raise RunFileError(f"{key}.spec: {e}") from e
    packaged = {r["spec"]: r["modality"] for r in list_encoders() if r["kind"] == "packaged"}
    encodes = parsed.modality or packaged.get(entry.spec)
    if encodes and encodes != modality:
        raise RunFileError(f"{key}.spec: {entry.spec} encodes {encodes}, not {modality}")
    check_layer_text(entry.layers, f"{key}.layers")
    if entry.pooling is not None:
        choice(f"{key}.pooling", entry.pooling, POOLINGS, error=RunFileError)


def check_layer_text(text, key: str) -> str:
    """The syntax of a layers setting, by the one `--layers` parser (the encoder checks that the
    names exist when it is loaded)."""
    from .encoders.layers import parse_layers

    if not isinstance(text, str) or not text.strip():
        raise RunFileError(f"{key} must be a comma list of layers (8,final), all, last or auto, not {text!r}")
    try:
        parse_layers(text, syntax_only=True)
    except AnybindError as e:
        raise RunFileError(f"{key}: {e}") from e
    return text.strip()


def _check_assess(a: AssessSpec) -> None:
    flag("assess.enabled", a.enabled, error=RunFileError)
    integer("assess.items", a.items, minimum=2, error=RunFileError)
    from .assess.metrics import METRICS

    choice("assess.metric", a.metric, list(METRICS), error=RunFileError)


def _check_eval(run: RunFile) -> None:
    ev = run.evaluate
    choice("evaluate.suite", ev.suite, SUITES, error=RunFileError)
    _check_templates(ev.templates)
    missing = [m for m in ("image", "text") if m not in run.encoders]
    if missing:
        raise RunFileError(f"evaluate: the suites score image-text models, but encoders has no {' or '.join(missing)} "
                           f"(it has {', '.join(run.encoders)})")
    if ev.suite == "builtin":
        _check_builtin_suite(run)
    ev.tasks = _checked_tasks(ev)
    for i, f in enumerate(_as_list(ev.folds, "evaluate.folds")):
        if f != "fixed":
            integer(f"evaluate.folds[{i}] (a fold number, or fixed)", f, minimum=0, error=RunFileError)
    for i, s in enumerate(_as_list(ev.seeds, "evaluate.seeds")):
        integer(f"evaluate.seeds[{i}]", s, minimum=0, error=RunFileError)
    sizes = _as_list(ev.probe_sizes, "evaluate.probe_sizes")
    if len(sizes) != 2:
        raise RunFileError(f"evaluate.probe_sizes takes two numbers [train, test], not {sizes!r}")
    for i, n in enumerate(sizes):
        integer(f"evaluate.probe_sizes[{i}]", n, minimum=1, error=RunFileError)
    for i, n in enumerate(_as_list(ev.sweep_n, "evaluate.sweep_n")):
        if n != "all":
            integer(f"evaluate.sweep_n[{i}] (training items, or all)", n, minimum=1, error=RunFileError)
    from .align.baselines import BASELINES

    for b in _as_list(ev.baselines, "evaluate.baselines"):
        choice("evaluate.baselines entry", b, list(BASELINES), error=RunFileError)


def _check_templates(templates) -> None:
    """A built-in template set or a readable JSON list of templates, each with one {c}: checked
    now, not when zero-shot scoring reaches it after extract and train."""
    from .evaluate.zeroshot import load_templates

    try:
        load_templates(templates)
    except AnybindError as e:
        raise RunFileError(f"evaluate.templates: {e}") from e


def _check_builtin_suite(run: RunFile) -> None:
    if run.data != "openclipart" and not run.data.startswith("openclipart:"):
        raise RunFileError(f"evaluate.suite: builtin scores openclipart (its folds, curated classes and file "
                           f"names), but data is '{run.data}': use suite: custom (with evaluate.zeroshot and "
                           "evaluate.probe for labelled image sets)")
    for key in ("zeroshot", "probe"):
        if getattr(run.evaluate, key) is not None:
            raise RunFileError(f"evaluate.{key} is for suite: custom; the builtin suite brings its own")


def _checked_tasks(ev: EvalSpec) -> list[str]:
    from .evaluate.results import TASKS, check_tasks

    has = {"retrieval": True, "zeroshot": ev.suite == "builtin" or ev.zeroshot is not None,
           "probe": ev.suite == "builtin" or ev.probe is not None}
    if ev.tasks is None:
        return [t for t in TASKS if has[t]]
    tasks = check_tasks(_as_list(ev.tasks, "evaluate.tasks"), "evaluate.tasks", RunFileError)
    for t in tasks:
        if not has[t]:
            raise RunFileError(f"evaluate.tasks names {t}, but evaluate.{t} is not set: give a labelled image set "
                               f"(imagenet:DIR, folder:DIR, table:FILE) or drop {t} from the tasks")
    if not tasks:
        raise RunFileError("evaluate.tasks is empty: name at least one of " + ", ".join(TASKS))
    return list(dict.fromkeys(tasks))


# ---- progressive additions and the emergent stage
QUERY_SETS = ("spoken", "text", "cascade")  # the emergent stage's fixed query labels (beside each new modality)


def _check_additions(run: RunFile) -> None:
    """Each addition: a new modality, its encoder, a dataset holding it and its `to` side, a recipe."""
    if not run.add:
        return
    _check_emergent_base(run)
    labels: dict[str, str] = {}
    for i, a in enumerate(run.add):
        key = f"add[{i}]"
        for name in ("label", "modality", "data"):
            if not isinstance(getattr(a, name), str) or not getattr(a, name).strip():
                raise RunFileError(f"{key}.{name} is required (a non-empty string), not {getattr(a, name)!r}: "
                                   "e.g. {label: spoken openclipart, modality: audio, "
                                   "encoder: {spec: whisper-tiny-en}, data: openclipart-speech}")
        if slug(a.label) in labels:
            raise RunFileError(f"{key}.label '{a.label}' names the same folder as '{labels[slug(a.label)]}': "
                               "give each addition its own label")
        labels[slug(a.label)] = a.label
        _check_addition(run, a, key)


def _check_emergent_base(run: RunFile) -> None:
    """The emergent stage trains the base with the trainer's defaults: the final layer of each
    store and the image side as the anchor; a run asking for other settings is refused, not
    silently trained otherwise."""
    for m, e in run.encoders.items():
        if e.layers.strip() != "final":
            raise RunFileError(f"encoders.{m}.layers: a run with add: binds on the final layer only (the emergent "
                               f"stage trains the base on it), not {e.layers!r}: set layers: final")
    if run.anchor != "image":
        raise RunFileError(f"anchor: a run with add: anchors the base on image (the emergent stage trains it so), "
                           f"not {run.anchor!r}")


def _check_addition(run: RunFile, a: AddEntry, key: str) -> None:
    if a.modality in run.encoders:
        raise RunFileError(f"{key}.modality: {a.modality} is already bound by the base (encoders.{a.modality}): "
                           "an addition binds a new modality")
    if a.modality in QUERY_SETS or a.modality != slug(a.modality):
        raise RunFileError(f"{key}.modality must be a plain name other than {', '.join(QUERY_SETS)}, not {a.modality!r}")
    choice(f"{key}.to (a modality of encoders)", a.to, list(run.encoders), error=RunFileError)
    if not isinstance(a.encoder, EncoderEntry):
        raise RunFileError(f"{key}.encoder is required: {{spec: ..., layers: final}} encoding {a.modality}")
    _check_encoder(a.modality, a.encoder, f"{key}.encoder")
    if a.encoder.layers.strip() != "final":
        raise RunFileError(f"{key}.encoder.layers: an addition binds its final layer only, not {a.encoder.layers!r}")
    _check_data(a.data, f"{key}.data")
    _check_fields(a.data, (a.modality, a.to), f"{key}.data")
    if a.overrides is not None and (not isinstance(a.overrides, list) or not all(isinstance(o, str) for o in a.overrides)):
        raise RunFileError(f"{key}.overrides must be a list of KEY=VALUE strings, not {a.overrides!r}")
    _check_named_recipe(*addition_recipe(run, a), key)


def addition_recipe(run: RunFile, a: AddEntry) -> tuple[str, list]:
    """(recipe, overrides) an addition trains with: its own, else the run's."""
    return (a.recipe or run.recipe), list(run.overrides if a.overrides is None else a.overrides)


def _check_fields(spec: str, modalities, key: str) -> None:
    """A built-in dataset's fields are known before listing it: it must hold each modality."""
    from .data import DATASETS

    if spec.partition(":")[0] not in DATASETS:
        return  # other forms are checked when listed (`_index_fields`)
    has = set(DATASETS.entry(spec.partition(":")[0]).meta["fields"].values())
    missing = [m for m in modalities if m not in has]
    if missing:
        raise RunFileError(f"{key}: {spec} has no {' or '.join(missing)} field (it has {', '.join(sorted(has))})")


def _check_emergent(run: RunFile) -> None:
    if run.emergent is not None and not run.add:
        raise RunFileError("emergent: scores progressive additions, but the run file has no add: entries")
    if not run.add:
        return
    em = run.emergent = run.emergent or EmergentSpec()
    em.queries = run.add[0].data if em.queries is None else em.queries
    if not isinstance(em.queries, str) or not em.queries.strip():
        raise RunFileError(f"emergent.queries must be a dataset spec (e.g. openclipart-speech), not {em.queries!r}")
    _check_data(em.queries, "emergent.queries")
    _check_fields(em.queries, sorted({a.modality for a in run.add} | {"text"}), "emergent.queries")
    em.folds = list(run.evaluate.folds) if em.folds is None else em.folds
    em.seeds = list(run.evaluate.seeds) if em.seeds is None else em.seeds
    for i, f in enumerate(_as_list(em.folds, "emergent.folds")):
        if f != "fixed":
            integer(f"emergent.folds[{i}] (a fold number, or fixed)", f, minimum=0, error=RunFileError)
    for i, s in enumerate(_as_list(em.seeds, "emergent.seeds")):
        integer(f"emergent.seeds[{i}]", s, minimum=0, error=RunFileError)
    if not em.folds or not em.seeds:
        raise RunFileError("emergent.folds and emergent.seeds need at least one entry each")
    flag("emergent.cascade", em.cascade, error=RunFileError)
    if em.cascade and not any(a.modality == "audio" for a in run.add):
        raise RunFileError("emergent.cascade transcribes spoken queries with Whisper: it needs an addition of "
                           f"modality audio (the additions bind {', '.join(a.modality for a in run.add)})")


def _check_named_recipe(recipe, overrides: list, key: str) -> None:
    from .align.recipe import load_recipe

    if not isinstance(recipe, str) or not recipe.strip():
        raise RunFileError(f"{key}.recipe must be a recipe name or path, not {recipe!r}")
    try:
        load_recipe(recipe)
    except AnybindError as e:
        raise RunFileError(f"{key}.recipe: {e}") from e
    try:
        load_recipe(recipe, overrides)
    except AnybindError as e:
        raise RunFileError(f"{key}.overrides: {e}") from e


def _check_recipe(run: RunFile) -> None:
    from .align.recipe import load_recipe

    try:
        load_recipe(run.recipe)
    except AnybindError as e:
        raise RunFileError(f"recipe: {e}") from e
    try:
        load_recipe(run.recipe, run.overrides)
    except AnybindError as e:
        raise RunFileError(f"overrides: {e}") from e


def _as_list(value, key: str) -> list:
    if not isinstance(value, list):
        raise RunFileError(f"{key} must be a list, not {value!r}")
    return value


def check_auto_layers(run: RunFile, cache=None) -> None:
    """`layers: auto` without this run's own assessment reads the cache's latest: check it is there
    and scored the encoder, before any work."""
    from .features.layers import auto_layers

    for modality, entry in run.encoders.items():
        if entry.layers.strip() == "auto" and not run.assess.enabled:
            try:
                auto_layers(entry.spec, None, cache=cache)
            except AnybindError as e:
                raise RunFileError(f"encoders.{modality}.layers: auto with assess disabled: {e}") from e


# ---- the stage cache -----------------------------------------------------------------------------------
class Stages:
    """stages.json: per stage, the hash of its inputs, its outputs and its time; stage-log.jsonl:
    per invocation, which stages ran and which were cached."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "stages.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.times: dict[str, float] = {}
        self.invocation = uuid.uuid4().hex[:12]

    def cached(self, stage: str, key: str) -> dict | None:
        rec = self.data.get(stage)
        if not rec or rec["key"] != key:
            return None
        return rec["outputs"] if all(Path(p).exists() for p in _paths(rec["outputs"])) else None

    def run(self, stage: str, inputs: dict, fn: typing.Callable[[], dict]) -> dict:
        """`fn()`'s outputs, or the cached ones when the inputs hash the same and the files exist
        (the formats anybind writes are part of the inputs: an upgrade re-runs what it changed)."""
        key = hash_obj({"formats": _formats(), **inputs})
        hit = self.cached(stage, key)
        if hit is not None:
            log.info("stage %s: cached", stage)
            self._record(stage, "cached", 0.0)
            return hit
        log.info("stage %s ...", stage)
        t0 = time.perf_counter()
        outputs = fn()
        seconds = time.perf_counter() - t0
        self.data[stage] = {"key": key, "outputs": outputs, "seconds": round(seconds, 1)}
        write_json(self.path, self.data)
        self._record(stage, "ran", seconds)
        return outputs

    def _record(self, stage: str, status: str, seconds: float) -> None:
        self.times[stage] = seconds if status == "ran" else 0.0
        append_json(self.folder / STAGE_LOG, {"invocation": self.invocation, "stage": stage, "status": status,
                                              "seconds": round(seconds, 1)})


def last_invocation(folder: str | os.PathLike) -> dict[str, str]:
    """{stage: "ran" | "cached"} of the latest `run_pipeline` into `folder` (from stage-log.jsonl)."""
    path = Path(folder) / STAGE_LOG
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = records[-1]["invocation"] if records else None
    return {r["stage"]: r["status"] for r in records if r["invocation"] == last}


def _paths(outputs: dict) -> list[str]:
    found = []
    for k, v in outputs.items():
        if k in ("store", "assessment", "bundle", "train_run", "report", "sweep_json", "records", "summary_json",
                 "export_run") and isinstance(v, str):
            found.append(v)
        elif k == "results" and isinstance(v, list):
            found += v
    return found


# ---- the pipeline ---------------------------------------------------------------------------------------
def run_pipeline(run: RunFile | str | os.PathLike, out: str | os.PathLike | None = None, cache=None,
                 progress: bool = True, loggers: typing.Sequence = ()) -> Path:
    """Run every stage of a run file into one folder; returns the folder (report.html inside).
    The run file is checked whole first: a mistake is refused before anything is extracted.
    `loggers` (`anybind.tracking`) get the run file, the resolved recipe and the final results."""
    run = validate_run(run) if isinstance(run, RunFile) else load_run_file(run)
    check_auto_layers(run, cache)
    out = Path(out or Path("runs") / slug(run.name))
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "run.yaml", yaml.safe_dump(run.to_dict(), sort_keys=False))
    return _Pipeline(run, out, cache, progress, Stages(out), loggers).execute()


@dataclass
class _Pipeline:
    run: RunFile
    out: Path
    cache: typing.Any
    progress: bool
    stages: Stages
    loggers: typing.Sequence = ()

    def execute(self) -> Path:
        t_all = time.perf_counter()
        index = self.dataset()
        stores = self.extract_named(index)  # layers named in the file (auto ones wait for the assessment)
        assessment = self.assess(index) if self.run.assess.enabled else None
        stores.update(self.extract_auto(index, assessment))
        stores = {m: stores[m] for m in self.run.encoders}
        layers = {m: list(s["layers"]) for m, s in stores.items()}
        added = self.addition_stores(index, stores) if self.run.add else None  # a bad dataset fails before training
        eval_out = self.evaluate(stores, layers)
        self.track(eval_out)
        emergent = self.emergent(stores, added) if added else None
        bundle = self.export(eval_out, emergent) if self.run.export else None
        self.report(eval_out, assessment, bundle, t_all, emergent)
        return self.out

    def dataset(self):
        from .data import load_dataset

        index = load_dataset(self.run.data, cache=self.cache, **self.data_options)
        return index.spread(self.run.items) if self.run.items else index

    @property
    def data_options(self) -> dict:
        """Options of the run's dataset spec (a table's `encoding`)."""
        return {"encoding": self.run.encoding} if self.run.encoding else {}

    def extract(self, name: str, enc: EncoderEntry, layers: str, index) -> dict:
        def do():
            from .features import extract

            store = extract(enc.spec, index, layers=layers, pooling=enc.pooling, cache=self.cache,
                            progress=self.progress, engine=self.run.engine)
            # the layers asked for: a cache hit may be a store holding more of them
            return {"store": str(store.path), "layers": store.report["layers"]}

        return self.stages.run(name, {"v": 2, "spec": enc.spec, "layers": layers, "pooling": enc.pooling,
                                      "dataset": index.name, "fingerprint": index.fingerprint}, do)

    def extract_named(self, index) -> dict[str, dict]:
        waits = self.run.assess.enabled  # `auto` then reads this run's own assessment
        return {m: self.extract(f"extract.{m}", e, e.layers, index) for m, e in self.run.encoders.items()
                if not (waits and e.layers.strip() == "auto")}

    def extract_auto(self, index, assessment: dict | None) -> dict[str, dict]:
        from .features.layers import resolve_layers

        if assessment is None:
            return {}
        out = {}
        for m, e in self.run.encoders.items():
            if e.layers.strip() == "auto":
                chosen = resolve_layers("auto", None, assessment["assessment"], modality=m, encoder=e.spec)
                out[m] = self.extract(f"extract.{m}", e, ",".join(chosen), index)
        return out

    def assess(self, index) -> dict:
        """Every layer of every encoder on a spread subset: heatmaps and the recommended layers."""
        spec = self.run.assess
        sub = index.spread(spec.items)
        all_stores = {m: self.extract(f"extract.{m}.all-layers", e, "all", sub) for m, e in self.run.encoders.items()}

        def do():
            from .assess import assess
            from .features import FeatureStore

            assess({m: [FeatureStore.open(s["store"])] for m, s in all_stores.items()}, n=spec.items,
                   metric=spec.metric, out=self.out / "assess", cache=self.cache, progress=self.progress)
            return {"assessment": str(self.out / "assess" / "assessment.json")}

        return self.stages.run("assess", {"stores": all_stores, "n": spec.items, "metric": spec.metric}, do)

    def evaluate(self, stores: dict, layers: dict) -> dict:
        """Train and evaluate (the evaluated model is the one exported)."""
        from .evaluate.suite import probe_index

        run, ev = self.run, self.run.evaluate
        probe = None
        if "probe" in ev.tasks and ev.suite == "builtin":
            pidx = probe_index(*ev.probe_sizes, cache=self.cache)
            probe = (self.extract("extract.probe", run.encoders["image"], ",".join(layers["image"]), pidx), pidx)
        inputs = {"stores": stores, "layers": layers, "recipe": run.recipe, "overrides": run.overrides,
                  "anchor": run.anchor, "evaluate": dataclasses.asdict(ev), "probe": probe[0] if probe else None,
                  "recipe_text": _recipe_text(run.recipe)}
        return self.stages.run("evaluate", inputs, lambda: self.score(stores, layers, probe))

    def track(self, eval_out: dict) -> None:
        """The experiment loggers' record: the run file, the evaluated model's resolved recipe and
        every model's summary over folds x seeds (read from the results documents, cached or not)."""
        if not self.loggers:
            return
        from .evaluate import results as res
        from .tracking import as_loggers

        docs = [res.read_results(p) for p in eval_out["results"]]
        loggers = as_loggers(self.loggers)
        loggers.log_params({"run": self.run.to_dict(), "recipe": docs[0]["model"]["recipe"]})
        loggers.log_summary({slug(d["model"]["name"]): res.summarise(d) for d in docs})

    def suite(self, stores: dict, layers: dict, probe):
        from .evaluate.suite import Suite
        from .features import FeatureStore

        ev = self.run.evaluate
        if ev.suite == "builtin":
            suite = Suite.builtin_from_stores(FeatureStore.open(stores["image"]["store"]),
                                              FeatureStore.open(stores["text"]["store"]), layers,
                                              FeatureStore.open(probe[0]["store"]) if probe else None,
                                              probe[1] if probe else None)
        else:  # custom: the run's own paired data for retrieval, the named labelled sets
            from .data import load_dataset

            paired = load_dataset(self.run.data, cache=self.cache, **self.data_options)
            suite = Suite.from_datasets(self.run.encoders["image"].spec, self.run.encoders["text"].spec, paired,
                                        zeroshot=ev.zeroshot, probe=ev.probe, templates=ev.templates,
                                        layers=layers, cache=self.cache, progress=self.progress)
        suite.anchor = self.run.anchor
        return suite

    def score(self, stores: dict, layers: dict, probe) -> dict:
        from .evaluate import report as rep
        from .evaluate import results as res
        from .evaluate.protocol import ModelSpec, baseline_spec, run_model

        ev, evals = self.run.evaluate, self.out / "eval"
        suite = self.suite(stores, layers, probe)
        folds = [None if f == "fixed" else int(f) for f in ev.folds]
        seeds = [int(s) for s in ev.seeds]
        spec = ModelSpec(Path(self.run.recipe).stem, recipe=self.run.recipe, overrides=tuple(self.run.overrides))
        specs = [spec] + [baseline_spec(b) for b in ev.baselines]
        docs = [run_model(s, suite, folds, seeds, evals, tasks=ev.tasks, progress=self.progress) for s in specs]
        paths = [str(res.write_results(d, evals / "results" / f"{slug(d['model']['name'])}.json")) for d in docs]
        extra = self.sweep(spec, suite, folds, seeds) if ev.sweep_n else {}
        rep.write_report(docs, evals, reference=spec.name, metric="suite/score")
        train_run = str(Path(docs[0]["runs"][0]["info"]["metrics_jsonl"]).parent)
        return {"results": paths, "train_run": train_run, "report": str(evals / "report.md"), **extra}

    def sweep(self, spec, suite, folds: list, seeds: list) -> dict:
        """The data-efficiency curve: the same document `anybind eval --sweep n=...` writes."""
        from .evaluate.sweeps import plot_series, sweep_models, write_sweep

        ev = self.run.evaluate
        doc = sweep_models([spec], suite, "n", ev.sweep_n, self.out / "eval", folds=folds, seeds=seeds,
                           tasks=ev.tasks, progress=self.progress)
        paths = write_sweep(doc, self.out / "eval", plot=False)  # the report draws it
        return {"sweep": plot_series(doc)[spec.name], "sweep_json": str(paths["json"])}

    def export(self, eval_out: dict, emergent: dict | None = None) -> str:
        """The evaluated model's bundle; with additions, the first addition's model (its source
        is the base it was added to, trained on the first fold and seed of the emergent stage)."""
        run = emergent["export_run"] if emergent else eval_out["train_run"]

        def do():
            from .bundle import export_bundle

            export_bundle(run, self.out / "bundle", results=[eval_out["results"][0]], overwrite=True)
            return {"bundle": str(self.out / "bundle")}

        return self.stages.run("export", {"evaluate": eval_out, **({"run": run} if emergent else {})}, do)["bundle"]

    def report(self, eval_out: dict, assessment: dict | None, bundle: str | None, t_all: float,
               emergent: dict | None = None) -> None:
        from .report_html import write_run_report

        t0 = time.perf_counter()
        stage_times = {k: v.get("seconds") for k, v in self.stages.data.items()}
        write_run_report(self.out, self.run, eval_out, assessment, bundle, stage_times, self.stages.times,
                         total=time.perf_counter() - t_all, emergent=emergent)
        self.stages.times["report"] = time.perf_counter() - t0

    # ---- progressive additions -----------------------------------------------------------------
    def side_index(self, spec: str, base_index, modalities, key: str):
        """An addition's (or the queries') dataset; with `items: N`, the base's items (or N spread
        ones when it shares none): a spoken built-in is asked for N items so it synthesises no more."""
        from .data import load_dataset

        n = self.run.items
        index = load_dataset(spec, cache=self.cache, **(count_option(spec, n) if n else {}))
        _index_fields(index, modalities, key)
        return restrict_to_base(index, base_index, n) if n else index

    def to_entry(self, to: str, stores: dict) -> EncoderEntry:
        """The base's `to` encoder entry, at the layers its store holds ("auto" resolved)."""
        base = self.run.encoders[to]
        return EncoderEntry(base.spec, ",".join(stores[to]["layers"]), base.pooling)

    def addition_stores(self, base_index, stores: dict) -> dict:
        """Per addition: its modality's and its target's stores on its dataset; and the query sets'
        stores on the queries dataset (per addition encoder, the spoken text, the transcripts)."""
        added = {}
        for i, a in enumerate(self.run.add):
            index = self.side_index(a.data, base_index, (a.modality, a.to), f"add[{i}].data")
            name = f"extract.add.{slug(a.label)}"
            to = self.to_entry(a.to, stores)
            added[a.label] = {a.modality: self.extract(f"{name}.{a.modality}", a.encoder, a.encoder.layers, index),
                              a.to: self.extract(f"{name}.{a.to}", to, to.layers, index)}
        em = self.run.emergent
        qindex = self.side_index(em.queries, base_index, sorted({a.modality for a in self.run.add} | {"text"}),
                                 "emergent.queries")
        text = self.to_entry("text", stores)
        queries = {"spoken": self.extract("extract.queries.text", text, text.layers, qindex)}
        for a in self.run.add:
            queries[a.label] = self.extract(f"extract.queries.{slug(a.label)}", a.encoder, a.encoder.layers, qindex)
        if em.cascade:
            queries["cascade"] = self.cascade(qindex, stores)
        return {"additions": added, "queries": queries}

    def cascade(self, qindex, stores: dict) -> dict:
        """Whisper's transcripts of rendering 0 of the emergent folds' test items, as a text store."""
        items = sorted(self.emergent_items(stores) & set(qindex.item_ids))
        entry = self.to_entry("text", stores)
        text_entry = {"spec": entry.spec, "layers": entry.layers, "pooling": entry.pooling}

        def do():
            from .evaluate.cascade import transcript_store

            store = transcript_store(qindex, set(items), text_entry, cache=self.cache, progress=self.progress)
            return {"store": str(store.path), "layers": store.report["layers"]}

        return self.stages.run("extract.queries.cascade", {"dataset": qindex.name, "fingerprint": qindex.fingerprint,
                                                           "items": items, "text": text_entry}, do)

    def emergent_items(self, stores: dict) -> set[str]:
        """The base's test items over the emergent stage's folds (what any query is scored on)."""
        from .evaluate.emergent import split_items
        from .features import FeatureStore

        image = FeatureStore.open(stores["image"]["store"])
        return set().union(*(split_items(image, "test", f) for f in _folds(self.run.emergent.folds)))

    def emergent(self, stores: dict, added: dict) -> dict:
        """Folds x seeds x additions: the base, each addition onto it, every query set scored."""
        run, em = self.run, self.run.emergent
        recipes = {a.label: addition_recipe(run, a) for a in run.add}
        inputs = {"v": 1, "base": stores, "added": added, "recipe": [run.recipe, run.overrides, _recipe_text(run.recipe)],
                  "add_recipes": {k: [r, o, _recipe_text(r)] for k, (r, o) in recipes.items()},
                  "additions": [[a.label, a.modality, a.to] for a in run.add]}
        # the folder is keyed by all but folds and seeds: asking for another seed reuses the runs done
        folder = self.out / "emergent" / hash_obj(inputs, 12)
        return self.stages.run("emergent", {**inputs, "folds": em.folds, "seeds": em.seeds},
                               lambda: self.score_emergent(stores, added, folder))

    def score_emergent(self, stores: dict, added: dict, folder: Path) -> dict:
        from .align.recipe import load_recipe
        from .evaluate.emergent import emergent_protocol, summarise

        run, em = self.run, self.run.emergent
        folds, seeds = _folds(em.folds), [int(s) for s in em.seeds]
        records = []
        for a in run.add:  # one protocol per addition: each has its own recipe and query encoder
            setup = _emergent_setup(stores, added, a, load_recipe(run.recipe, run.overrides),
                                    load_recipe(*addition_recipe(run, a)))
            records += emergent_protocol(setup, folds, seeds, folder, progress=self.progress)
        rows = summarise(records)
        write_json(folder / "summary.json", {"rows": rows, "folds": em.folds, "seeds": em.seeds})
        first = next(r for r in records if r["addition"] == run.add[0].label)  # first fold, first seed
        return {"records": str(folder / "results.jsonl"), "summary_json": str(folder / "summary.json"),
                "summary": rows, "export_run": first["added_run"], "additions": {a.label: a.modality for a in run.add},
                "cascade": em.cascade, "folds": em.folds, "seeds": em.seeds}


def _emergent_setup(stores: dict, added: dict, a: AddEntry, recipe, add_recipe):
    """The `EmergentSetup` of one addition: the base's image and text stores, the addition's own
    pair, and the query sets (this addition's encoder on the queries, the spoken text, the base's
    captions, the transcripts), each scored against the base's images."""
    from .evaluate.emergent import Addition, EmergentSetup
    from .features import FeatureStore

    def store(out: dict):
        return FeatureStore.open(out["store"])

    pair = {m: store(s) for m, s in added["additions"][a.label].items()}
    q = added["queries"]
    queries = {a.modality: (a.modality, store(q[a.label]), 0), "spoken": ("text", store(q["spoken"]), 0),
               "text": ("text", store(stores["text"]), None)}
    if "cascade" in q:
        queries["cascade"] = ("text", store(q["cascade"]), 0)
    return EmergentSetup(recipe=recipe, base={"image": store(stores["image"]), "text": store(stores["text"])},
                         add_recipe=add_recipe, additions={a.label: Addition(a.modality, pair, to=a.to)},
                         queries=queries, emergent=a.modality)


def _folds(folds: list) -> list:
    return [None if f == "fixed" else int(f) for f in folds]


def count_option(spec: str, n: int) -> dict:
    """A built-in lister that takes a count (the spoken ones: `limit`, `size`) lists n items
    instead of all of them (each item costs a synthesis there)."""
    import inspect

    from .data import DATASETS

    if spec not in DATASETS:
        return {}
    params = inspect.signature(DATASETS.entry(spec).resolve()).parameters
    return next(({name: n} for name in ("limit", "size") if name in params), {})


def restrict_to_base(index, base_index, n: int):
    """The rows of `index` whose item the base holds; an index sharing no item with the base keeps
    n spread items of its own."""
    base_ids = set(base_index.item_ids)
    rows = [r for r, item in enumerate(index.item_ids) if item in base_ids]
    if not rows:
        return index.spread(n) if len(index) > n else index
    if len(rows) < len(base_ids):
        log.info("%s holds %d of the base's %d items", index.name, len(rows), len(base_ids))
    return index if len(rows) == len(index) else index.take(rows, f"{index.name}-of-{base_index.name}")


def _index_fields(index, modalities, key: str) -> None:
    have = set(index.fields.values())
    missing = [m for m in modalities if m not in have]
    if missing:
        raise RunFileError(f"{key}: {index.name} has no {' or '.join(missing)} field (its fields: "
                           f"{', '.join(f'{f} ({m})' for f, m in index.fields.items())})")


def _formats() -> dict:
    """The versions of what the stages write: results, trained runs, saved parts, bundles."""
    from . import saving
    from .bundle.model import BUNDLE_FORMAT
    from .evaluate.protocol import PROTOCOL_VERSION

    return {"protocol": PROTOCOL_VERSION, "saved_parts": saving.FORMAT, "bundle": BUNDLE_FORMAT}


def _recipe_text(name: str) -> str:
    from .align.recipe import load_recipe

    return json.dumps(load_recipe(name).to_dict(), sort_keys=True)
