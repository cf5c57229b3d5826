"""The report of `anybind run`: report.md and a self-contained report.html (images inlined).

Order: what was run (encoders, data, recipe, versions, stage times), the results table with
baselines and chance, training curves, the layer heatmap, recall@k, per-class accuracy, the
data-efficiency curve when asked, and where the bundle is.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from .atomic import write_json, write_text

HEADLINE_METRICS = ["retrieval/mean_R@1", "retrieval/mean_R@10", "retrieval/mean_recall", "zeroshot/balanced_accuracy",
                    "zeroshot/top1", "probe/top1", "suite/score"]


def write_run_report(out: Path, run, eval_out: dict, assessment: dict | None, bundle: str | None,
                     stage_seconds: dict, this_time: dict, total: float) -> dict[str, Path]:
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
    md += ["## The bundle", ""]
    if bundle:
        md += [f"`{bundle}` — load it with `anybind.load({str(bundle)!r})`; model card: `{bundle}/card.md`.", ""]
    else:
        md += ["(export disabled in the run file)", ""]
    text = "\n".join(md)
    write_text(out / "report.md", text)
    write_text(out / "report.html", markdown_to_html(text, out, title=f"anybind run: {run.name}"))
    write_json(out / "report.json", {"results": eval_out["results"], "bundle": bundle,
                                     "stage_seconds": stage_seconds, "this_run": this_time})
    return {"md": out / "report.md", "html": out / "report.html"}


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
