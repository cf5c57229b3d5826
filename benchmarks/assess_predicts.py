"""Does the assessment predict trained quality? Spearman rank correlation, with bootstrap intervals.

For ~16 candidates (an image encoder layer x a text encoder: efficientnet-lite0 and dinov2-s-focus
at several layers, against minilm-l6 and mpnet-base `final`) on the evenly spread 2,600-item
openclipart subset:

1. every alignability metric of `anybind.assess` on 2,000 paired train items (before training);
2. the `default` recipe trained on that candidate, 3 seeds, scored on the built-in suite's
   openclipart tasks (retrieval mean recall, zero-shot balanced accuracy) on group fold 0's test;
3. Spearman's rho between each metric and each trained score over the candidates, with a 95%
   bootstrap interval (candidates resampled with replacement);
4. `--layers auto`: the layer the assessment recommends per image encoder, and whether its trained
   score is within one seed-sd of the best layer's.

    ANYBIND_CACHE=... .venv/bin/python benchmarks/assess_predicts.py --out /tmp/predicts

Needs the spread-2600 stores with every layer (`anybind extract --layers all` on
``load_dataset("openclipart").spread(2600)``); training results are logged and resumable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from anybind.assess.layers import layer_pair_scores
from anybind.assess.metrics import METRICS
from anybind.assess.rank import paired_rows
from anybind.data import load_dataset
from anybind.data.openclipart_classes import CURATED_CLASSES, curated_class
from anybind.evaluate.protocol import ModelSpec, run_model
from anybind.evaluate.suite import Suite
from anybind.features import extract

IMAGE = {"efficientnet-lite0": ["layer.12", "layer.14", "layer.16", "final"],
         "dinov2-s-focus": ["layer.6", "layer.8", "layer.10", "final"]}
TEXT = ["minilm-l6", "mpnet-base"]
TARGETS = ("retrieval/mean_recall", "zeroshot/balanced_accuracy")


def spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def bootstrap(x, y, n=2000, seed=0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x), np.asarray(y)
    vals = []
    for _ in range(n):
        i = rng.integers(0, len(x), len(x))
        if len(np.unique(x[i])) > 2 and len(np.unique(y[i])) > 2:
            vals.append(spearman(x[i], y[i]))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="predicts")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    out = Path(args.out)
    index = load_dataset("openclipart").spread(2600)
    stores = {s: extract(s, index, layers="all", progress=False) for s in [*IMAGE, *TEXT]}
    rows = []
    for img, layers in IMAGE.items():
        for txt in TEXT:
            a, b = stores[img], stores[txt]
            ra, rb = paired_rows(a, b, args.n, 0)
            xs = [a[lay].read(ra) for lay in layers]
            ys = [b["final"].read(rb)]
            metric_scores = {m: layer_pair_scores(xs, ys, metric=m, k=10)[:, 0] for m in METRICS}
            for li, lay in enumerate(layers):
                suite = Suite(a, b, {"image": [lay], "text": ["final"]}, class_names=CURATED_CLASSES,
                              zeroshot_labels=lambda ids: [curated_class(i) for i in ids], templates="clipart")
                doc = run_model(ModelSpec("default", recipe="default"), suite, folds=[0], seeds=range(args.seeds),
                                out=out, tasks=("retrieval", "zeroshot"), progress=False)
                trained = {t: [r["metrics"][t] for r in doc["runs"]] for t in TARGETS}
                rows.append({"image": img, "layer": lay, "text": txt,
                             "metrics": {m: float(v[li]) for m, v in metric_scores.items()},
                             "trained": {t: (float(np.mean(v)), float(np.std(v, ddof=1))) for t, v in trained.items()}})
                print(f"{img:20s} {lay:9s} {txt:11s} mkNN {rows[-1]['metrics']['mutual_knn']:.3f}  "
                      + "  ".join(f"{t.split('/')[1]} {100 * m:.1f}±{100 * s:.1f}" for t, (m, s) in rows[-1]["trained"].items()),
                      flush=True)
    (out / "candidates.json").write_text(json.dumps(rows, indent=1))
    print(f"\nSpearman rho over {len(rows)} candidates (95% bootstrap interval):")
    print(f"{'metric':14s}" + "".join(f"{t:>40s}" for t in TARGETS))
    table = {}
    for m in METRICS:
        x = [r["metrics"][m] for r in rows]
        cells = []
        for t in TARGETS:
            y = [r["trained"][t][0] for r in rows]
            rho, (lo, hi) = spearman(x, y), bootstrap(x, y)
            table[(m, t)] = (rho, lo, hi)
            cells.append(f"{rho:+.2f} [{lo:+.2f}, {hi:+.2f}]")
        print(f"{m:14s}" + "".join(f"{c:>40s}" for c in cells))
    print("\n--layers auto (mutual_knn's best layer per image encoder, each text encoder):")
    for img in IMAGE:
        for txt in TEXT:
            cands = [r for r in rows if r["image"] == img and r["text"] == txt]
            auto = max(cands, key=lambda r: r["metrics"]["mutual_knn"])
            for t in TARGETS:
                best = max(cands, key=lambda r: r["trained"][t][0])
                ok = auto["trained"][t][0] >= best["trained"][t][0] - best["trained"][t][1]
                print(f"  {img} x {txt} {t}: auto {auto['layer']} {100 * auto['trained'][t][0]:.1f}; best {best['layer']} "
                      f"{100 * best['trained'][t][0]:.1f}±{100 * best['trained'][t][1]:.1f} -> "
                      f"{'within one sd' if ok else 'NOT within one sd'}")
    (out / "spearman.json").write_text(json.dumps({f"{m}|{t}": v for (m, t), v in table.items()}, indent=1))


if __name__ == "__main__":
    main()
