"""PNG plots for evaluation reports: training curves, per-class scores, recall@k, sweeps.

matplotlib is imported inside each function (``import anybind.evaluate`` stays light) and
drawn with the Agg canvas on a bare ``Figure``: no pyplot state, so the caller's backend (a
notebook's, say) is left alone. Every function creates the parent folders, writes the PNG
atomically, releases its figure and returns the path.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_with
from ..errors import AnybindError, MissingDependencyError
from .results import ResultsError, summarise

log = logging.getLogger("anybind.evaluate")
RECALL_KS = (1, 5, 10)
DIRECTIONS = {"i2t": ("image → text", "image_to_text"), "t2i": ("text → image", "text_to_image")}


def plot_training_curves(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike, *,
                         val_metrics: Sequence[str] = ("mean_R@1", "mean_R@10"),
                         best_metric: str = "mean_R@10", smoothing: float | None = None) -> Path:
    """Train loss (smoothed, raw faint) and validation recall (right axis) against step.

    Reads the trainer's ``metrics.jsonl`` (``{"step", "split": "train", "loss", ...}`` and
    ``{"step", "split": "val", "mean_R@10", ...}`` lines) and marks the best validation step by
    `best_metric`. `smoothing` is the EMA weight (default: from the number of steps).

    >>> plot_training_curves("runs/default/metrics.jsonl", "report/plots/training.png")
    """
    path = Path(metrics_jsonl_path)
    train, val = read_training_log(path)
    if not train and not val:
        raise AnybindError(f"{path} has no train or val records: is it the metrics.jsonl of `anybind train`?")
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    handles = []
    if train:
        steps = [r["step"] for r in train]
        loss = [float(r["loss"]) for r in train]
        weight = smoothing if smoothing is not None else min(0.99, len(loss) / (len(loss) + 50))  # lag ~2%
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8)
        handles += ax.plot(steps, _ema(loss, weight), color="tab:blue", linewidth=1.6, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    shown = [m for m in val_metrics if any(m in r for r in val)]
    if val and not shown:  # another validation metric: show whatever recall the log has
        shown = sorted({k for r in val for k in r if k not in ("step", "split")})[:2]
    if shown:
        ax2 = ax.twinx()
        for metric, color in zip(shown, ("tab:orange", "tab:red", "tab:green", "tab:purple")):
            pts = [(r["step"], 100 * float(r[metric])) for r in val if metric in r]
            handles += ax2.plot(*zip(*pts), marker="o", markersize=3, color=color, label=f"val {metric}")
        ax2.set_ylabel("validation (%)")
        key = best_metric if any(best_metric in r for r in val) else shown[-1]
        best = max((r for r in val if key in r), key=lambda r: float(r[key]))
        ax.axvline(best["step"], color="grey", linestyle="--", linewidth=1)
        ax2.plot([best["step"]], [100 * float(best[key])], marker="*", markersize=12, color="black",
                 linestyle="none")
        handles.append(ax2.plot([], [], marker="*", color="black", linestyle="none",
                                label=f"best {key} {100 * float(best[key]):.1f}% @ step {best['step']}")[0])
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8,
              frameon=False)
    ax.set_title(path.parent.name or path.name, fontsize=9)
    return _save(fig, out_png)


def read_training_log(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """The train and val records of a trainer log, by step (the last record wins after a resume)."""
    path = Path(path)
    if not path.exists():
        raise AnybindError(f"{path} does not exist: give the metrics.jsonl that `anybind train` wrote")
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # a line cut short by a crash
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            bad += 1
        elif rec.get("split") == "train" and _finite(rec.get("loss")):
            train[rec["step"]] = rec
        elif rec.get("split") == "val":
            val[rec["step"]] = rec
    if bad:
        log.warning("%s: skipped %d unreadable line(s)", path, bad)
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def plot_per_class(per_class: Mapping[str, float], out_png: str | os.PathLike, title: str = "",
                   chance: float | None = None) -> Path:
    """Horizontal bars, one per class, best at the top, with a chance line (default 1 / classes)."""
    if not per_class:
        raise AnybindError("plot_per_class needs at least one class score")
    items = sorted(per_class.items(), key=lambda kv: (kv[1], kv[0]))  # barh draws bottom-up
    chance = 1 / len(items) if chance is None else chance
    fig = _figure(6.0, min(40.0, 0.8 + 0.2 * len(items)))
    ax = fig.add_subplot()
    ax.barh(range(len(items)), [100 * v for _, v in items], color="tab:blue", height=0.75)
    ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=7 if len(items) > 30 else 8)
    ax.set_ylim(-0.6, len(items) - 0.4)
    ax.axvline(100 * chance, color="tab:red", linestyle="--", linewidth=1, label=f"chance {100 * chance:.1f}%")
    ax.set_xlim(0, 100)
    ax.set_xlabel("score (%)")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_png)


def plot_recall_at_k(docs: Sequence[Mapping[str, Any]], out_png: str | os.PathLike,
                     ks: Sequence[int] = RECALL_KS) -> Path:
    """Recall@k (k = 1, 5, 10) per model, image → text and text → image: mean with sd error bars."""
    fig = _figure(8.0, 3.6)
    axes = fig.subplots(1, 2, sharey=True)
    drawn = 0
    for ax, (direction, (label, long)) in zip(axes, DIRECTIONS.items()):
        for i, doc in enumerate(docs):
            summary = summarise(doc)
            pts = []
            for k in ks:
                name = next((n for n in (f"retrieval/{direction}_R@{k}", f"retrieval/{long}_R@{k}")
                             if n in summary), None)
                if name:
                    pts.append((k, summary[name]))
            if not pts:
                continue
            x = [k + 0.08 * (i - (len(docs) - 1) / 2) * k for k, _ in pts]  # dodge overlapping bars
            ax.errorbar(x, [100 * s["mean"] for _, s in pts], yerr=[100 * s["sd"] for _, s in pts],
                        marker="o", markersize=4, capsize=3, label=str(doc["model"]["name"]))
            drawn += 1
        chance = next((d["chance"] for d in docs if any(f"retrieval/{direction}_R@{k}" in d.get("chance", {})
                                                         for k in ks)), {})
        cpts = [(k, chance[f"retrieval/{direction}_R@{k}"]) for k in ks if f"retrieval/{direction}_R@{k}" in chance]
        if cpts:
            ax.plot([k for k, _ in cpts], [100 * v for _, v in cpts], color="grey", linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_xticks(list(ks), [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("k")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    if not drawn:
        fig.clf()
        raise ResultsError("none of the results has retrieval recall@k (retrieval/i2t_R@k, retrieval/t2i_R@k)")
    axes[0].set_ylabel("recall@k (%)")
    labelled = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
    labelled[-1].legend(loc="best", fontsize=8, frameon=False)
    return _save(fig, out_png)


def plot_sweep(series: Mapping[str, Sequence[Mapping[str, float]]] | Sequence[Mapping[str, float]],
               out_png: str | os.PathLike, xlabel: str, ylabel: str, log_x: bool = False,
               title: str = "") -> Path:
    """Score against a swept value (e.g. number of training pairs): one line per series, ±sd band.

    >>> plot_sweep({"default": [{"value": 1000, "mean": 0.2, "sd": 0.01}, ...]}, "sweep.png",
    ...            "training pairs", "mean R@10", log_x=True)
    """
    if not isinstance(series, Mapping):
        series = {"": series}
    if not any(series.values()):
        raise AnybindError("plot_sweep needs at least one point: [{'value': x, 'mean': m, 'sd': s}, ...]")
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, points in series.items():
        pts = sorted(points, key=lambda p: p["value"])
        if not pts:
            continue
        x = [float(p["value"]) for p in pts]
        m = [float(p["mean"]) for p in pts]
        s = [float(p.get("sd", 0.0)) for p in pts]
        (line,) = ax.plot(x, m, marker="o", markersize=4, label=name or None)
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if any(series):
        ax.legend(loc="best", fontsize=8, frameon=False)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_png)


# ---- helpers -----------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plotting", "matplotlib", extra="report") from None
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str | os.PathLike) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return write_with(out, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    finally:
        fig.clf()  # a bare Figure is not registered with pyplot: clearing it frees everything


def _ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing)."""
    out, m = [], 0.0
    for i, v in enumerate(values, 1):
        m = weight * m + (1 - weight) * v
        out.append(m / (1 - weight**i) if weight < 1 else v)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
