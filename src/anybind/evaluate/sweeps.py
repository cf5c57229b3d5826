"""Sweeps: one document and one writer for `anybind eval --sweep` and a run file's `sweep_n`.

    doc = sweep_models(specs, suite, "n", [500, 1000, "all"], out, folds=[0], seeds=[0, 1])
    write_sweep(doc, out)   # sweep-n.json (schema anybind.sweep/1) + sweep-n.png

The scoring itself is `protocol.sweep` (resumable through the results log); this module only
runs it per model and writes the result the same way for every caller.

Schema ``anybind.sweep/1``::

    {"schema": "anybind.sweep/1", "key": "n", "metric": "suite/score",
     "folds": [null], "seeds": [0],            # null = the index's fixed split
     "series": {"default": [{"x": 812, "value": 1000, "train_items": 812, "runs": 1,
                             "mean": 0.41, "sd": 0.0}, ...], ...}}

``value`` is the setting as given ("all" stays "all"); ``x`` is what the plot uses: the real
number of training items for ``n``, the value as a number otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..atomic import write_json
from ..checks import slug
from ..errors import AnybindError

SCHEMA = "anybind.sweep/1"


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2,...`` -> (key, values); the form `--sweep` takes."""
    key, _, raw = str(text).partition("=")
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not key.strip() or not values:
        raise AnybindError("--sweep takes KEY=V1,V2,... e.g. n=500,1000,2000,all or loss.structure_weight=0,1,10")
    return key.strip(), values


def sweep_models(specs: Sequence, suite, key: str, values: Sequence, out: str | os.PathLike, *,
                 folds: Sequence = (0,), seeds: Sequence[int] = (0,), metric: str = "suite/score",
                 tasks: Sequence[str] = ("retrieval", "zeroshot", "probe"), progress: bool = True) -> dict:
    """Score every model spec at every value of `key` (`protocol.sweep`); the sweep document."""
    from .protocol import sweep

    values = [_setting(v) for v in values]
    series = {}
    for spec in specs:
        points = sweep(spec, suite, key, values, out, folds=folds, seeds=seeds, metric=metric,
                       tasks=tasks, progress=progress)
        series[spec.name] = [_point(key, p) for p in points]
    return {"schema": SCHEMA, "key": key, "metric": metric, "folds": _plain(folds), "seeds": _plain(seeds),
            "series": series}


def _setting(value):
    """'1000' (from the command line) and 1000 (from a run file) are the same setting."""
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else value


def _point(key: str, p: dict) -> dict:
    x = p["train_items"] if key == "n" else float(p["value"])
    return {"x": x, "value": p["value"], "train_items": p["train_items"], "runs": p["n_runs"],
            "mean": p["mean"], "sd": p["sd"]}


def _plain(values: Iterable) -> list:
    return [None if v is None else int(v) for v in values]


def sweep_path(out: str | os.PathLike, key: str) -> Path:
    return Path(out) / f"sweep-{slug(key)}.json"


def plot_series(doc: dict) -> dict[str, list[dict]]:
    """The document's series in the form `plots.plot_sweep` draws ({value: x, mean, sd})."""
    return {name: [{"value": p["x"], "mean": p["mean"], "sd": p["sd"]} for p in points]
            for name, points in doc["series"].items()}


def write_sweep(doc: dict, out: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """Write ``sweep-KEY.json`` (and its plot, ``sweep-KEY.png``) under `out`; their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(sweep_path(out, doc["key"]), doc)}
    if plot:
        from .plots import plot_sweep

        key = doc["key"]
        paths["png"] = plot_sweep(plot_series(doc), out / f"sweep-{slug(key)}.png",
                                  xlabel="training items" if key == "n" else key, ylabel=doc["metric"],
                                  log_x=key == "n")
    return paths


def sweep_rows(doc: dict) -> list[dict]:
    """One row per (model, value) for a printed table."""
    key, metric = doc["key"], doc["metric"]
    return [{"model": name, key: p["value"], "train items": p["train_items"], "runs": p["runs"],
             metric: f"{100 * p['mean']:.1f} ± {100 * p['sd']:.1f}"}
            for name, points in doc["series"].items() for p in points]
