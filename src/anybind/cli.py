"""The `anybind` command: a thin map from verbs to library functions.

Every verb parses its arguments and calls one library function; `main(argv)` takes an argument
list so tests call the CLI exactly as a shell would. Choices and help that name pluggable parts
(encoders, datasets, baselines, metrics, projectors, losses, corrections) are read from their
registries, when help is printed, so a new part shows up here without touching this file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import AnybindError

EPILOG = """examples:
  anybind encoders                                  # what encoders exist and what they need
  anybind datasets                                  # built-in datasets
  anybind extract --encoder efficientnet-lite0 --data openclipart
  anybind extract --encoder minilm-l6 --data openclipart --layers 3,final
  anybind extract --encoder hf:facebook/dinov2-small --data table:pairs.csv --layers all --pooling cls+mean
  anybind cache ls
  anybind recipes                                   # the training recipes
  anybind train --recipe structure --store image=efficientnet-lite0+openclipart --store text=minilm-l6+openclipart
  anybind eval --models default,structure,nn-transfer --tune   # built-in suite, 5 folds x 3 seeds
  anybind eval --models default --sweep n=500,1000,2000,4000,all
  anybind eval --compare evals/builtin/results/*.json --reference default
  anybind index --bundle bundles/clipart --data openclipart --out indexes/clipart
  anybind search indexes/clipart "a red bird" --k 5
  anybind serve --bundle bundles/clipart --index indexes/clipart   # web page at http://127.0.0.1:8000/
"""


# ---- registries: names and help for choices ----------------------------------------------------------
def registry_names(registry: Any) -> list[str]:
    """The names in a registry: a `Registry` (``names()``) or a plain mapping of name -> part."""
    return list(registry.names()) if hasattr(registry, "names") else sorted(registry)


def registry_entries(registry: Any) -> list[tuple[str, str]]:
    """(name, one line of help) for every part of a `Registry` or a plain mapping."""
    if hasattr(registry, "describe"):
        return [(e.name, e.help) for e in registry.describe()]
    return [(name, _first_line(registry[name])) for name in sorted(registry)]


def _first_line(part: Any) -> str:
    text = "" if isinstance(part, str) else getattr(part, "description", None) or getattr(part, "__doc__", None)
    return (text or "").strip().split("\n")[0].strip()


def check_name(kind: str, value: str, registry: Any) -> str:
    """`value` when the registry has it, else a clear error with a did-you-mean and the choices."""
    from .checks import choice

    return choice(kind, value, registry_names(registry), error=AnybindError)


def _names_help(prefix: str, registry: Any, suffix: str = "") -> str:
    return f"{prefix}{', '.join(registry_names(registry))}{suffix}"


def _encoder_help() -> str:
    from .encoders.registry import BACKENDS, PACKAGED

    return (_names_help("encoder spec: packaged ", PACKAGED, ", or ")
            + ", ".join(f"{b}:NAME" for b in registry_names(BACKENDS)) + " (`anybind encoders` lists them)")


def _dataset_help() -> str:
    from .run import dataset_forms

    builtins, prefixes = dataset_forms()
    return f"dataset: {', '.join(builtins)}, or {', '.join(p + ':PATH' for p in prefixes)}"


def _models_help() -> str:
    from .align import available_recipes
    from .align.baselines import BASELINES

    return (f"comma list of recipes ({', '.join(available_recipes())}, or YAML files) and training-free "
            + _names_help("baselines (", BASELINES, ")"))


def _metric_help() -> str:
    from .assess.metrics import METRICS

    return _names_help("alignability metric: ", METRICS, " (default mutual_knn)")


def _set_help() -> str:
    from .align.corrections import CORRECTIONS
    from .align.losses import LOSSES
    from .align.projectors import PROJECTORS

    return ("override a recipe setting, e.g. loss.structure_weight=5 or train.batch_size=2048; "
            + _names_help("projectors: ", PROJECTORS) + _names_help("; losses: ", LOSSES)
            + _names_help("; corrections: ", CORRECTIONS))


def _templates_help() -> str:
    from .evaluate.zeroshot import available_templates

    return f"zero-shot prompt templates: {', '.join(available_templates())}, or a JSON file"


def _tasks_help() -> str:
    from .evaluate.results import GROUP_ORDER

    return f"comma list, any of {', '.join(GROUP_ORDER)}"


class _Choices:
    """argparse choices read from the module that owns them, only when a value is checked or help
    is printed, so building the parser imports no torch. Give the option a metavar: without one,
    argparse lists the choices as soon as the option is added."""

    def __init__(self, load: Callable[[], Sequence[str]]):
        self._load = load

    def __iter__(self):
        return iter(self._load())

    def __contains__(self, value: object) -> bool:
        return value in self._load()


def _poolings() -> Sequence[str]:
    from .encoders import POOLINGS

    return POOLINGS


def _precisions() -> Sequence[str]:
    from .features.precision import PRECISIONS

    return PRECISIONS


def _stored_dtypes() -> Sequence[str]:
    from .features.safetensors_io import STORED_DTYPES

    return list(STORED_DTYPES)


def _index_kinds() -> Sequence[str]:
    from .serve.index import KINDS

    return KINDS


class _Parser(argparse.ArgumentParser):
    """Help given as a function is filled in only when help is printed: parsing a verb's
    arguments imports no registry (and so no torch)."""

    def format_help(self) -> str:
        for action in self._actions:
            if callable(action.help):
                action.help = action.help().replace("%", "%%")
        return super().format_help()


# ---- small parsing helpers -------------------------------------------------------------------------------
def _table(rows: list[dict], columns: Sequence[str]) -> str:
    """Plain aligned text table."""
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def side_items(items: Sequence[str] | None, flag: str) -> list[tuple[str, str]]:
    """Repeated ``SIDE=VALUE`` options (``--store image=...``) as (side, value) pairs, in order."""
    out = []
    for item in items or []:
        side, sep, value = item.partition("=")
        if not sep or not side.strip() or not value.strip():
            raise AnybindError(f"{flag} takes SIDE=VALUE (e.g. image=...), not {item!r}")
        out.append((side.strip(), value.strip()))
    return out


def per_modality(items: str | Sequence[str] | None, flag: str = "--layers") -> dict[str, str]:
    """Per-modality layer settings: ``image=8,final`` (repeatable) or ``image=8,final,text=3`` ->
    {"image": "8,final", "text": "3"}. A token with '=' starts a modality; the rest continue it."""
    out: dict[str, list[str]] = {}
    current = None
    for item in [items] if isinstance(items, str) else items or []:
        for token in (t.strip() for t in item.split(",")):
            if "=" in token:
                current, _, first = (s.strip() for s in token.partition("="))
                if not current or current in out:
                    raise AnybindError(f"{flag}: {'a modality is named twice' if current else 'no modality'} "
                                       f"in {item!r}; give MODALITY=LAYERS, e.g. image=8,final")
                out[current] = [first] if first else []
            elif current is None:
                raise AnybindError(f"{flag} takes MODALITY=LAYERS (e.g. image=8,final), not {item!r}")
            elif token:
                out[current].append(token)
    empty = [m for m, v in out.items() if not v]
    if empty:
        raise AnybindError(f"{flag}: no layers for {', '.join(empty)}: give e.g. {empty[0]}=final")
    return {m: ",".join(v) for m, v in out.items()}


def _count_or_list(text: str) -> list[int]:
    """'5' -> [0..4] (a count); '0,2' -> [0, 2] and '2,' -> [2] (a list)."""
    text = str(text).strip()
    parts = [p for p in text.split(",") if p.strip()]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise AnybindError(f"expected a count (5) or a list (0,2,4; one item: 2,), not {text!r}") from None
    if len(vals) == 1 and "," not in text:
        if vals[0] < 1:
            raise AnybindError(f"a count must be at least 1, not {vals[0]}: for only fold or seed 0 write '0,'")
        return list(range(vals[0]))
    return vals


def _device(name: str | None):
    from .device import select_device

    return select_device(name)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (0 is refused, never read as 'the default')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def listed_data(spec: str, encoding: str | None, cache):
    """`--data` as extraction reads it: the spec, or with `--encoding` the dataset listed with that
    option (an option of table: specs; another dataset refuses it by name)."""
    if not encoding:
        return spec
    from .data import load_dataset

    return load_dataset(spec, cache=cache, encoding=encoding)


# ---- verbs: encoders, data, features ---------------------------------------------------------------------
def cmd_encoders(args) -> int:
    """List packaged encoders and backends; with SPEC, load it and show its layers."""
    from .encoders import create_encoder, list_encoders

    if args.spec:
        info = create_encoder(args.spec).describe()
        if args.json:
            print(json.dumps(info, indent=1))
            return 0
        print(f"{info['spec']}  ({info['modality']}, licence {info['licence']}, poolings {', '.join(info['poolings'])})")
        print(_table([{"layer": k, "dim": v} for k, v in info["layers"].items()], ["layer", "dim"]))
        return 0
    rows = [{**r, "installed": "yes" if r["installed"] else "no"} for r in list_encoders()]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_table(rows, ["spec", "modality", "installed", "layers", "licence", "install"]))
        print("\n`anybind encoders SPEC` loads one and lists its layers and dims.")
    return 0


def cmd_datasets(args) -> int:
    """List built-in datasets and the dataset spec forms; with SPEC, list it and show a summary."""
    from .data import list_datasets, load_dataset
    from .run import dataset_forms

    if args.spec:
        index = load_dataset(args.spec, cache=args.cache, refresh=args.refresh)
        print(json.dumps(index.summary(), indent=1))
        return 0
    rows = list_datasets()
    print(json.dumps(rows, indent=1) if args.json else _table(rows, [c for c in rows[0] if c != "fields"] if rows else []))
    print("\nAlso: " + ", ".join(f"{p}:PATH" for p in dataset_forms()[1]) + " (`anybind datasets SPEC` summarises one).")
    return 0


def cmd_extract(args) -> int:
    """Run an encoder over a dataset field into the feature cache (resumable; a repeat is a cache hit)."""
    from .features import extract

    device = _device(args.device)  # checked before any work
    store = extract(
        args.encoder, listed_data(args.data, args.encoding, args.cache), field=args.field, layers=args.layers,
        pooling=args.pooling, precision=args.precision, dtype=args.dtype, batch_size=args.batch_size,
        num_workers=args.workers, shard_size=args.shard_size, cache=args.cache, out=args.out, device=device,
        progress=not args.quiet, assessment=args.assessment, engine=args.engine, actors=args.actors,
        num_gpus=args.num_gpus, ray_address=args.ray_address,
    )
    if store is None:  # a non-zero torchrun rank: its shards are written, rank 0 merges
        return 0
    r = store.report
    status = "cache hit" if r["hit"] else f"extracted in {r['seconds']:.1f}s"
    print(f"{status}: {len(store)} rows x layers {', '.join(f'{k}({v})' for k, v in store.layers.items())}, "
          f"{r['skipped']} skipped, {r['precision']} compute, {store.dtype} stored")
    print(store.path)
    return 0


def open_store(side: str, value: str, layers: str | None, cache, progress: bool, assessment=None,
               encoding: str | None = None):
    """A store folder, or ENCODER+DATASET: the cached store of that pair holding `layers`
    (extracted if missing; `encoding` is the table's text encoding)."""
    from pathlib import Path

    from .features import FeatureStore, extract
    from .features.storage import is_url

    if is_url(value) or Path(value).is_dir():
        return FeatureStore.open(value)
    encoder, sep, data = value.rpartition("+")
    if not sep or not encoder or not data:
        raise AnybindError(f"--store {side}={value}: give a store folder, or ENCODER+DATASET "
                           "(e.g. image=efficientnet-lite0+openclipart)")
    return extract(encoder, listed_data(data, encoding, cache), layers=layers or "final", assessment=assessment,
                   cache=cache, progress=progress)


def _as_source_extracted(add, value: str):
    """`--store text=DATASET` with --add: ENCODER+DATASET naming the source's own text encoder (its
    layers come from the source model; pooling and precision are checked against the source's)."""
    from pathlib import Path

    if "+" in value or Path(value).is_dir():
        return value
    encoding = add.target_encoding()
    if encoding is None:
        raise AnybindError(f"{add.source_path} does not say which encoder its {add.to} side used: "
                           f"give --store {add.to}=ENCODER+{value}")
    return f"{encoding['encoder']}+{value}"


def store_layers(side: str, store, text: str | None, assessment=None, cache=None) -> list[str] | None:
    """The canonical layers `text` names among a store's (None when no layers were given)."""
    from .features.layers import resolve_layers

    if not text:
        return None
    return resolve_layers(text, store.layers, assessment, modality=side,
                          encoder=store.key["encoder"]["spec"], cache=cache)


def cmd_assess(args) -> int:
    """Rank candidate encoders and layers by alignability on paired features, before training."""
    from .assess import assess
    from .assess.metrics import METRICS

    check_name("--metric", args.metric, METRICS)
    stores: dict[str, list] = {}
    for side, value in side_items(args.store, "--store"):
        stores.setdefault(side, []).append(open_store(side, value, "all", args.cache, not args.quiet))
    if len(stores) != 2:
        raise AnybindError("give stores for two sides, e.g. --store image=A --store image=B --store text=C")
    k = int(args.k) if str(args.k).isdigit() else args.k
    result = assess(stores, n=args.n, metric=args.metric, k=k, standardize=args.standardize, seed=args.seed,
                    out=args.out, cache=args.cache, progress=not args.quiet)
    print(result.table())
    rec = result.recommendation()["pair"]
    sides = [s for s in rec if s != "score"]
    print("\nrecommended: " + ", ".join(f"{s}={rec[s]['encoder']} layers {','.join(rec[s]['layers'])}" for s in sides)
          + f"  ({args.metric} {rec['score']:.4f})")
    print(f"report: {args.out}/ranking.md, heatmaps in {args.out}/; `--layers auto` now reads it")
    return 0


# ---- verbs: training and recipes -------------------------------------------------------------------------
def train_inputs(args, add=None) -> tuple[dict, dict | None]:
    """The stores of `anybind train` (two, or more for joint binding) and the layers each side reads
    (resolved on the store). With --add, the target may be a bare DATASET: extracted as the source
    model's target side."""
    pairs = side_items(args.store, "--store")
    if len(pairs) < 2 or len({s for s, _ in pairs}) != len(pairs):
        raise AnybindError("give two stores (or more, with a joint loss), one per modality: --store image=STORE "
                           "--store text=STORE (a store folder, or ENCODER+DATASET such as minilm-l6+openclipart)")
    texts = per_modality(args.layers or [])
    unknown = set(texts) - {s for s, _ in pairs}
    if unknown:
        raise AnybindError(f"--layers names {', '.join(sorted(unknown))}, which has no --store")
    stores, layers = {}, {}
    for side, value in pairs:
        if add is not None and side == add.to:  # the target reads what the source model reads
            value, texts[side] = _as_source_extracted(add, value), ",".join(add.source.layers_of(add.to))
        stores[side] = open_store(side, value, texts.get(side), args.cache, not args.quiet, args.assessment,
                                  args.encoding)
        chosen = store_layers(side, stores[side], texts.get(side), args.assessment, args.cache)
        if chosen:
            layers[side] = chosen
    return stores, layers or None


def cmd_train(args) -> int:
    """Train projectors that bind two feature stores into one space, with a recipe."""
    from datetime import datetime

    from .align import load_recipe
    from .align.trainer import format_result, train
    from .checks import slug
    from .tracking import check_loggers

    check_loggers(args.logger)  # a typo or a missing package before any store is extracted
    recipe = load_recipe(args.recipe, args.set)
    device = _device(args.device)
    add = _add_spec(args)
    items = _train_items(args.items)
    stores, layers = train_inputs(args, add)
    default = f"{slug(args.add)}-onto-{slug(add.to)}" if add else slug(recipe.name)
    out = args.out or f"runs/{default}-{datetime.now():%Y%m%d-%H%M%S}"
    with experiment_loggers(args, out) as loggers:
        result = train(recipe, stores, out=out, layers=layers, device=device, resume=not args.restart,
                       progress=not args.quiet, add=add, loggers=loggers, across_datasets=args.across_datasets,
                       train_items=items)
    print(format_result(result, names=(add.to, add.modality) if add else None))
    print(f"\n{result.steps} steps in {result.seconds:.0f}s"
          + (" (stopped early)" if result.stopped_early else "")
          + f"; bound model: {result.out / 'model'}; log: {result.out / 'metrics.jsonl'}")
    if add:
        print(f"{add.modality} is bound onto the frozen {add.to} space of {add.source_path} (unchanged); "
              f"ship it with: anybind export --run {result.out} --out bundles/NAME")
    return 0


def _train_items(path):
    """`--items FILE`: the item ids to train on (checked before any store is opened), or None."""
    if not path:
        return None
    from .align.curate import read_items

    return read_items(path)


def cmd_curate(args) -> int:
    """Choose n training items that cover a concept vocabulary (freeze-align's data curation).

    Each concept (--concepts: WordNet's single-word nouns attested in SemCor, or a file of one
    concept a line) is embedded by the encoder that made the caption store, at the layer it reads.
    Each train item goes to the concept most similar to one of its captions. The n items are then
    taken round-robin across concepts: each round every concept offers its next most similar item
    (at most --cap per concept) and the round is taken in order of similarity, so coverage comes
    before depth. An item whose image features have a cosine above --duplicate-cosine with one
    already taken is skipped (near-identical drawings are not both chosen). Only the train split
    (of --fold, or the index's) is a candidate. Writes OUT/items.txt (train on it with
    `anybind train --items OUT/items.txt`), OUT/coverage.json and OUT/coverage.png.

      anybind curate --store image=efficientnet-lite0+openclipart --store text=minilm-l6+openclipart --n 1000
    """
    from pathlib import Path

    from .align import curate as cur

    cur.check_selection(args.n, args.cap, args.min_similarity)  # before any store is opened
    concepts = cur.read_concepts(args.concepts)
    stores, layers = train_inputs(args)
    pool = cur.load_pool(stores, layers, fold=args.fold)
    feats = cur.embed_concepts(pool.text_store, concepts, pool.text_layer, progress=not args.quiet)
    result = cur.curate_pool(pool, concepts, feats, args.n, cap=args.cap, min_similarity=args.min_similarity,
                             duplicate_cosine=args.duplicate_cosine)
    paths = cur.write_curation(result, Path(args.out))
    r = result.report
    print(f"{r['n_selected']} of {r['pool_items']} train items over {r['concepts_covered']} of {r['concepts']} concepts "
          f"({r['concepts_in_pool']} have an item); {r['dropped_duplicates']} near-duplicates skipped")
    if r["n_selected"] < r["n_requested"]:
        print(f"fewer than the {r['n_requested']} asked for: the cap, the similarity floor or the near-duplicates "
              "left no more")
    print(_table([{"concept": c, "items": k} for c, k in list(result.per_concept.items())[:10]], ["concept", "items"]))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def _add_spec(args):
    """`--add M --to SOURCE`: progressive binding of M onto the source's space (the other store's modality)."""
    if not args.add:
        if args.to:
            raise AnybindError("--to names the model to add a modality to: give --add MODALITY with it")
        return None
    if not args.to:
        raise AnybindError(f"--add {args.add} needs --to: the bundle, run or bound-model folder to bind it into")
    from .align.frozen import AddSpec

    sides = [s for s, _ in side_items(args.store, "--store")]
    others = [s for s in sides if s != args.add]
    if args.add not in sides or len(others) != 1:
        raise AnybindError(f"--add {args.add} trains on two stores: --store {args.add}=STORE and --store "
                           "TARGET=STORE (TARGET: the source's modality it binds to, e.g. text)")
    return AddSpec.from_source(args.to, args.add, to=others[0])


def experiment_loggers(args, out):
    """`--logger` / `--logger-dir`: the experiment loggers of a run folder (default: its logs/), named
    after it; an empty list without --logger. Closes them on exit (a failure marks their run failed)."""
    from pathlib import Path

    from .tracking import open_loggers

    return open_loggers(args.logger, args.logger_dir or Path(out) / "logs", run_name=Path(out).name,
                        quiet=args.quiet)


def cmd_recipes(args) -> int:
    """List the built-in recipes, or print one (resolved, with --set overrides) as YAML."""
    from .align import available_recipes, load_recipe

    if args.name:
        import yaml

        print(yaml.safe_dump(load_recipe(args.name, args.set).to_dict(), sort_keys=False), end="")
        return 0
    rows = []
    for name in available_recipes():
        r = load_recipe(name).to_dict()
        weight = r["loss"].get("structure_weight")
        rows.append({"recipe": name, "projector": ", ".join(f"{k}: {v['name']}" for k, v in r["projector"].items()),
                     "loss": r["loss"]["name"] + (f" + STRUCTURE x{weight:g}" if weight else ""),
                     "description": " ".join(r["description"].split())[:70]})
    print(_table(rows, ["recipe", "projector", "loss", "description"]))
    return 0


# ---- verbs: evaluation -----------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    """Evaluate models on the built-in suite over group folds x seeds, compare them, or sweep a setting.

    The suite: openclipart retrieval (group folds, with a near-duplicate leakage check), zero-shot
    over curated openclipart noun classes (balanced accuracy), and a linear probe on Fashion-MNIST
    (10k/2k). Models are recipes (trained per fold and seed) or training-free baselines (the
    registered ones are listed under --models). With --tune each model first gets the same small grid,
    scored on a validation split only. Every result is logged under --out keyed by its settings,
    so an interrupted evaluation resumes and a finished one is read back instantly.
    """
    if args.logger and (args.compare or args.speech or args.sweep):
        raise AnybindError("--logger records an evaluation of --models (its settings and final results); "
                           "not --compare, --speech or --sweep")
    from .tracking import check_loggers

    check_loggers(args.logger)  # before any store is extracted
    if args.compare:
        return _eval_compare_files(args)
    if args.speech:
        return _eval_emergent(args)
    from pathlib import Path

    specs = model_specs(args.models, args.set)
    sweep = None
    if args.sweep:
        from .evaluate.sweeps import parse_sweep

        sweep = parse_sweep(args.sweep)  # checked before any store is extracted
    from .evaluate.results import check_tasks

    tasks = tuple(check_tasks(args.tasks))  # before any store is extracted
    suite, tasks = eval_suite(args, tasks)
    out = Path(args.out or "evals/builtin")
    folds, seeds = _count_or_list(args.folds), _count_or_list(args.seeds)
    if sweep:
        return _eval_sweep(args, specs, suite, sweep, out, folds, seeds, tasks)
    return _eval_models(args, specs, suite, out, folds, seeds, tasks)


def _eval_emergent(args) -> int:
    """--speech: every modality pair of image + text + audio added progressively, trained or not."""
    from pathlib import Path

    from .evaluate.emergent import emergent_protocol, format_summary, speech_setup, summarise

    if "," in args.models:
        raise AnybindError(f"--speech evaluates one recipe (--models NAME), not {args.models!r}")
    recipe = args.models
    setup = speech_setup(data=args.data or "openclipart", image=args.image, text=args.text, audio=args.audio, speech=args.speech,
                         disjoint=args.disjoint, recipe=recipe, overrides=args.set, cascade=args.cascade,
                         cache=args.cache, progress=not args.quiet)
    out = Path(args.out or "evals/speech")
    records = emergent_protocol(setup, _count_or_list(args.folds), _count_or_list(args.seeds), out,
                                progress=not args.quiet)
    rows = summarise(records)
    from .atomic import write_json

    write_json(out / "summary.json", rows)
    print(format_summary(rows))
    print(f"\nper-run records: {out / 'results.jsonl'}; summary: {out / 'summary.json'}")
    return 0


def _eval_compare_files(args) -> int:
    from .evaluate import report as rep
    from .evaluate import results as res

    docs = [res.read_results(p) for p in args.compare]
    print(rep.compare_table(docs, args.reference, args.metric))
    if args.out:
        print(f"\nreport: {rep.write_report(docs, args.out, reference=args.reference, metric=args.metric)['report']}")
    return 0


def model_specs(models: str, overrides: Sequence[str]) -> list:
    """`--models`: recipes (names or YAML files) and training-free baselines, by registry."""
    from pathlib import Path

    from .align.baselines import BASELINES
    from .evaluate.protocol import ModelSpec, baseline_spec

    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise AnybindError("--models is empty: name recipes and baselines, e.g. default,nn-transfer")
    return [baseline_spec(n) if n in BASELINES else ModelSpec(Path(n).stem, recipe=n, overrides=tuple(overrides))
            for n in names]


def eval_layers(args) -> dict[str, list[str]] | None:
    """`--layers` of `anybind eval`, canonical for the suite's encoders (auto reads the assessment)."""
    from .errors import LayerError
    from .features.layers import resolve_layers

    texts = per_modality(args.layers or [])
    specs = {"image": args.image, "text": args.text}
    unknown = set(texts) - set(specs)
    if unknown:
        raise AnybindError(f"--layers names {', '.join(sorted(unknown))}; the suite has image and text")
    out = {}
    for side, text in texts.items():
        try:  # names need no encoder; 'all', 'last' and negative indexes need its layer names
            out[side] = resolve_layers(text, None, args.assessment, modality=side, encoder=specs[side], cache=args.cache)
        except LayerError:
            from .encoders import create_encoder

            names = create_encoder(specs[side]).layer_dims
            out[side] = resolve_layers(text, names, args.assessment, modality=side, encoder=specs[side], cache=args.cache)
    return out or None


def eval_suite(args, tasks: tuple[str, ...]):
    """The suite `anybind eval` scores on (the built-in one, or the user's datasets) and the tasks
    it can run."""
    from .evaluate.suite import Suite

    layers = eval_layers(args)
    if args.data or args.zeroshot or args.probe:  # a suite of the user's datasets
        suite = Suite.from_datasets(args.image, args.text, args.data or "openclipart", zeroshot=args.zeroshot,
                                    probe=args.probe, templates=args.templates or "default", layers=layers,
                                    cache=args.cache, progress=not args.quiet)
        return suite, tuple(t for t in tasks if (t != "zeroshot" or args.zeroshot) and (t != "probe" or args.probe))
    suite = Suite.builtin(args.image, args.text, layers, cache=args.cache, probe="probe" in tasks,
                          progress=not args.quiet)
    return suite, tasks


def _eval_sweep(args, specs, suite, sweep: tuple[str, list[str]], out, folds, seeds, tasks) -> int:
    from .evaluate.sweeps import sweep_models, sweep_rows, write_sweep

    key, values = sweep
    doc = sweep_models(specs, suite, key, values, out, folds=folds, seeds=seeds, metric=args.metric, tasks=tasks,
                       progress=not args.quiet)
    paths = write_sweep(doc, out)
    print(_table(sweep_rows(doc), ["model", key, "train items", "runs", args.metric]))
    print(f"\nplot: {paths['png']}\nresults: {paths['json']}")
    return 0


def _eval_models(args, specs, suite, out, folds, seeds, tasks) -> int:
    from .evaluate import report as rep
    from .evaluate.protocol import Grid, compare_models

    with experiment_loggers(args, out) as loggers:
        loggers.log_params({"folds": list(folds), "seeds": list(seeds), "tasks": list(tasks), "tune": args.tune})
        docs = compare_models(specs, suite, out, folds=folds, seeds=seeds, grid=Grid() if args.tune else None,
                              tasks=tasks, progress=not args.quiet, loggers=loggers)
    reference = args.reference if args.reference in {d["model"]["name"] for d in docs} else None
    metric = args.metric if all(args.metric in r["metrics"] for d in docs for r in d["runs"]) else "retrieval/mean_R@10"
    print(rep.compare_table(docs, reference, metric))
    shares = [r["info"]["leakage_share"] for r in docs[0]["runs"] if "leakage_share" in r["info"]]
    if shares:
        share = max(shares)
        print(f"\nleakage: up to {share:.1%} of a test fold's images have a near-duplicate (cosine > 0.9) in train"
              + ("  WARNING: above 5%, retrieval is flattered; regroup the dataset" if share > 0.05 else ""))
    paths = rep.write_report(docs, out, reference=reference, metric=metric)
    print(f"\nresults: {out / 'results'}/*.json; report: {paths['report']}")
    return 0


def cmd_run(args) -> int:
    """Run a whole experiment from a run file: extract -> assess -> train + evaluate -> export -> report.

    The run file is checked whole first: a mistake is refused, naming its key, before any work.
    Every stage is cached (features in the cache, stage outputs in the run folder), so running the
    same file again loads no encoder, and a killed run resumes where it stopped. With no file, the
    built-in `default` run: efficientnet-lite0 + minilm-l6 on openclipart, the built-in suite.
    """
    from .run import last_invocation, load_run_file, run_pipeline
    from .tracking import check_loggers

    check_loggers(args.logger)
    run = load_run_file(args.runfile)
    if args.encoding:  # the run file's `encoding:` (checked again by run_pipeline)
        run.encoding = args.encoding
    from pathlib import Path

    from .checks import slug

    with experiment_loggers(args, args.out or Path("runs") / slug(run.name)) as loggers:
        out = run_pipeline(run, out=args.out, cache=args.cache, progress=not args.quiet, loggers=loggers)
    stages = json.loads((out / "stages.json").read_text())
    status = last_invocation(out)
    print(_table([{"stage": k, "seconds (first)": v.get("seconds"), "this run": status.get(k, "")}
                  for k, v in stages.items()], ["stage", "seconds (first)", "this run"]))
    print(f"\nreport: {out / 'report.html'} (and report.md)"
          + (f"\nbundle: {out / 'bundle'}" if (out / "bundle").exists() else ""))
    return 0
def cmd_export(args) -> int:
    """Write a trained run as a bundle: encoder specs, projectors, blend and correction, model card."""
    from .bundle import export_bundle, load

    if args.onnx:  # refuse an encoder the runtime cannot run before anything is written
        from .bundle.onnx_export import check_run_exportable

        check_run_exportable(args.run)
    out = export_bundle(args.run, args.out, results=args.results, overwrite=args.overwrite, centre=args.centre)
    model = load(out)
    encoders = ", ".join(f"{m}={v['encoder']}" for m, v in model.info["modalities"].items())
    print(f"bundle: {out}  ({encoders}; dim {model.dim})\nload it with: anybind.load({str(out)!r})")
    if args.onnx:
        from .bundle.onnx_export import export_onnx

        print(f"onnx graphs: {export_onnx(out)}\nwithout torch: anybind.runtime.load({str(out)!r})")
    return 0


def cmd_bridge(args) -> int:
    """Bridge two bound models through a modality they share: C is A's space plus B's other
    modalities, mapped into it by a map fitted on a corpus of the shared modality alone."""
    from .bundle.bridge import bridge

    made = bridge(args.a, args.b, out=args.out, via=args.via, maps=args.map, corpus=args.corpus,
                  corpus_stores=args.corpus_stores, seed=args.seed, overwrite=args.overwrite,
                  cache=args.cache, progress=not args.quiet)
    rep = made.report
    print(_table([{"map": n, "options": m["options"], **{k: f"{100 * v:.1f}" for k, v in m["val"].items()}}
                  for n, m in rep["maps"].items()], ["map", "options", "mean_R@1", "mean_R@10"]))
    print(f"\nheld-out {rep['via']} rows: {rep['corpus']['held_out_rows']} of {rep['corpus']['rows']}; chosen: "
          f"{rep['chosen']['map']} {rep['chosen']['options']}\n{'bundle' if made.is_bundle else 'bound model'}: "
          f"{made.out}  ({', '.join(made.added)} added onto {rep['via']})")
    return 0


def cmd_cache_ls(args) -> int:
    """Show the feature stores under the cache root."""
    from .features import list_stores

    rows = list_stores(args.cache)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_table(rows, ["status", "encoder", "dataset", "field", "rows", "skipped", "layers", "dtype", "size_mb", "path"]))
    return 0


def cmd_cache_rm(args) -> int:
    """Remove stores: by path, or every store matching --encoder/--data, or --partial (unfinished or damaged) ones."""
    from .features import list_stores, remove_store

    targets = list(args.paths)
    if args.encoder or args.data or args.partial or args.all:
        for row in list_stores(args.cache):
            if args.partial and not row["status"].startswith(("partial", "damaged")):
                continue
            if args.encoder and row.get("encoder") != args.encoder:
                continue
            if args.data and row.get("dataset") != args.data:
                continue
            targets.append(row["path"])
    if not targets:
        raise AnybindError("nothing to remove: give store paths, or --encoder / --data / --partial / --all")
    for t in targets:
        remove_store(t)
        print(f"removed {t}")
    return 0


def cmd_cache_verify(args) -> int:
    """Check stores in full: every shard's size and sha256 against its manifest, rows.parquet's row count.

    Prints ok or damaged per store; exits 1 when any store is damaged. With --repair a damaged
    store is reopened, so running the same `anybind extract` again recomputes only its damaged shards.
    """

    from .features.storage import as_path
    from .features.store import store_folders, verify_store

    paths = [as_path(p) for p in args.paths] or store_folders(args.cache)
    damaged = 0
    for path in paths:
        status = verify_store(path, repair=args.repair)
        word = status.split(":")[0].split(" ")[0]  # ok, damaged, unfinished or unsupported
        damaged += word == "damaged"
        print(f"{word:<11} {path}" + (f"\n            {status}" if status != word else ""), flush=True)
    print(f"{len(paths)} store(s) checked, {damaged} damaged")
    if damaged and not args.repair:
        print("repair: `anybind cache verify --repair` then the same `anybind extract` again; or `anybind cache rm PATH`")
    return 1 if damaged else 0


def cmd_index(args) -> int:
    """Embed a dataset's images with a bundle into a FAISS index (exact below 50k items; HNSW or IVF above).

    The features come from the feature cache (batched, with a progress bar, resumable; a corrupt
    image is skipped and reported), so a second index of the same data with the same encoder is fast.
    """
    from .serve.index import RECALL_QUERIES, build_index

    device = _device(args.device)  # checked before any work
    modalities = args.modality or ["image"]
    fields = _index_fields(args.field)
    data = listed_data(args.data, args.encoding, args.cache)
    idx = build_index(args.bundle, data, args.out, kind=args.kind, modality=modalities, field=fields,
                      cache=args.cache, batch_size=args.batch_size, num_workers=args.workers, device=device,
                      progress=not args.quiet, overwrite=args.overwrite)
    info = idx.info
    counts = " + ".join(f"{idx.count(m)} {m}" for m in idx.modalities)
    print(f"index: {idx.path}  ({info['kind']}, {counts} items of {info['dataset']}, dim {idx.dim}"
          + (f", correction {info['correction']} as an extra dimension" if idx.augmented else "") + ")")
    for m in idx.modalities:
        params = idx.part(m).get("params") or {}
        if "recall_at_10" in params:
            breadth = ", ".join(f"{k} {v}" for k, v in params.items() if k != "recall_at_10")
            print(f"{m}: approximate search ({breadth}), recall@10 {params['recall_at_10']:.3f} on "
                  f"{min(RECALL_QUERIES, idx.count(m))} of its own rows")
    if info.get("skipped"):
        print(f"skipped {info['skipped']} unreadable items, e.g. "
              + "; ".join(f"{s['item_id']}: {s['reason']}" for s in info["skipped_items"][:3]))
    print(f'search it: anybind search {idx.path} "a red bird"')
    return 0


def _index_fields(given: list[str] | None) -> str | dict | None:
    """`--field FIELD` (one modality) or `--field MODALITY=FIELD` (repeatable)."""
    if not given:
        return None
    if len(given) == 1 and "=" not in given[0]:
        return given[0]
    return dict(side_items(given, "--field"))


def cmd_search(args) -> int:
    """Search an index with a text query (or an image, --image, or an audio clip, --audio), encoded by
    the index's bundle; --modality picks the rows searched when the index holds several."""
    from .serve.index import search_index

    if sum(q is not None for q in (args.query, args.image, args.audio)) != 1:
        raise AnybindError('give a text query, --image PATH or --audio PATH (one of them), '
                           'e.g. anybind search INDEX "a red bird"')
    hits = search_index(args.index, text=args.query, image=args.image, audio=args.audio, k=args.k,
                        bundle=args.bundle, modality=args.modality)
    rows = hits.records()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_table([{**r, "score": f"{r['score']:.4f}"} for r in rows], ["rank", "score", "item_id", "modality", "path"]))
    return 0


def cmd_serve(args) -> int:
    """Serve a bundle over HTTP: /embed, /classify, /search (with --index), /images, /health, a web page at /."""
    from .serve.app import serve

    labels = None
    if args.labels:
        from pathlib import Path

        text = Path(args.labels).read_text() if Path(args.labels).is_file() else args.labels
        labels = [x.strip() for x in (text.splitlines() if "\n" in text.strip() else text.split(",")) if x.strip()]
    serve(args.bundle, args.index, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, labels=labels,
          log_level="warning" if args.quiet else "info", max_audio_seconds=args.max_audio_seconds,
          max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, threads=args.threads, api_key_file=args.api_key_file,
          public=args.public, cors_origins=args.cors_origin, rate_limit=args.rate_limit, access_log=args.access_log,
          shutdown_timeout=args.shutdown_timeout)
    return 0




# ---- the parser ------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", help="cache root (default $ANYBIND_CACHE or ~/.cache/anybind)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (cuda when a GPU is visible, this rank's under torchrun), cpu, cuda, cuda:N")


def _logger_help() -> str:
    from .tracking import LOGGERS

    return _names_help("also record to experiment loggers: ", LOGGERS, " (repeat it, or a comma list; pip install "
                       "'anybind[tracking]'). Local by default: TensorBoard event files, an MLflow file: store (or "
                       "MLFLOW_TRACKING_URI), W&B offline (or WANDB_MODE)")


def _add_loggers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logger", action="append", metavar="NAME", help=_logger_help)
    p.add_argument("--logger-dir", metavar="DIR", help="where the loggers write (default: the output folder's logs/)")


def _add_encoding(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoding", help="text encoding of a CSV/TSV/JSONL table dataset (default utf-8), e.g. latin-1")


def _listing_args(verb: Callable) -> None:
    p = verb("encoders", cmd_encoders, "list encoders, or show one encoder's layers")
    p.add_argument("spec", nargs="?", help="an encoder spec, e.g. minilm-l6 or hf:/path/to/model")
    p.add_argument("--json", action="store_true")

    p = verb("datasets", cmd_datasets, "list built-in datasets, or summarise one")
    p.add_argument("spec", nargs="?", help=_dataset_help)
    p.add_argument("--refresh", action="store_true", help="list the dataset again even if cached")
    p.add_argument("--json", action="store_true")

    p = verb("recipes", cmd_recipes, "list the built-in recipes, or print one")
    p.add_argument("name", nargs="?", help="a recipe name or YAML file to print, resolved")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=_set_help)


def _extract_args(verb: Callable) -> None:
    p = verb("extract", cmd_extract, "cache an encoder's features over a dataset")
    p.add_argument("--encoder", "-e", required=True, help=_encoder_help)
    p.add_argument("--data", "-d", required=True, help=_dataset_help)
    p.add_argument("--field", help="which field to encode (default: the one matching the encoder's modality)")
    p.add_argument("--layers", "-l", default="final",
                   help="comma list (7,8,final / layer.7), 'all', 'last', or 'auto' (the layer `anybind assess` recommends)")
    p.add_argument("--assessment", help="assessment.json for --layers auto (default: the latest `anybind assess`)")
    p.add_argument("--pooling", choices=_Choices(_poolings), metavar="POOLING",
                   help="token pooling: %(choices)s (default: the encoder's)")
    p.add_argument("--precision", default="auto", choices=_Choices(_precisions), metavar="PRECISION",
                   help="compute precision: %(choices)s; auto = bf16 autocast by a fixed rule (device type, "
                        "and features within cosine 0.995 of fp32 on a calibration batch)")
    p.add_argument("--dtype", default="fp16", choices=_Choices(_stored_dtypes), metavar="DTYPE",
                   help="stored dtype: %(choices)s (default fp16)")
    p.add_argument("--batch-size", "-b", type=positive_int, default=64,
                   help="items per forward pass (texts are batched by length inside each shard)")
    p.add_argument("--workers", type=int, help="decoding worker processes (default: 2 for images, 0 for text)")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="rows per shard: the unit of resumption")
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local (this process), or ray: the shards on an actor pool of a Ray cluster, the same store "
                        "bit for bit (needs anybind[scale])")
    p.add_argument("--actors", type=int, help="--engine ray: encoder actors (default: one per GPU, else per CPU)")
    p.add_argument("--num-gpus", type=float, help="--engine ray: GPUs per actor (default: 1 if the cluster has GPUs)")
    p.add_argument("--ray-address", help="--engine ray: the cluster to join (default: RAY_ADDRESS, else one on this machine, else a new one)")
    _add_encoding(p)
    p.add_argument("--out", "-o", help="store folder (default: a folder under the cache named by its key)")
    _add_device(p)

    p = verb("assess", cmd_assess, "rank encoders and layers by alignability (before training)")
    p.add_argument("--store", "-s", action="append", required=True, metavar="SIDE=STORE",
                   help="a candidate: a store folder or ENCODER+DATASET (all layers); repeat per candidate and side")
    p.add_argument("--n", type=int, default=2000, help="paired train items to score on (default 2000)")
    p.add_argument("--metric", default="mutual_knn", help=_metric_help)
    p.add_argument("--k", default="10", help="neighbours: a number, or a rule: sqrt, sturges, rice")
    p.add_argument("--standardize", action="store_true", help="standardise each dimension first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", default="assessment", help="report folder (default ./assessment)")


def _train_args(verb: Callable) -> None:
    p = verb("train", cmd_train, "train projectors that bind two stores, or N jointly (a recipe)")
    p.add_argument("--recipe", "-r", default="default", help="a built-in recipe (`anybind recipes`) or a YAML file")
    p.add_argument("--store", "-s", action="append", metavar="SIDE=STORE", required=True,
                   help="a store folder, or ENCODER+DATASET (extracted if missing); give two, e.g. "
                        "image=efficientnet-lite0+openclipart text=minilm-l6+openclipart; three or more bind "
                        "jointly with a joint loss (--recipe freeze-align --set loss.name=symile, all-pairs, "
                        "anchor-infonce): the first after the anchor is the partner, the others join its pairs")
    p.add_argument("--across-datasets", action="store_true",
                   help="join stores of different datasets that share item ids and groups, on the items they share "
                        "(e.g. images of openclipart with audio and captions of openclipart-speech:3000)")
    p.add_argument("--layers", action="append", metavar="SIDE=LAYERS",
                   help="layers a side reads: image=8,final, image=last, text=auto, or image=8,final,text=3 "
                        "(several layers need projector layermix)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=_set_help)
    p.add_argument("--out", "-o", help="run folder (default runs/RECIPE-TIME); an existing run resumes")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out and start over")
    p.add_argument("--assessment", help="assessment.json for --layers SIDE=auto (default: the latest)")
    p.add_argument("--add", metavar="MODALITY",
                   help="progressive binding: train only MODALITY's projector, onto the frozen bound space of the "
                        "model given by --to (the other --store names the modality it binds to, e.g. "
                        "--add audio --to bundles/default --store audio=whisper-tiny-en+openclipart-speech "
                        "--store text=openclipart-speech); the source is never modified")
    p.add_argument("--to", metavar="BUNDLE_OR_RUN", help="with --add: the bundle, run or bound model to extend")
    p.add_argument("--items", metavar="FILE",
                   help="train on these train-split items only: one item id a line (anybind curate's items.txt)")
    _add_encoding(p)
    _add_device(p)
    _add_loggers(p)

    p = verb("curate", cmd_curate, "choose n training items that cover a concept vocabulary (freeze-align)")
    p.add_argument("--store", "-s", action="append", metavar="SIDE=STORE", required=True,
                   help="the image store and the caption store, as for train: "
                        "image=efficientnet-lite0+openclipart text=minilm-l6+openclipart")
    p.add_argument("--n", type=int, required=True, help="how many items to choose (e.g. 1000)")
    p.add_argument("--concepts", default="wordnet",
                   help="wordnet (single-word nouns tagged in SemCor, 9,246; wordnet:0 for all 55k), or a file of "
                        "one concept a line, e.g. a dataset's class names")
    p.add_argument("--cap", type=int, help="at most this many items per concept (default: no cap; the round-robin "
                                            "already spreads n as evenly as the pool allows)")
    p.add_argument("--min-similarity", type=float,
                   help="drop items whose best caption-concept cosine is below this (default: keep all)")
    p.add_argument("--duplicate-cosine", type=float, default=0.95,
                   help="skip an item whose image-feature cosine with a chosen one exceeds this (default 0.95; "
                        "1 keeps near-duplicates)")
    p.add_argument("--fold", type=int, help="choose from this cross-validation fold's train split (default: the "
                                             "dataset index's train split, what `anybind train` uses)")
    p.add_argument("--layers", action="append", metavar="SIDE=LAYERS", help="layers a side reads (the last one is used)")
    p.add_argument("--out", "-o", default="curated", help="folder for items.txt and the coverage report (default curated/)")
    p.set_defaults(assessment=None)
    _add_encoding(p)

    p = verb("run", cmd_run, "run a whole experiment from a run file (extract, assess, train, eval, export)")
    p.add_argument("runfile", nargs="?", default="default", help="a run YAML file or a built-in name (default)")
    p.add_argument("--out", "-o", help="run folder (default runs/NAME); re-running resumes and reuses every stage")
    _add_encoding(p)
    _add_loggers(p)


def _eval_args(verb: Callable) -> None:
    p = verb("eval", cmd_eval, "evaluate, compare or sweep models on the built-in suite (folds x seeds)")
    p.add_argument("--models", "-m", default="default", help=_models_help)
    p.add_argument("--image", default="efficientnet-lite0", help="image encoder of the suite (default efficientnet-lite0)")
    p.add_argument("--text", default="minilm-l6", help="text encoder of the suite (default minilm-l6)")
    p.add_argument("--layers", action="append", metavar="SIDE=LAYERS",
                   help="layers a side reads, e.g. text=3,final or image=auto")
    p.add_argument("--assessment", help="assessment.json for --layers SIDE=auto (default: the latest)")
    p.add_argument("--data", help="a paired dataset for retrieval instead of the built-in suite (table:, wds:, karpathy:...)")
    p.add_argument("--zeroshot", help="a labelled image set for zero-shot: imagenet:DIR, folder:DIR, table:FILE")
    p.add_argument("--probe", help="a labelled image set for the linear probe (its train split fits the probe)")
    p.add_argument("--templates", help=_templates_help)
    p.add_argument("--folds", default="5", help="how many group folds (5 = folds 0-4), or a list: 0,1 (only fold 2: 2,)")
    p.add_argument("--seeds", default="3", help="how many seeds per fold (3 = seeds 0-2), or a list")
    p.add_argument("--tasks", default="retrieval,zeroshot,probe", help=_tasks_help)
    p.add_argument("--tune", action="store_true",
                   help="first pick each model's setting from the same small grid, on fold 0's validation split")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=_set_help)
    p.add_argument("--sweep", metavar="KEY=V1,V2", help="sweep n (training items; 'all') or a recipe field")
    p.add_argument("--metric", default="suite/score", help="the metric compared, tuned and swept (default suite/score)")
    p.add_argument("--reference", default="default", help="model the others are compared with (paired differences)")
    p.add_argument("--compare", nargs="+", metavar="RESULTS.json", help="only compare finished results documents")
    p.add_argument("--speech", metavar="DATASET",
                   help="emergent evaluation instead of the suite: bind image + text (--image, --text, the recipe "
                        "of --models), add audio (--audio) progressively onto the frozen text space from this "
                        "spoken dataset (e.g. openclipart-speech:3000), and rank test images by each spoken "
                        "caption never paired with images, beside the spoken text, the captions, a Whisper "
                        "cascade, training-free maps and chance, per fold and seed (emergence ratio included)")
    p.add_argument("--disjoint", metavar="DATASET",
                   help="with --speech: also add audio from a spoken dataset sharing no item (e.g. wordnet-speech)")
    p.add_argument("--audio", default="whisper-tiny-en", help="with --speech: the audio encoder (default whisper-tiny-en)")
    p.add_argument("--no-cascade", dest="cascade", action="store_false",
                   help="with --speech: skip the Whisper transcript cascade baseline")
    p.add_argument("--out", "-o", help="evaluation folder (default evals/builtin); re-running resumes")
    _add_loggers(p)


def _bundle_args(verb: Callable) -> None:
    p = verb("export", cmd_export, "write a trained run as a loadable bundle (anybind.load)")
    p.add_argument("--run", required=True, help="a finished `anybind train` run folder")
    p.add_argument("--out", "-o", required=True, help="the bundle folder to write")
    p.add_argument("--results", nargs="*", help="results documents (anybind eval) for the model card")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--onnx", action="store_true", help="also write each modality's encoder + projector as an ONNX "
                   "graph (onnx/), for the torch-free anybind.runtime")
    p.add_argument("--centre", action="store_true", help="centre each modality on its mean embedding over the "
                   "run's training split (removes the offset between modality centroids, the modality gap)")

    p = verb("index", cmd_index, "embed a dataset's images (or audio, ...) with a bundle into a search index (FAISS)")
    p.add_argument("--bundle", "-b", required=True, help="a bundle folder (anybind export)")
    p.add_argument("--data", "-d", required=True, help=_dataset_help)
    p.add_argument("--out", "-o", required=True, help="the index folder to write")
    p.add_argument("--kind", default="auto", choices=_Choices(_index_kinds), metavar="KIND",
                   help="index kind: %(choices)s; flat = exact inner product; ivf / hnsw = approximate, "
                        "for large collections, searched as broadly as a recall@10 of 0.95 on their own rows needs "
                        "(auto: flat below 50k items, hnsw above)")
    p.add_argument("--modality", action="append", metavar="MODALITY",
                   help="a modality of the bundle to index (default image); repeat it for one index of several "
                        "(--modality image --modality audio): a query searches any of them, or all")
    p.add_argument("--field", action="append", metavar="[MODALITY=]FIELD",
                   help="the dataset field to index (default: the one of that modality); MODALITY=FIELD per modality")
    p.add_argument("--batch-size", type=positive_int, default=64, help="items per forward pass")
    _add_encoding(p)
    p.add_argument("--workers", type=int, help="decoding worker processes (default: 2 for images)")
    _add_device(p)
    p.add_argument("--overwrite", action="store_true", help="replace an index built from another bundle, dataset or kind")

    p = verb("search", cmd_search, "search an index with a text (or --image, --audio) query")
    p.add_argument("index", help="an index folder (anybind index)")
    p.add_argument("query", nargs="?", help="the text to search for")
    p.add_argument("--image", help="search with this image instead of a text")
    p.add_argument("--audio", help="search with this audio file (WAV, FLAC, OGG, MP3) instead of a text")
    p.add_argument("--modality", help="search only the rows of this modality (default: every modality indexed)")
    p.add_argument("--k", "-k", type=int, default=10, help="how many results (default 10)")
    p.add_argument("--bundle", help="the bundle to encode the query (default: the one the index was built with)")
    p.add_argument("--json", action="store_true")

    p = verb("serve", cmd_serve, "serve a bundle (and an index) over HTTP with a web page")
    p.add_argument("--bundle", "-b", required=True, help="a bundle folder (anybind export)")
    p.add_argument("--index", "-i", help="an index folder (anybind index): enables /search and /images")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest accepted image or audio upload (default 10 MiB)")
    p.add_argument("--max-audio-seconds", type=float, default=30,
                   help="longest accepted audio upload (default 30 s); longer clips get a 422")
    p.add_argument("--max-batch", type=int, default=32,
                   help="concurrent requests' items encoded in one batch, at most this many (default 32; 1: no "
                        "batching, for answers byte-identical to a lone request's)")
    p.add_argument("--threads", type=int,
                   help="torch threads for the model (default: the cores less one, which HTTP and search need)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long a request may wait for others to batch with (default 2 ms; under load batches "
                        "fill while the model works, with no wait)")
    p.add_argument("--labels", help="default zero-shot labels: a comma list or a file with one per line "
                                    "(default: the classes the bundle was evaluated on)")
    _serve_access_args(p)


def _bridge_args(verb: Callable) -> None:
    p = verb("bridge", cmd_bridge, "join two bound models through a modality they share (A's space, B's other modalities added)")
    p.add_argument("a", help="A: a bundle or bound-model folder; C lives in its space")
    p.add_argument("b", help="B: a bundle or bound-model folder; its modalities other than --via are added to A")
    p.add_argument("--via", default="text", help="the modality both bind (default text): the bridge is fitted on it alone")
    p.add_argument("--out", "-o", required=True, help="C: the folder to write (a bundle when A and B are bundles)")
    p.add_argument("--map", default="auto", help="procrustes, ridge, cca, mlp, or auto (default): the best on held-out "
                                                 "corpus rows")
    p.add_argument("--corpus", help="a dataset whose --via field both bundles encode (e.g. wordnet-speech:2000)")
    p.add_argument("--corpus-stores", nargs=2, metavar=("A_STORE", "B_STORE"),
                   help="instead of --corpus: two stores of the same items, by A's and by B's encoder")
    p.add_argument("--seed", type=int, default=0, help="the MLP map's seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing C written by anybind")


def _serve_access_args(p: argparse.ArgumentParser) -> None:
    """`anybind serve`'s access control and operations flags (serve/access.py, serve/ops.py)."""
    p.add_argument("--api-key-file", help="require an API key: a file (chmod 600) with one key a line, KEY or NAME:KEY; "
                                          "clients send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
    p.add_argument("--public", help="paths open without a key, comma-separated; PREFIX* opens a subtree, /docs "
                                    "brings its assets (default: /health,/ready)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin whose pages may call the API, e.g. https://app.example.com (repeatable; * any)")
    p.add_argument("--rate-limit", help="requests per API key, else per client address: COUNT/UNIT[,burst=N], "
                                        "e.g. 10/s, 600/min or 2/s,burst=5; over it: 429 with Retry-After")
    p.add_argument("--access-log", metavar="PATH", help="JSON access lines (method, path, status, ms, client, key "
                                                        "name) to a file, or - for stderr, instead of uvicorn's")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C, seconds to let requests in flight finish (default 30)")


def _cache_args(sub) -> None:
    cache = sub.add_parser("cache", help="show or clear cached feature stores")
    csub = cache.add_subparsers(dest="cache_verb", metavar="ACTION", required=True)
    p = csub.add_parser("ls", help="list stores", description=cmd_cache_ls.__doc__)
    _add_common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_cache_ls)
    p = csub.add_parser("rm", help="remove stores", description=cmd_cache_rm.__doc__)
    _add_common(p)
    p.add_argument("paths", nargs="*", help="store folders to remove")
    p.add_argument("--encoder", help="remove every store of this encoder spec")
    p.add_argument("--data", help="remove every store of this dataset")
    p.add_argument("--partial", action="store_true", help="remove unfinished and damaged stores")
    p.add_argument("--all", action="store_true", help="remove every store")
    p.set_defaults(fn=cmd_cache_rm)
    p = csub.add_parser("verify", help="check stores' shard hashes", description=cmd_cache_verify.__doc__)
    _add_common(p)
    p.add_argument("paths", nargs="*", help="store folders to check (default: every store in the cache)")
    p.add_argument("--repair", action="store_true", help="reopen damaged stores so that extract recomputes their damaged shards")
    p.set_defaults(fn=cmd_cache_verify)


def build_parser() -> argparse.ArgumentParser:
    """The whole `anybind` parser: one sub-parser per verb, each mapped to its `cmd_` function."""
    from . import __version__

    parser = _Parser(prog="anybind", description="Bind frozen pretrained encoders into one shared embedding space.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"anybind {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=fn.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(p)
        p.set_defaults(fn=fn)
        return p

    for add in (_listing_args, _extract_args, _train_args, _eval_args, _bundle_args, _bridge_args):
        add(verb)
    _cache_args(sub)
    return parser


def _setup_logging(args) -> None:
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "sentence_transformers", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `anybind VERB ...`. Returns the exit code (0 ok, 2 a clear user-facing error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    _setup_logging(args)
    try:
        return args.fn(args)
    except AnybindError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # extraction keeps its finished shards, training its last checkpoint, eval and run their logs
        print("interrupted: the work done so far is kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
