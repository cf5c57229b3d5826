"""The report of `anybind run`: report.md and a self-contained report.html (images inlined).

Order: what was run (encoders, data, recipe, versions, stage times), the results table with
baselines and chance, training curves, the layer heatmap, recall@k, per-class accuracy, the
data-efficiency curve when asked, the emergent pairs of progressive additions (every query set
against the images, trained pairs beside emergent ones) when there are some, and where the
bundle is.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

from .atomic import write_json, write_text

HEADLINE_METRICS = ["retrieval/mean_R@1", "retrieval/mean_R@10", "retrieval/mean_recall", "zeroshot/balanced_accuracy",
                    "zeroshot/top1", "probe/top1", "suite/score"]


def write_run_report(out: Path, run, eval_out: dict, assessment: dict | None, bundle: str | None,
                     stage_seconds: dict, this_time: dict, total: float, emergent: dict | None = None) -> dict[str, Path]:
    from .evaluate import report as rep
    from .evaluate.plots import plot_sweep
    from .evaluate.results import package_versions, read_results

    docs = [read_results(p) for p in eval_out["results"]]
    paths = rep.write_report(docs, out / "eval", reference=docs[0]["model"]["name"], metric="suite/score")
    md: list[str] = [f"# anybind run: {run.name}", "", run.description.strip(), "", "## What was run", ""]
    md += ["| | |", "|---|---|", f"| data | `{run.data}` |"]
    for m, e in run.encoders.items():
        layers = ", ".join(docs[0]["data"]["stores"][m]["layers"]) if m in docs[0]["data"]["stores"] else e.layers
        md.append(f"| {m} encoder | `{e.spec}` (layers {layers}{', pooling ' + e.pooling if e.pooling else ''}) |")
    md.append(f"| recipe | `{run.recipe}`{' with ' + ', '.join(f'`{o}`' for o in run.overrides) if run.overrides else ''} |")
    md.append(f"| evaluation | {docs[0]['protocol'].get('description', '')}; folds {docs[0]['protocol']['folds']}, "
              f"seeds {docs[0]['protocol']['seeds']} |")
    md.append("| versions | " + ", ".join(f"{k} {v}" for k, v in package_versions().items()) + " |")
    md += ["", "Stage times (seconds; 0 = cached this time):", "", "| stage | first computed | this run |", "|---|---|---|"]
    for name, secs in stage_seconds.items():
        md.append(f"| {name} | {secs} | {this_time.get(name, 0.0):.1f} |")
    md += [f"| **total** | | {total:.1f} |", ""]
    present = set.intersection(*[set(r["metrics"]) for d in docs for r in d["runs"]])
    md += ["## Results", "", rep.markdown_table(docs, [m for m in HEADLINE_METRICS if m in present] or None), ""]
    imgs: list[tuple[str, Path]] = []
    for key in sorted(k for k in paths if k.startswith("training/")):
        imgs.append(("Training curves", paths[key]))
    if assessment:
        heat = sorted((Path(assessment["assessment"]).parent).glob("heatmap-*.png"))
        if heat:
            imgs.append(("Layer x layer alignability (the assessment)", heat[0]))
    if "recall_at_k" in paths:
        imgs.append(("Recall@k", paths["recall_at_k"]))
    for key in sorted(k for k in paths if k.startswith("per_class/")):
        imgs.append((f"Per-class accuracy ({key.split('/', 1)[1]})", paths[key]))
    if eval_out.get("sweep"):
        png = plot_sweep({docs[0]["model"]["name"]: eval_out["sweep"]}, out / "eval" / "plots" / "sweep-n.png",
                         xlabel="training items", ylabel="suite/score", log_x=True)
        imgs.append(("Data efficiency", png))
    for title, p in imgs:
        md += [f"## {title}", "", f"![{title}]({Path(p).relative_to(out).as_posix()})", ""]
    if emergent:
        md += emergent_section(emergent, out)
    md += ["## The bundle", ""]
    if bundle:
        md += [f"`{bundle}` — load it with `anybind.load({str(bundle)!r})`; model card: `{bundle}/card.md`.", ""]
    else:
        md += ["(export disabled in the run file)", ""]
    text = "\n".join(md)
    write_text(out / "report.md", text)
    write_text(out / "report.html", markdown_to_html(text, out, title=f"anybind run: {run.name}"))
    write_json(out / "report.json", {"results": eval_out["results"], "bundle": bundle,
                                     "stage_seconds": stage_seconds, "this_run": this_time,
                                     **({"emergent": emergent["summary"]} if emergent else {})})
    return {"md": out / "report.md", "html": out / "report.html"}


# ---- the emergent stage: every query set against the base's images -----------------------------------
def pair_kind(query: str, modality: str) -> str:
    """Whether a query set's pair with images was trained, or emerges through the text space."""
    if query == modality:
        return f"emergent ({modality} was bound to text only)"
    if query.startswith("map: "):
        return f"emergent, training-free {query[5:]} map of {modality} onto text"
    return {"text": "trained (image-text, the base's captions)",
            "spoken": "trained (image-text, the text that was spoken)",
            "cascade": "cascade (Whisper transcript, then the text side)"}.get(query, "trained")


def _cell(row: dict, key: str) -> str:
    """'mean ± sd (chance c)' in percent, or a dash when the row has no such key."""
    if key not in row:
        return "–"
    (mean, sd), chance = row[key], row.get(f"chance {key}")
    text = f"{100 * mean:.1f} ± {100 * sd:.1f}"
    return text + (f" ({100 * chance[0]:.1f})" if chance else "")


def _ratio(row: dict, key: str) -> str:
    if f"ratio {key}" not in row:
        return ""
    mean, sd = row[f"ratio {key}"]
    return "–" if math.isnan(mean) else f"{mean:.2f} ± {sd:.2f}"


def emergent_table(emergent: dict) -> list[str]:
    """Markdown rows: per addition and query set, query -> image and image -> query R@1/R@10 (mean ±
    sd over folds x seeds, chance in brackets) and the emergence ratio."""
    head = ["addition", "query set", "pair with images", "q→image R@1", "q→image R@10", "image→q R@1",
            "image→q R@10", "ratio q→image R@10"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in emergent["summary"]:
        modality = emergent["additions"].get(row["addition"], "")
        q, g = _metric_name(row, modality), "image"
        cells = [_cell(row, f"{q}_to_{g}_R@1"), _cell(row, f"{q}_to_{g}_R@10"), _cell(row, f"{g}_to_{q}_R@1"),
                 _cell(row, f"{g}_to_{q}_R@10"), _ratio(row, f"{q}_to_{g}_R@10")]
        md.append(f"| {row['addition']} | {row['query']} | {pair_kind(row['query'], modality)} | "
                  + " | ".join(cells) + " |")
    return md


def _metric_name(row: dict, modality: str) -> str:
    """The name a row's metrics carry: its query set's, or (a training-free map scoring the new
    modality's queries) the modality's."""
    return row["query"] if any(k.startswith(f"{row['query']}_to_") for k in row) else modality


def emergent_section(emergent: dict, out: Path) -> list[str]:
    n = emergent["summary"][0]["n"] if emergent["summary"] else 0
    md = ["## Emergent pairs (progressive additions)", "",
          f"Each addition is bound onto the base's text space, never paired with images; every query set "
          f"is scored against the base's test images (folds {emergent['folds']}, seeds {emergent['seeds']}: "
          f"{n} runs each). Recall in percent, mean ± sd, chance in brackets; the emergence ratio is the "
          "new modality's recall over that of the text that was spoken.", ""]
    md += emergent_table(emergent) + [""]
    png = plot_emergent(emergent, out / "emergent" / "query-to-image-R10.png")
    if png is not None:
        md += [f"![query → image R@10]({png.relative_to(out).as_posix()})", ""]
    return md


def plot_emergent(emergent: dict, out_png: Path) -> Path | None:
    """Bars of query -> image R@10 per query set, one group per addition (sd as error bars,
    chance as a tick)."""
    from .evaluate.plots import _figure, _save  # the report's other plots are drawn the same way

    rows = [{**r, "key": f"{_metric_name(r, emergent['additions'].get(r['addition'], ''))}_to_image_R@10"}
            for r in emergent["summary"]]
    rows = [r for r in rows if r["key"] in r]
    if not rows:
        return None
    labels = list(dict.fromkeys(r["addition"] for r in rows))
    queries = list(dict.fromkeys(r["query"] for r in rows))
    fig = _figure(1.6 + 1.2 * len(labels) * len(queries) / 2, 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(queries)
    for j, q in enumerate(queries):
        pts = [(i, r) for i, lab in enumerate(labels) for r in rows if r["addition"] == lab and r["query"] == q]
        xs = [i + (j - (len(queries) - 1) / 2) * width for i, _ in pts]
        ax.bar(xs, [100 * r[r["key"]][0] for _, r in pts], width, yerr=[100 * r[r["key"]][1] for _, r in pts],
               label=q, capsize=3)
        ax.plot(xs, [100 * r[f"chance {r['key']}"][0] for _, r in pts], linestyle="none", marker="_",
                markersize=12, color="black")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("query → image R@10 (%)")
    ax.legend(fontsize=8, frameon=False, title="query set (—: chance)", title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out_png)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.tbl{overflow-x:auto}img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:0 3px}"""


def markdown_to_html(text: str, base: Path, title: str) -> str:
    """The small Markdown subset the reports use (headings, tables, images, paragraphs, code, bold)."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r if c)]
            out.append("<div class='tbl'><table>")
            for j, r in enumerate(body):
                tag = "th" if j == 0 else "td"
                out.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in r) + "</tr>")
            out.append("</table></div>")
            continue
        elif m := re.fullmatch(r"!\[(.*?)\]\((.*?)\)", line.strip()):
            p = base / m.group(2)
            if p.exists():
                data = base64.b64encode(p.read_bytes()).decode()
                out.append(f"<p><img alt='{html.escape(m.group(1))}' src='data:image/png;base64,{data}'></p>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out)


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<i>\1</i>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)
