"""The results file of `anybind eval`: one JSON document per evaluated model, versioned.

Schema ``anybind.eval/1``::

    {"schema": "anybind.eval/1",
     "created": "2025-01-31T12:00:00+00:00",                 # ISO-8601, UTC
     "versions": {"anybind": "0.1.0", "torch": "2.4.0", "numpy": "2.1.0", "python": "3.11.9"},
     "model": {"name": "default", "kind": "trained" | "baseline" | "chance",
               "recipe": {...the resolved recipe...} | null, "settings": {...free-form...}},
     "data": {"dataset": "openclipart", "dataset_fingerprint": "...",
              "stores": {"image": {"spec": "...", "layers": ["final"], "path": "..."}, ...}},
     "protocol": {"folds": [0, 1, 2, 3, 4], "seeds": [0, 1, 2], "description": "..."},
     "runs": [{"fold": 0, "seed": 0,
               "metrics": {"retrieval/mean_R@10": 0.41, "zeroshot/top1": 0.37, ...},
               "per_class": {"zeroshot": {"cat": 0.5, ...}},
               "info": {"best_step": 300, "seconds": 12.5, ...}}, ...],
     "chance": {"retrieval/mean_R@10": 0.02, ...},
     "reference": {"majority": {"zeroshot/top1": 0.1, ...}},    # optional
     "summary": {"retrieval/mean_R@10": {"mean": ..., "sd": ..., "n": ..., "min": ..., "max": ...}}}

Metric names are flat, ``group/name``: ``retrieval/i2t_R@1``, ``retrieval/t2i_R@10``,
``retrieval/mean_R@10``, ``zeroshot/balanced_accuracy``, ``zeroshot/top1``,
``probe/fashion-mnist/projected_accuracy``. Values are fractions in [0, 1] and must be finite.
A run is one (fold, seed); a model that needs no training (a training-free baseline) has one
run per fold with seed -1. ``summary`` is derived: `write_results` recomputes it, and so does
`read_results`. Recognised ``info`` keys: ``metrics_jsonl`` (the trainer's log, for the
training-curve plot of the report); everything else is free-form.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..checks import choice, integer
from ..errors import AnybindError

SCHEMA = "anybind.eval/1"
MODEL_KINDS = ("trained", "baseline", "chance")
REQUIRED = ("schema", "created", "versions", "model", "data", "protocol", "runs", "chance")
GROUP_ORDER = ("retrieval", "zeroshot", "probe")
TASKS = GROUP_ORDER  # the suite's tasks, in report order


def check_tasks(tasks, what: str = "--tasks", error: type[Exception] = AnybindError) -> list[str]:
    """Task names checked against the suite's (did-you-mean on a typo); none at all is refused."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip()]
    if not names:
        raise error(f"{what} names no task: choose from {', '.join(TASKS)}")
    for name in names:
        choice(f"{what} entry", name, TASKS, error=error)
    return names
DIRECTION_ORDER = {"i2t": 0, "image_to_text": 0, "t2i": 1, "text_to_image": 1, "mean": 2}


class ResultsError(AnybindError, ValueError):
    """A results document that is malformed, of another schema version, or cannot be compared."""


# ---- building a document ---------------------------------------------------------------------------
def new_results(model: Mapping[str, Any], data: Mapping[str, Any], protocol: Mapping[str, Any], *,
                chance: Mapping[str, float] | None = None,
                reference: Mapping[str, Mapping[str, float]] | None = None) -> dict:
    """An empty results document for one model: schema, creation time and package versions filled.

    >>> doc = new_results({"name": "default", "kind": "trained"}, {"dataset": "openclipart"},
    ...                   {"folds": [0, 1, 2, 3, 4], "seeds": [0, 1, 2]})
    >>> add_run(doc, fold=0, seed=0, metrics={"retrieval/mean_R@10": 0.41})
    """
    model = {"recipe": None, "settings": {}, **model}
    data = {"dataset_fingerprint": "", "stores": {}, **data}
    protocol = {"description": "", **protocol}
    doc = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "versions": package_versions(), "model": model, "data": data, "protocol": protocol,
           "runs": [], "chance": dict(chance or {})}
    if reference:
        doc["reference"] = {name: dict(values) for name, values in reference.items()}
    _check_model(doc["model"], "the new document")
    _check_keys(doc["data"], ("dataset",), "data", "the new document")
    _check_keys(doc["protocol"], ("folds", "seeds"), "protocol", "the new document")
    _check_metrics(doc["chance"], "chance", "the new document")
    for name, values in doc.get("reference", {}).items():
        _check_metrics(values, f"reference {name!r}", "the new document")
    return doc


def package_versions() -> dict[str, str]:
    """Versions of anybind, torch, numpy and python ("unknown" for a package that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("anybind", "torch", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    out["python"] = platform.python_version()
    return out


def add_run(doc: dict, fold: int, seed: int, metrics: Mapping[str, float],
            per_class: Mapping[str, Mapping[str, float]] | None = None,
            info: Mapping[str, Any] | None = None) -> dict:
    """Append one (fold, seed) run to the document and return it; seed -1 = no seed (training-free)."""
    where = f"the run fold={fold} seed={seed}"
    if any(r["fold"] == fold and r["seed"] == seed for r in doc["runs"]):
        raise ResultsError(f"{where} is already in the results of {doc['model']['name']!r}: "
                           "each (fold, seed) is evaluated once; remove the old run first")
    run = {"fold": _int(fold, "fold", where), "seed": _int(seed, "seed", where),
           "metrics": _floats(metrics, f"metrics of {where}"),
           "per_class": {t: _floats(cls, f"per_class[{t!r}] of {where}") for t, cls in (per_class or {}).items()},
           "info": dict(info or {})}
    _check_metrics(run["metrics"], f"metrics of {where}", "the document")
    for task, values in run["per_class"].items():
        _check_metrics(values, f"per_class[{task!r}] of {where}", "the document")
    doc["runs"].append(run)
    return run


# ---- summaries and comparisons ---------------------------------------------------------------------
def summarise(doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per metric over the runs that report it: mean, sample sd (ddof=1; 0.0 for one run), n, min, max."""
    values: dict[str, list[float]] = {}
    for run in doc["runs"]:
        for name, v in run["metrics"].items():
            values.setdefault(name, []).append(float(v))
    out = {}
    for name in sorted(values, key=metric_sort_key):
        mean, sd = mean_sd(values[name])
        out[name] = {"mean": mean, "sd": sd, "n": len(values[name]),
                     "min": min(values[name]), "max": max(values[name])}
    return out


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 when there is one value)."""
    n = len(xs)
    mean = math.fsum(xs) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def per_class_means(doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per task and class, the mean over the runs that report it."""
    acc: dict[str, dict[str, list[float]]] = {}
    for run in doc["runs"]:
        for task, classes in run.get("per_class", {}).items():
            for cls, v in classes.items():
                acc.setdefault(task, {}).setdefault(cls, []).append(float(v))
    return {task: {c: math.fsum(v) / len(v) for c, v in classes.items()} for task, classes in acc.items()}


def metric_sort_key(name: str) -> tuple:
    """Retrieval first (i2t, t2i, mean; by k), then zero-shot, then probes, then anything else."""
    group, _, rest = name.partition("/")
    g = GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)
    direction, sep, k = rest.rpartition("_R@")
    if group == "retrieval" and sep and k.isdigit():
        return (g, 0, DIRECTION_ORDER.get(direction, 3), int(k), rest)
    return (g, 1, 0, 0, rest)


def is_seed_free(doc: Mapping[str, Any]) -> bool:
    """True when the runs do not vary with seed: all seeds -1 (no seed) or all seeds 0."""
    seeds = {run["seed"] for run in doc["runs"]}
    return seeds == {-1} or seeds == {0}


def paired_difference(doc_a: Mapping[str, Any], doc_b: Mapping[str, Any], metric: str,
                      confidence: float = 0.95) -> dict[str, Any]:
    """Mean of the paired differences a - b of one metric, with a t confidence interval.

    Runs are paired by (fold, seed). A document whose runs do not vary with seed (seed -1, or
    seed 0 only; `is_seed_free`) is paired by fold alone: its value for a fold is reused for
    every seed of the other document. Both must come from the same dataset index. Interval: mean +- t_{(1+c)/2, n-1} * sd / sqrt(n).
    Runs on the same fold share a test set, so with several seeds per fold the pairs are not
    independent and the interval is somewhat narrower than it should be: ``"folds"`` holds the
    same interval over the per-fold mean differences (one value per fold, n = the folds; None with
    fewer than 2 folds), the honest one when the test sets are what varies.

    >>> paired_difference(trained, procrustes, "retrieval/mean_R@10")["low"] > 0
    """
    if not 0 < confidence < 1:
        raise ResultsError(f"confidence must be between 0 and 1 (e.g. 0.95), not {confidence!r}")
    fa, fb = (d.get("data", {}).get("dataset_fingerprint") for d in (doc_a, doc_b))
    if fa and fb and fa != fb:
        raise ResultsError(f"{_name(doc_a)} and {_name(doc_b)} were evaluated on different data (dataset "
                           f"fingerprints {fa} and {fb}): runs can only be paired on the same dataset index")
    a, b = _values(doc_a, metric), _values(doc_b, metric)
    free_a, free_b = is_seed_free(doc_a), is_seed_free(doc_b)
    fold_a = {f: v for (f, _), v in a.items()}  # one run per fold when seed-free
    fold_b = {f: v for (f, _), v in b.items()}
    if free_a and not free_b:  # a's fold value against every seed of b
        keyed = [(f, s, fold_a.get(f), vb) for (f, s), vb in sorted(b.items())]
    elif free_b:  # b's fold value against every run of a (both seed-free: pairing by fold)
        keyed = [(f, s, va, fold_b.get(f)) for (f, s), va in sorted(a.items())]
    else:
        keyed = [(f, s, va, b.get((f, s))) for (f, s), va in sorted(a.items())]
    pairs = [{"fold": f, "seed": s, "a": va, "b": vb, "diff": va - vb}
             for f, s, va, vb in keyed if va is not None and vb is not None]
    n = len(pairs)
    if n < 2:
        raise ResultsError(
            f"only {n} run(s) of {_name(doc_a)} and {_name(doc_b)} match by (fold, seed) with "
            f"{metric!r} ({len(a)} and {len(b)} runs report it): a paired comparison needs at least 2; "
            "evaluate both on the same folds and seeds")
    by_fold: dict[int, list[float]] = {}
    for p in pairs:
        by_fold.setdefault(p["fold"], []).append(p["diff"])
    fold_means = [sum(v) / len(v) for _, v in sorted(by_fold.items())]
    folds = t_interval(fold_means, confidence) if len(fold_means) >= 2 else None
    return {**t_interval([p["diff"] for p in pairs], confidence), "confidence": confidence, "pairs": pairs,
            "folds": folds}


def t_interval(xs: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample sd, n and the t interval mean +- t_{(1+c)/2, n-1} sd / sqrt(n) of >= 2 values."""
    if len(xs) < 2:
        raise ResultsError(f"a t interval needs at least 2 values, got {len(xs)}")
    mean, sd = mean_sd(xs)
    half = t_quantile((1 + confidence) / 2, len(xs) - 1) * sd / math.sqrt(len(xs))
    return {"mean": mean, "sd": sd, "n": len(xs), "low": mean - half, "high": mean + half}


# two-sided 95%: t_{0.975, df} for df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def t_quantile(p: float, df: int) -> float:
    """Student t quantile; scipy when installed, else a table for p = 0.975 (1.96 beyond df 30)."""
    try:
        from scipy.stats import t
    except ImportError:
        if abs(p - 0.975) > 1e-9:
            raise ResultsError(f"a {2 * p - 1:.0%} interval needs scipy (pip install scipy); "
                               "without it only 95% intervals are available") from None
        return _T975[df - 1] if df <= len(_T975) else 1.96
    return float(t.ppf(p, df))


# ---- reading and writing ---------------------------------------------------------------------------
def write_results(doc: dict, path: str | os.PathLike) -> Path:
    """Validate, add the summary under "summary", and write atomically (`anybind.atomic`)."""
    path = Path(path)
    validate(doc, str(path))
    doc["summary"] = summarise(doc)
    text = json.dumps(doc, indent=1, allow_nan=False, default=_json_default) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, text)


def read_results(path: str | os.PathLike) -> dict:
    """Read and validate a results file; the summary is recomputed from the runs."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file; run `anybind eval` to write one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON ({e}): write it again with `anybind eval`") from None
    validate(doc, str(path))
    doc["summary"] = summarise(doc)
    return doc


def validate(doc: Any, source: str = "the results document") -> None:
    """Raise ResultsError naming `source` and the problem when `doc` does not follow the schema."""
    if not isinstance(doc, dict):
        raise ResultsError(f"{source}: a results document is a JSON object, not {type(doc).__name__}")
    schema = doc.get("schema")
    if schema != SCHEMA:
        if isinstance(schema, str) and schema.startswith("anybind.eval/"):
            raise ResultsError(f"{source} has schema {schema!r}, this anybind reads {SCHEMA!r}: "
                               "use the anybind version that wrote it, or evaluate again")
        raise ResultsError(f"{source} is not an anybind results file (schema {schema!r}, expected {SCHEMA!r})")
    _check_keys(doc, REQUIRED, "the document", source)
    _check_model(doc["model"], source)
    _check_keys(doc["data"], ("dataset",), "data", source)
    _check_keys(doc["protocol"], ("folds", "seeds"), "protocol", source)
    if not isinstance(doc["runs"], list):
        raise ResultsError(f"{source}: 'runs' must be a list of runs")
    seen = set()
    for i, run in enumerate(doc["runs"]):
        _check_keys(run, ("fold", "seed", "metrics"), f"run {i}", source)
        where = f"run {i} (fold={run['fold']}, seed={run['seed']})"
        _int(run["fold"], "fold", f"{source}: {where}")
        _int(run["seed"], "seed", f"{source}: {where}")
        if (run["fold"], run["seed"]) in seen:
            raise ResultsError(f"{source}: {where} appears twice: each (fold, seed) is evaluated once")
        seen.add((run["fold"], run["seed"]))
        _check_metrics(run["metrics"], f"metrics of {where}", source)
        for task, values in (run.get("per_class") or {}).items():
            _check_metrics(values, f"per_class[{task!r}] of {where}", source)
    _check_metrics(doc["chance"], "chance", source)
    for name, values in (doc.get("reference") or {}).items():
        _check_metrics(values, f"reference {name!r}", source)


def _check_keys(obj: Any, keys: tuple[str, ...], what: str, source: str) -> None:
    if not isinstance(obj, dict):
        raise ResultsError(f"{source}: {what} must be a JSON object, not {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ResultsError(f"{source}: {what} lacks the key(s) {', '.join(map(repr, missing))} "
                           f"(schema {SCHEMA}); write it with anybind.evaluate.results")


def _check_model(model: Any, source: str) -> None:
    _check_keys(model, ("name", "kind"), "model", source)
    if model["kind"] not in MODEL_KINDS:
        raise ResultsError(f"{source}: model kind {model['kind']!r} is not one of {', '.join(MODEL_KINDS)}")


def _check_metrics(values: Any, what: str, source: str) -> None:
    if not isinstance(values, dict):
        raise ResultsError(f"{source}: {what} must map metric names to numbers, not {type(values).__name__}")
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ResultsError(f"{source}: {what} has {name} = {v!r}; every metric value must be a finite "
                               "number (a NaN usually means an empty split or a diverged model)")


def _floats(values: Mapping[str, Any], what: str) -> dict[str, float]:
    """Plain floats (numpy and torch scalars included), or a ResultsError naming the bad value."""
    out = {}
    for name, v in values.items():
        try:
            if isinstance(v, (bool, str)):
                raise TypeError
            out[str(name)] = float(v)
        except (TypeError, ValueError):
            raise ResultsError(f"{what}: {name} = {v!r} is not a number") from None
    return out


def _json_default(obj: Any) -> Any:
    """numpy / torch scalars and arrays, paths: what free-form "info" often holds."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _int(value: Any, what: str, where: str) -> int:
    return integer(f"{where}: {what}", value, error=ResultsError)


def _values(doc: Mapping[str, Any], metric: str) -> dict[tuple[int, int], float]:
    return {(r["fold"], r["seed"]): float(r["metrics"][metric]) for r in doc["runs"] if metric in r["metrics"]}


def _name(doc: Mapping[str, Any]) -> str:
    return repr(doc.get("model", {}).get("name", "?"))
