"""Which neighbourhood size predicts zero-shot? A rule for `--layers auto` fitted on one encoder, checked on another.

`benchmarks/assess_predicts.py` found mutual k-NN at k = 10 predicts trained retrieval well
(rho +0.88) and zero-shot less well (+0.68): on dinov2-s-focus it picks a middle layer (8)
whose zero-shot is 5-6 points below the later layers'. Zero-shot sorts images into a few dozen
coarse classes, retrieval finds one item among hundreds: the hypothesis is that zero-shot follows
agreement of *coarser* neighbourhoods, i.e. mutual k-NN at a larger k.

1. mutual k-NN (and CKNNA) at k = 10 ... 400 for every candidate of `assess_predicts.py`
   (efficientnet-lite0 layers 12/14/16/final and dinov2-s-focus layers 6/8/10/final, each against
   minilm-l6 and mpnet-base `final`), on 2,000 paired openclipart train items of the full stores;
2. the trained scores are the ones `assess_predicts.py` measured (default recipe, 3 seeds, fold 0
   test; `benchmarks/results/builtin/assess/candidates.json`), not re-trained here;
3. the rule is fitted on efficientnet-lite0 only: the k whose layer ranking agrees best with the
   trained zero-shot ranking (mean Spearman over its two text encoders), then checked on
   dinov2-s-focus, which took no part in the choice: does its pick land within one seed-sd of the
   best zero-shot layer, and what does it cost retrieval?

    ANYBIND_CACHE=... .venv/bin/python benchmarks/assess_zeroshot.py --out benchmarks/results/assess_zeroshot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from anybind.assess.layers import layer_pair_scores
from anybind.assess.rank import paired_rows
from anybind.data import load_dataset
from anybind.data.openclipart_classes import CURATED_CLASSES
from anybind.evaluate.suite import encode_texts
from anybind.evaluate.zeroshot import fill_template, load_templates
from anybind.features import extract

CANDIDATES = Path(__file__).parent / "results" / "builtin" / "assess" / "candidates.json"
KS = (10, 20, 50, 100, 200, 400)
METRICS = ("mutual_knn", "cknna")
TASKS = ("zeroshot/balanced_accuracy", "retrieval/mean_recall")


def spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def score_candidates(rows: list[dict], n: int) -> None:
    """Add `scores[metric@k]` to every candidate row, from the full openclipart stores."""
    index = load_dataset("openclipart")
    images = sorted({r["image"] for r in rows})
    texts = sorted({r["text"] for r in rows})
    stores = {s: extract(s, index, layers="all", progress=True) for s in images}
    stores.update({s: extract(s, index, layers=["final"], progress=True) for s in texts})
    for img in images:
        layers = [r["layer"] for r in rows if r["image"] == img and r["text"] == texts[0]]
        for txt in texts:
            ra, rb = paired_rows(stores[img], stores[txt], n, 0)
            xs = [stores[img][lay].read(ra) for lay in layers]
            ys = [stores[txt]["final"].read(rb)]
            classes = prompt_classes(stores[txt], ys[0])
            for lay, x in zip(layers, xs):
                row = next(r for r in rows if (r["image"], r["layer"], r["text"]) == (img, lay, txt))
                row.setdefault("scores", {}).update(linear_scores(x, ys[0]))
                row["scores"].update(prompt_class_scores(x, *classes))
            for metric in METRICS:
                for k in KS:
                    col = layer_pair_scores(xs, ys, metric=metric, k=k)[:, 0]
                    for lay, v in zip(layers, col):
                        row = next(r for r in rows if (r["image"], r["layer"], r["text"]) == (img, lay, txt))
                        row.setdefault("scores", {})[f"{metric}@{k}"] = float(v)
            print(f"scored {img} x {txt}", flush=True)


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    return a - a.mean(0)


def _ridge_cv(x: np.ndarray, t: np.ndarray, folds: int = 5, alpha: float = 0.1) -> np.ndarray:
    """Held-out predictions of t from x: ridge (penalty alpha x mean eigenvalue), `folds`-fold."""
    pred = np.zeros_like(t)
    part = np.arange(len(x)) % folds
    for f in range(folds):
        tr, te = part != f, part == f
        g = x[tr].T @ x[tr]
        lam = alpha * np.trace(g) / len(g)
        w = np.linalg.solve(g + lam * np.eye(len(g)), x[tr].T @ t[tr])
        pred[te] = x[te] @ w
    return pred


def _kmeans(y: np.ndarray, c: int, seed: int = 0, iters: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cent = y[rng.choice(len(y), c, replace=False)]
    for _ in range(iters):
        lab = np.argmax(y @ cent.T - 0.5 * (cent ** 2).sum(1), axis=1)
        cent = np.stack([y[lab == j].mean(0) if np.any(lab == j) else cent[j] for j in range(c)])
    return lab


def linear_scores(x, y) -> dict[str, float]:
    """Label-free scores of how *linearly* the image layer predicts the text (5-fold, held out):
    R^2 of the text embedding, image->text R@10 within each held-out fold through the ridge map,
    and balanced accuracy of predicting the caption's k-means cluster (C = 10, 30: coarse
    text-defined classes, what zero-shot sorts images into)."""
    x, y = _unit(x), _unit(y)
    pred = _ridge_cv(x, y)
    out = {"linear_r2": float(1 - ((pred - y) ** 2).sum() / (y ** 2).sum())}
    part = np.arange(len(x)) % 5
    hits = []
    for f in range(5):
        p, t = _unit(pred[part == f]), _unit(y[part == f])
        s = p @ t.T
        hits.append((s > np.diag(s)[:, None]).sum(1) < 10)
    out["linear_R@10"] = float(np.concatenate(hits).mean())
    for c in (10, 30):
        lab = _kmeans(y / np.linalg.norm(y, axis=1, keepdims=True).clip(1e-12), c)
        guess = np.argmax(_ridge_cv(x, np.eye(c)[lab]), axis=1)
        out[f"text_clusters@{c}"] = float(np.mean([np.mean(guess[lab == j] == j) for j in np.unique(lab)]))
    return out


def prompt_classes(text_store, y, keep: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels from the zero-shot task's own class prompts, in the text encoder's space: each
    caption's nearest class (templates averaged, as zero-shot does); the `keep` share of captions
    nearest to their class are kept. Needs only class names, which any zero-shot user has."""
    prompts = [fill_template(t, c) for c in CURATED_CLASSES for t in load_templates("clipart")]
    p = encode_texts(text_store, ["final"], prompts)[0].double().numpy()
    p = p.reshape(len(CURATED_CLASSES), -1, p.shape[1])
    p = p / np.linalg.norm(p, axis=2, keepdims=True)
    cls = p.mean(1) / np.linalg.norm(p.mean(1), axis=1, keepdims=True)
    yn = np.asarray(y, dtype=np.float64)
    sims = (yn / np.linalg.norm(yn, axis=1, keepdims=True)) @ cls.T
    lab, best = sims.argmax(1), sims.max(1)
    rows = np.flatnonzero(best >= np.quantile(best, 1 - keep))
    return rows, lab[rows]


def prompt_class_scores(x, rows: np.ndarray, lab: np.ndarray) -> dict[str, float]:
    """How well the image layer sorts images into the prompt-defined classes: held-out balanced
    accuracy of a ridge classifier, and the k-NN (k 10) majority vote's."""
    x = _unit(np.asarray(x)[rows])
    classes = np.unique(lab)
    onehot = (lab[:, None] == classes[None]).astype(np.float64)
    guess = classes[np.argmax(_ridge_cv(x, onehot), axis=1)]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)
    nn = np.argsort(-s, axis=1)[:, :10]
    vote = classes[np.argmax(onehot[nn].sum(1), axis=1)]
    bal = lambda g: float(np.mean([np.mean(g[lab == c] == c) for c in classes]))  # noqa: E731
    return {"prompt_classes_linear": bal(guess), "prompt_classes_knn": bal(vote)}


def groups(rows: list[dict], image: str) -> list[list[dict]]:
    texts = sorted({r["text"] for r in rows})
    return [[r for r in rows if r["image"] == image and r["text"] == t] for t in texts]


def layer_agreement(rows: list[dict], image: str, key: str, task: str) -> float:
    """Mean Spearman, over the text encoders, between a score and the trained task across layers."""
    return float(np.mean([spearman([r["scores"][key] for r in g], [r["trained"][task][0] for r in g])
                          for g in groups(rows, image)]))


def pick_report(rows: list[dict], image: str, key: str) -> list[str]:
    """The layer `key` picks for each text encoder, and its trained scores against the best layer's."""
    out = []
    for g in groups(rows, image):
        pick = max(g, key=lambda r: r["scores"][key])
        cells = []
        for task in TASKS:
            best = max(g, key=lambda r: r["trained"][task][0])
            ok = pick["trained"][task][0] >= best["trained"][task][0] - best["trained"][task][1]
            cells.append(f"{task.split('/')[0]} {100 * pick['trained'][task][0]:.1f} (best {best['layer']} "
                         f"{100 * best['trained'][task][0]:.1f}±{100 * best['trained'][task][1]:.1f}, "
                         f"{'within' if ok else 'NOT within'} one sd)")
        out.append(f"  {image} x {g[0]['text']}: picks {pick['layer']}: " + "; ".join(cells))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="assess_zeroshot")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--fit", default="efficientnet-lite0", help="the image encoder the rule is fitted on")
    args = ap.parse_args()
    rows = json.loads(CANDIDATES.read_text())
    score_candidates(rows, args.n)
    check = next(r["image"] for r in rows if r["image"] != args.fit)
    keys = [f"{m}@{k}" for m in METRICS for k in KS] + ["linear_r2", "linear_R@10", "text_clusters@10",
                                                         "text_clusters@30", "prompt_classes_linear",
                                                         "prompt_classes_knn"]
    table = {key: {img: {t: layer_agreement(rows, img, key, t) for t in TASKS} for img in (args.fit, check)}
             for key in keys}
    print(f"\nmean within-encoder Spearman (layers vs trained score), fitted on {args.fit}, checked on {check}")
    print(f"{'score':18s}" + "".join(f"{img[:14] + ' ' + t.split('/')[0][:9]:>28s}"
                                    for img in (args.fit, check) for t in TASKS))
    for key in keys:
        print(f"{key:18s}" + "".join(f"{table[key][img][t]:>+28.2f}" for img in (args.fit, check) for t in TASKS))
    chosen = max(keys, key=lambda key: table[key][args.fit][TASKS[0]])  # the first of a tie: the list's order
    print(f"\nrule fitted on {args.fit} zero-shot: {chosen}")
    report = [f"picks of mutual_knn@10 (today's --layers auto) and of {chosen}:"]
    for key in dict.fromkeys(("mutual_knn@10", chosen)):
        report.append(f" {key}")
        for img in (args.fit, check):
            report += pick_report(rows, img, key)
    print("\n".join(report))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates.json").write_text(json.dumps(rows, indent=1))
    (out / "agreement.json").write_text(json.dumps({"fit": args.fit, "check": check, "chosen": chosen,
                                                    "agreement": table, "picks": report}, indent=1))


if __name__ == "__main__":
    main()
