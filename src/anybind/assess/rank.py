"""Rank candidate encoders and layers by how alignable they are, before any training.

Every candidate store of one side is scored against every candidate of the other on the same
n paired training items, for every layer pair at once; the pairs are ranked by their best layer
pair, a heatmap of layer x layer scores is drawn per pair, and the recommendation (which
encoder, which layer) is written where `--layers auto` finds it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_json, write_text, write_with
from ..errors import AnybindError
from ..features import FeatureStore
from ..features.layers import ASSESSMENT_FILE, latest_assessment_path

log = logging.getLogger("anybind.assess")


@dataclass
class PairScore:
    """One candidate pair: the layer x layer score matrix and its best cell."""

    a: FeatureStore
    b: FeatureStore
    layers_a: list[str]
    layers_b: list[str]
    scores: np.ndarray
    n: int
    seconds: float

    @property
    def best(self) -> tuple[str, str, float]:
        i, j = np.unravel_index(int(np.argmax(self.scores)), self.scores.shape)
        return self.layers_a[i], self.layers_b[j], float(self.scores[i, j])

    @property
    def final(self) -> float | None:
        if "final" in self.layers_a and "final" in self.layers_b:
            return float(self.scores[self.layers_a.index("final"), self.layers_b.index("final")])
        return None

    def as_dict(self) -> dict:
        la, lb, s = self.best
        return {"a": {"encoder": self.a.key["encoder"]["spec"], "store": str(self.a.path), "layers": self.layers_a},
                "b": {"encoder": self.b.key["encoder"]["spec"], "store": str(self.b.path), "layers": self.layers_b},
                "best": {"a": la, "b": lb, "score": s}, "final_final": self.final,
                "scores": self.scores.round(6).tolist(), "n": self.n, "seconds": round(self.seconds, 2)}


@dataclass
class Assessment:
    metric: str
    k: int | str
    pairs: list[PairScore] = field(default_factory=list)
    sides: tuple[str, str] = ("a", "b")

    def ranked(self) -> list[PairScore]:
        return sorted(self.pairs, key=lambda p: -p.best[2])

    def recommendation(self) -> dict:
        """Best pair, and for every encoder its best layer (what `--layers auto` reads)."""
        top = self.ranked()[0]
        la, lb, s = top.best
        per_encoder: dict[str, dict] = {}
        for p in self.ranked():
            for store, layer in ((p.a, p.best[0]), (p.b, p.best[1])):
                spec = store.key["encoder"]["spec"]
                if spec not in per_encoder:  # the first (highest-ranked) pair it appears in decides
                    per_encoder[spec] = {"layers": [layer], "score": p.best[2]}
        return {"pair": {self.sides[0]: {"encoder": top.a.key["encoder"]["spec"], "layers": [la]},
                         self.sides[1]: {"encoder": top.b.key["encoder"]["spec"], "layers": [lb]}, "score": s},
                "encoders": per_encoder}

    def table(self) -> str:
        lines = [f"| rank | {self.sides[0]} | {self.sides[1]} | best layers | {self.metric} (best) | final x final |",
                 "|---|---|---|---|---|---|"]
        for i, p in enumerate(self.ranked(), 1):
            la, lb, s = p.best
            fin = f"{p.final:.4f}" if p.final is not None else "-"
            lines.append(f"| {i} | {p.a.key['encoder']['spec']} | {p.b.key['encoder']['spec']} | {la} x {lb} | {s:.4f} | {fin} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"format": 1, "metric": self.metric, "k": self.k, "sides": list(self.sides),
                "ranking": [p.as_dict() for p in self.ranked()], "recommendation": self.recommendation()}


# ---- pairing -------------------------------------------------------------------------------------
def paired_rows(a: FeatureStore, b: FeatureStore, n: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Rows of n items present in both stores (the first caption of each), from one split."""
    first_b: dict[str, int] = {}
    for r, (item, cap) in enumerate(zip(b.item_ids, b.caption_index.tolist())):
        if item not in first_b or cap < b.caption_index[first_b[item]]:
            first_b[item] = r
    splits = a.splits
    cand = [(r, first_b[item]) for r, item in enumerate(a.item_ids) if item in first_b and splits[r] == split]
    if len(cand) < 20:
        raise AnybindError(f"only {len(cand)} {split} items are in both {a.path.name} and {b.path.name}: "
                           "assess needs the same dataset extracted with both encoders")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(cand), size=min(n, len(cand)), replace=False))
    rows = np.array(cand, dtype=np.int64)[pick]
    return rows[:, 0], rows[:, 1]


def assess(
    stores: dict[str, list[FeatureStore]],
    *,
    n: int = 2000,
    metric: str = "mutual_knn",
    k: int | str = 10,
    standardize: bool = False,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    cache=None,
    progress: bool = True,
) -> Assessment:
    """Score every candidate pair (one store per side) at every layer pair; write the report.

    >>> a = assess({"image": [eff, dino], "text": [minilm, mpnet]}, n=2000, out="assess/")
    >>> print(a.table()); a.recommendation()
    """
    from .layers import layer_pair_scores

    if len(stores) != 2 or any(not v for v in stores.values()):
        raise AnybindError("assess compares two sides: give one or more stores for each, e.g. image=... text=...")
    (side_a, cands_a), (side_b, cands_b) = stores.items()
    result = Assessment(metric, k, sides=(side_a, side_b))
    from tqdm.auto import tqdm

    todo = [(a, b) for a in cands_a for b in cands_b]
    for a, b in tqdm(todo, desc="assess", unit="pair", disable=not progress):
        t = time.perf_counter()
        ra, rb = paired_rows(a, b, n, seed)
        la, lb = list(a.layers), list(b.layers)
        xs = [a[layer].read(ra) for layer in la]
        ys = [b[layer].read(rb) for layer in lb]
        scores = np.asarray(layer_pair_scores(xs, ys, metric=metric, k=k, standardize=standardize), dtype=np.float64)
        result.pairs.append(PairScore(a, b, la, lb, scores, len(ra), time.perf_counter() - t))
    if out is not None:
        write_report(result, Path(out), cache)
    return result


# ---- outputs ---------------------------------------------------------------------------------------
def write_report(result: Assessment, out: Path, cache=None) -> None:
    """assessment.json, ranking.md and one heatmap PNG per pair; latest.json for --layers auto."""
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    for i, p in enumerate(result.ranked(), 1):
        png = out / f"heatmap-{i:02d}.png"
        if heatmap(p, png, result.metric):
            data["ranking"][i - 1]["heatmap"] = png.name
    write_json(out / ASSESSMENT_FILE, data)
    write_text(out / "ranking.md", f"# Alignability ({result.metric}, k={result.k})\n\n{result.table()}\n")
    latest = latest_assessment_path(cache)  # where `--layers auto` (anybind.features.layers) reads it
    latest.parent.mkdir(parents=True, exist_ok=True)
    write_json(latest, data)


def heatmap(p: PairScore, path: Path, metric: str) -> bool:
    """Layer x layer scores as a PNG (False when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no heatmaps (pip install 'anybind[report]')")
        return False
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(p.layers_b), 1.0 + 0.4 * len(p.layers_a)), dpi=110)
    im = ax.imshow(p.scores, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(p.layers_b)), [x.replace("layer.", "") for x in p.layers_b], rotation=90, fontsize=7)
    ax.set_yticks(range(len(p.layers_a)), [x.replace("layer.", "") for x in p.layers_a], fontsize=7)
    ax.set_xlabel(p.b.key["encoder"]["spec"])
    ax.set_ylabel(p.a.key["encoder"]["spec"])
    i, j = np.unravel_index(int(np.argmax(p.scores)), p.scores.shape)
    ax.scatter([j], [i], marker="*", s=120, color="red", label=f"best {p.scores[i, j]:.3f}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.25, 1.0), fontsize=7, frameon=False)
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(f"{metric}, n={p.n}", fontsize=9)
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)
    return True

