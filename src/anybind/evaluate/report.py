"""Markdown tables and the report folder of `anybind eval`, from results documents (see results.py).

Cells are "mean ± sd" over runs in percent (metrics are fractions); the best mean of a column
is bold. With a reference model, a second table gives the paired difference reference − model
over matched runs with its t interval.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..checks import slug
from ..errors import MissingDependencyError
from .results import ResultsError, metric_sort_key, paired_difference, per_class_means, summarise

log = logging.getLogger("anybind.evaluate")
DEFAULT_METRIC = "retrieval/mean_R@10"


def markdown_table(docs: Sequence[Mapping[str, Any]], metrics: list[str] | None = None,
                   chance: bool = True) -> str:
    """One row per model, one column per metric ("mean ± sd" in %), best mean bold, then chance.

    `metrics` defaults to those every document reports, retrieval first, then zero-shot, then
    probes. With `chance`, the chance row (and any reference baselines such as the majority
    class) come from the first document that has them.

    >>> print(markdown_table([read_results("a.json"), read_results("b.json")]))
    """
    docs = list(docs)
    if not docs:
        raise ResultsError("markdown_table needs at least one results document")
    sums = [_summary(d) for d in docs]
    if metrics is None:
        metrics = sorted(set(sums[0]).intersection(*sums[1:]), key=metric_sort_key)
        if not metrics:
            raise ResultsError("the results share no metric: name the metrics to show (metrics=[...])")
    best = {m: max((s[m]["mean"] for s in sums if m in s), default=None) for m in metrics}
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for doc, summary in zip(docs, sums):
        cells = []
        for m in metrics:
            if m not in summary:
                cells.append("–")
                continue
            text = _pct(summary[m]["mean"])  # one run has no spread to show
            if summary[m]["n"] > 1:
                text += f" ± {_pct(summary[m]['sd'])}"
            bold = len(docs) > 1 and summary[m]["mean"] >= best[m] - 1e-12
            cells.append(f"**{text}**" if bold else text)
        lines.append(f"| {_cell(doc['model']['name'])} | " + " | ".join(cells) + " |")
    if chance:
        ref = next((d["chance"] for d in docs if d.get("chance")), None)
        if ref:
            lines.append("| *chance* | " + " | ".join(_pct(ref[m]) if m in ref else "–" for m in metrics) + " |")
        for name, values in next((d["reference"] for d in docs if d.get("reference")), {}).items():
            lines.append(f"| *{_cell(name)}* | " + " | ".join(_pct(values[m]) if m in values else "–"
                                                            for m in metrics) + " |")
    runs = ", ".join(f"{_cell(d['model']['name'])} {len(d['runs'])}" for d in docs)
    lines.append("")
    lines.append(f"Mean ± sample sd over runs (folds × seeds), in %"
                 f"{'; the best mean per column in bold' if len(docs) > 1 else ''}. n runs: {runs}.")
    return "\n".join(lines)


def compare_table(docs: Sequence[Mapping[str, Any]], baseline_of_interest: str | None = None,
                  metric: str = DEFAULT_METRIC, *, metrics: list[str] | None = None,
                  confidence: float = 0.95) -> str:
    """The side-by-side table; with a model name, also reference − each other model on `metric`.

    The differences are paired by (fold, seed) (`paired_difference`), in percentage points, with
    a t interval; ▲ marks an interval above zero (the reference is better), ▼ one below zero.

    >>> print(compare_table(docs, "default", "retrieval/mean_R@10"))
    """
    docs = list(docs)
    table = markdown_table(docs, metrics)
    if baseline_of_interest is None:
        return table
    names = [d["model"]["name"] for d in docs]
    if baseline_of_interest not in names:
        raise ResultsError(f"no results for the model {baseline_of_interest!r} to compare against: "
                           f"the models are {', '.join(map(repr, names))}")
    ref = docs[names.index(baseline_of_interest)]
    level = f"{confidence:.0%}"
    lines = ["", f"Paired differences in {metric} ({_cell(baseline_of_interest)} − model, percentage "
             f"points; runs matched by fold and seed, or by fold for a model without seeds; {level} t interval):", "",
             f"| {_cell(baseline_of_interest)} − model | Δ mean | sd | n | {level} interval | "
             f"folds | {level} interval over fold means | |",
             "|---|---:|---:|---:|---|---:|---|---|"]
    for doc in docs:
        if doc is ref:
            continue
        name = _cell(doc["model"]["name"])
        try:
            d = paired_difference(ref, doc, metric, confidence)
        except ResultsError as e:
            log.info("no paired comparison with %s: %s", name, e)
            lines.append(f"| {name} | – | – | – | – | – | – | not comparable: {_cell(e)} |")
            continue
        f = d["folds"]
        by_fold = f"{f['n']} | [{_pp(f['low'])}, {_pp(f['high'])}]" if f else f"{len({p['fold'] for p in d['pairs']})} | –"
        mark = "▲ above 0" if d["low"] > 0 else "▼ below 0" if d["high"] < 0 else ""
        lines.append(f"| {name} | {_pp(d['mean'])} | {_pct(d['sd'])} | {d['n']} | "
                     f"[{_pp(d['low'])}, {_pp(d['high'])}] | {by_fold} | {mark} |")
    lines += ["", "▲: the whole interval over runs is above zero (the reference is better); ▼: below zero. "
              "Runs of one fold share its test set, so the interval over the per-fold means is the wider, "
              "more honest one when there are several seeds per fold."]
    return table + "\n" + "\n".join(lines)


def per_class_table(docs: Sequence[Mapping[str, Any]], task: str) -> str:
    """Classes x models (mean over runs, %), sorted by the first model that reports the task."""
    means = [per_class_means(d).get(task, {}) for d in docs]
    order_by = next((m for m in means if m), {})
    classes = sorted({c for m in means for c in m}, key=lambda c: (-order_by.get(c, -1.0), c))
    shown = [(d, m) for d, m in zip(docs, means) if m]
    lines = ["| class | " + " | ".join(_cell(d["model"]["name"]) for d, _ in shown) + " |",
             "|---|" + "---:|" * len(shown)]
    for c in classes:
        lines.append(f"| {_cell(c)} | " + " | ".join(_pct(m[c]) if c in m else "–" for _, m in shown) + " |")
    return "\n".join(lines)


def write_report(doc_or_docs: Mapping[str, Any] | Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                 reference: str | None = None, metric: str = DEFAULT_METRIC, metrics: list[str] | None = None,
                 training_logs: Mapping[str, str | os.PathLike] | None = None) -> dict[str, Path]:
    """Write report.md and its plots (under plots/) for one or several results documents.

    `reference` names the model the others are compared against (paired differences on
    `metric`). Training curves come from `training_logs` (model name → metrics.jsonl) or from
    a run's ``info["metrics_jsonl"]``. Returns the paths written: "report", "recall_at_k",
    "per_class/<model>/<task>", "training/<model>". Without matplotlib the report has no plots.

    >>> write_report([read_results("default.json"), read_results("procrustes.json")], "report/",
    ...              reference="default")["report"]
    """
    docs = [doc_or_docs] if isinstance(doc_or_docs, Mapping) else list(doc_or_docs)
    if not docs:
        raise ResultsError("write_report needs at least one results document")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    try:
        paths.update(_plots(docs, out, training_logs or {}))
    except MissingDependencyError as e:
        log.warning("no plots in the report: %s", e)
    report = out / "report.md"
    write_text(report, _report_text(docs, out, paths, reference, metric, metrics))
    return {"report": report, **paths}


# ---- the report's parts ------------------------------------------------------------------------------
def _plots(docs: list[Mapping[str, Any]], out: Path, training_logs: Mapping[str, Any]) -> dict[str, Path]:
    from .plots import plot_per_class, plot_recall_at_k, plot_training_curves

    plots = out / "plots"
    paths: dict[str, Path] = {}
    if any(k.startswith("retrieval/") and "_R@" in k for d in docs for r in d["runs"] for k in r["metrics"]):
        try:
            paths["recall_at_k"] = plot_recall_at_k(docs, plots / "recall_at_k.png")
        except ResultsError as e:  # retrieval metrics other than i2t/t2i recall@k
            log.info("no recall@k plot: %s", e)
    for doc in docs:
        name = str(doc["model"]["name"])
        for task, values in per_class_means(doc).items():
            if values:
                paths[f"per_class/{name}/{task}"] = plot_per_class(
                    values, plots / f"per-class-{slug(name)}-{slug(task)}.png", title=f"{name}: {task}")
        log_path = training_logs.get(name) or next(
            (r["info"]["metrics_jsonl"] for r in doc["runs"] if (r.get("info") or {}).get("metrics_jsonl")), None)
        if log_path and Path(log_path).exists():
            paths[f"training/{name}"] = plot_training_curves(log_path, plots / f"training-{slug(name)}.png")
    return paths


def _report_text(docs: list[Mapping[str, Any]], out: Path, paths: Mapping[str, Path], reference: str | None,
                 metric: str, metrics: list[str] | None) -> str:
    names = [str(d["model"]["name"]) for d in docs]
    first = docs[0]
    versions = ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items())
    parts = [f"# Evaluation: {', '.join(names)}", "",
             f"Results schema {first['schema']}, created {first['created']} ({versions}).", "",
             "## Models", "", "| model | kind | recipe | settings | runs |", "|---|---|---|---|---:|"]
    for d in docs:
        m = d["model"]
        recipe = m.get("recipe")
        recipe_name = (recipe.get("name") or "(unnamed)") if isinstance(recipe, Mapping) else "–"
        settings = f"`{json.dumps(m.get('settings') or {}, sort_keys=True)}`" if m.get("settings") else "–"
        parts.append(f"| {_cell(m['name'])} | {m['kind']} | {_cell(recipe_name)} | {_cell(settings)} | {len(d['runs'])} |")

    parts += ["", "## Data", ""]
    datas = {json.dumps(d["data"], sort_keys=True): d for d in docs}
    fingerprints = {d["data"].get("dataset_fingerprint") for d in docs}
    if len({d["data"]["dataset"] for d in docs}) > 1 or len(fingerprints - {"", None}) > 1:
        parts += ["**Warning: the models were evaluated on different data; the comparison is not paired.**", ""]
    for d in datas.values():
        data = d["data"]
        who = "" if len(datas) == 1 else f" ({_cell(d['model']['name'])})"
        parts.append(f"Dataset **{_cell(data['dataset'])}**{who}, fingerprint `{data.get('dataset_fingerprint') or '–'}`.")
        if data.get("stores"):
            parts += ["", "| modality | encoder | layers | store |", "|---|---|---|---|"]
            for modality, store in data["stores"].items():
                parts.append(f"| {_cell(modality)} | `{_cell(store.get('spec', '?'))}` | "
                             f"{', '.join(store.get('layers', []))} | `{_cell(store.get('path', ''))}` |")
        parts.append("")

    p = first["protocol"]
    parts += ["## Protocol", "", f"Folds {_list(p['folds'])}, seeds {_list(p['seeds'])}."
              + (f" {p['description']}" if p.get("description") else "")]
    if any(d["protocol"].get("folds") != p["folds"] or d["protocol"].get("seeds") != p["seeds"] for d in docs):
        parts.append("Not every model followed the same folds and seeds: " + "; ".join(
            f"{_cell(d['model']['name'])} folds {_list(d['protocol']['folds'])}, seeds {_list(d['protocol']['seeds'])}"
            for d in docs) + ".")

    parts += ["", "## Results", "", compare_table(docs, reference, metric, metrics=metrics)]
    if "recall_at_k" in paths:
        parts += ["", f"![recall@k]({_rel(paths['recall_at_k'], out)})"]

    tasks = sorted({t for d in docs for t in per_class_means(d)})
    if tasks:
        parts += ["", "## Per class"]
        for task in tasks:
            parts += ["", f"### {task}", "", per_class_table(docs, task)]
            for name in names:
                png = paths.get(f"per_class/{name}/{task}")
                if png:
                    parts += ["", f"![{_cell(name)}: {task}]({_rel(png, out)})"]

    curves = [(name, paths[f"training/{name}"]) for name in names if f"training/{name}" in paths]
    if curves:
        parts += ["", "## Training"]
        for name, png in curves:
            parts += ["", f"![training {_cell(name)}]({_rel(png, out)})"]
    return "\n".join(parts) + "\n"


# ---- formatting --------------------------------------------------------------------------------------
def _summary(doc: Mapping[str, Any]) -> dict:
    return summarise(doc)  # never a stale "summary": runs may have been added since


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}"


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _list(xs: Any) -> str:
    return ", ".join(map(str, xs)) if isinstance(xs, (list, tuple)) else str(xs)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
