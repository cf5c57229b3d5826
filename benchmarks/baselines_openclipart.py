"""Training-free baselines on the openclipart stores: retrieval recall next to chance.

Fits every baseline in `anybind.align.baselines` on the train split of an image store and a
caption store (joined on item_id; several captions per item) and prints image->text and
text->image R@1/R@5/R@10 and their mean on the test and val splits, beside chance (the expected
recall of a random ranking) and the fit time. `--sweep` also sweeps each baseline's options
one at a time around its defaults and prints val and test means (the evidence for the
defaults; choose on val; about a minute more on 2 idle cores).

    ANYBIND_CACHE=/tmp/abcache python benchmarks/baselines_openclipart.py
    ANYBIND_CACHE=/tmp/abcache python benchmarks/baselines_openclipart.py --sweep

Splits come from the dataset index (`load_dataset('openclipart')`), not the store rows, so
stores extracted before rows carried a split still work. A query counts as a hit when any of
its positives is in the top k (image->text: any caption of the image); ties count against it.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from math import lgamma
from pathlib import Path

import numpy as np
import torch

from anybind.align.baselines import BASELINES, PairedArrays, build_baseline

KS = (1, 5, 10)
STORES = {
    "image": "efficientnet-lite0--openclipart--image--ab45925ab108-5ef346",
    "text": "minilm-l6--openclipart--caption--34f3aca234ef-6d54cc",
}

# options changed from the defaults: one at a time, cca reg x power as a grid (they interact)
SWEEPS: dict[str, list[dict]] = {
    "procrustes": [
        *(
            {"normalize_input": n, "scaling": s}
            for n in (True, False)
            for s in ("none", "standardize", "whiten")
        ),
        *({"dim": d} for d in (32, 64, 128, 384)),
    ],
    "cca": [
        *({"reg": r, "power": p} for r in (0.03, 0.1, 0.3, 1.0) for p in (0.0, 0.5, 1.0, 2.0, 4.0)),
        *({"dim": d} for d in (64, 128, 384)),
        {"normalize_input": False},
    ],
    "asif": [
        *({"k": k, "power": p} for k in (50, 100, 400, 800, 2000) for p in (1.0, 4.0, 8.0, 16.0)),
        {"center": False},
        {"caption_aggregate": "mean"},
    ],
    "nn-transfer": [
        *({"k": k, "weighting": "mean"} for k in (1, 5, 10, 20, 50)),
        *(
            {"k": k, "weighting": "softmax", "temperature": t}
            for k in (10, 50)
            for t in (0.01, 0.03, 0.05, 0.1)
        ),
        {"center": False},
    ],
}


@dataclass
class Split:
    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray

    def pairs(self) -> PairedArrays:
        return PairedArrays(self.image, self.text, self.text_to_image)


def load_splits(cache: Path, text_layer: str) -> dict[str, Split]:
    from anybind.data import load_dataset
    from anybind.features import FeatureStore

    img = FeatureStore.open(cache / "stores" / STORES["image"])
    txt = FeatureStore.open(cache / "stores" / STORES["text"])
    idx = load_dataset("openclipart")
    split_of = dict(zip(idx.item_ids, idx.column("split")))
    image_feats = np.asarray(img["final"].read(), dtype=np.float32)
    text_feats = np.asarray(txt[text_layer].read(), dtype=np.float32)
    img_ids, txt_ids = list(img.item_ids), list(txt.item_ids)
    out = {}
    for name in ("train", "val", "test"):
        rows = [i for i, item in enumerate(img_ids) if split_of[item] == name]
        pos = {img_ids[r]: j for j, r in enumerate(rows)}
        cap_rows = [i for i, item in enumerate(txt_ids) if item in pos]
        out[name] = Split(
            image_feats[rows],
            text_feats[cap_rows],
            np.array([pos[txt_ids[i]] for i in cap_rows], dtype=np.int64),
        )
    return out


def recall(zi: torch.Tensor, zt: torch.Tensor, t2i: np.ndarray, ks=KS) -> dict[str, float]:
    """R@k both ways; rank = #scores above the positive + #ties other than itself (pessimistic)."""
    scores = (zt @ zi.T).double()  # [Nt, Ni]
    t2i_t = torch.from_numpy(t2i)
    pos = scores[torch.arange(len(t2i)), t2i_t]
    # text -> image: the rank of each caption's own image
    rank_t = (scores > pos[:, None]).sum(1) + (scores == pos[:, None]).sum(1) - 1
    # image -> text: best rank over the image's captions, in that image's column
    col = scores.T[t2i_t]  # [Nt, Nt]: row j = image of caption j scored against every caption
    rank_each = (col > pos[:, None]).sum(1) + (col == pos[:, None]).sum(1) - 1
    best = torch.full((len(zi),), len(zt), dtype=rank_each.dtype)
    best = best.scatter_reduce(0, t2i_t, rank_each, reduce="amin")
    has_caption = torch.bincount(t2i_t, minlength=len(zi)) > 0
    best = best[has_caption]
    out = {}
    for k in ks:
        out[f"i2t@{k}"] = float((best < k).double().mean())
        out[f"t2i@{k}"] = float((rank_t < k).double().mean())
    out["mean"] = float(np.mean(list(out.values())))
    return out


def chance(t2i: np.ndarray, n_images: int, ks=KS) -> dict[str, float]:
    """Expected recall of a uniformly random ranking."""
    n_text = len(t2i)
    m = np.bincount(t2i, minlength=n_images)
    m = m[m > 0]

    def log_comb(n, r):
        return lgamma(n + 1) - lgamma(r + 1) - lgamma(n - r + 1)

    out = {}
    for k in ks:
        miss = [
            np.exp(log_comb(n_text - c, k) - log_comb(n_text, k)) if n_text - c >= k else 0.0
            for c in m
        ]
        out[f"i2t@{k}"] = float(1.0 - np.mean(miss))
        out[f"t2i@{k}"] = min(k, n_images) / n_images
    out["mean"] = float(np.mean(list(out.values())))
    return out


def shared_recall(zi: torch.Tensor, zt: torch.Tensor, t2i: np.ndarray) -> dict[str, float]:
    """The project's metric (anybind.metrics.retrieval) when present, else `recall` above.

    Both count ties against the query; they gave identical numbers on every baseline here.
    """
    try:
        from anybind.metrics.retrieval import retrieval_metrics
    except ImportError:
        return recall(zi, zt, t2i)
    m = retrieval_metrics(zi, zt, t2i, ks=KS)
    out = {f"i2t@{k}": m[f"image_to_text_R@{k}"] for k in KS}
    out.update({f"t2i@{k}": m[f"text_to_image_R@{k}"] for k in KS})
    out["mean"] = float(np.mean(list(out.values())))
    return out


def evaluate(model, split: Split) -> dict[str, float]:
    zi, zt = model.encode("image", split.image), model.encode("text", split.text)
    return shared_recall(zi, zt, split.text_to_image)


def fmt(row: dict[str, float]) -> str:
    return "  ".join(f"{100 * row[c]:5.1f}" for c in COLS)


COLS = [f"i2t@{k}" for k in KS] + [f"t2i@{k}" for k in KS] + ["mean"]
HEADER = "  ".join(f"{c:>5}" for c in ["i2t1", "i2t5", "i2t10", "t2i1", "t2i5", "t2i10", "mean"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("ANYBIND_CACHE", "/tmp/abcache"))
    ap.add_argument("--text-layer", default="final")
    ap.add_argument("--sweep", action="store_true", help="also sweep each baseline's options")
    ap.add_argument("--only", nargs="*", default=None, help="baselines to run (default: all)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    splits = load_splits(Path(args.cache), args.text_layer)
    train = splits["train"].pairs()
    print(f"loaded in {time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()}")
    for name, s in splits.items():
        print(f"  {name:5}: {len(s.image):5d} images, {len(s.text):5d} captions")
    names = args.only or list(BASELINES)

    fitted, fit_seconds = {}, {}
    for name in names:
        t = time.perf_counter()
        fitted[name] = build_baseline(name).fit(train)
        fit_seconds[name] = time.perf_counter() - t

    print("\nrecall in % (i2t: image->text, t2i: text->image); chance = random ranking")
    for split_name in ("test", "val"):
        s = splits[split_name]
        print(f"\n[{split_name}]  {'baseline':12} {'fit s':>6}  {HEADER}")
        print(
            f"[{split_name}]  {'chance':12} {'':>6}  {fmt(chance(s.text_to_image, len(s.image)))}"
        )
        for name in names:
            row = fmt(evaluate(fitted[name], s))
            print(f"[{split_name}]  {name:12} {fit_seconds[name]:6.2f}  {row}")

    if args.sweep:
        print("\nsweeps: options changed from the defaults; mean recall (%) on val and test")
        for name in names:
            print(f"\n{name}  defaults {build_baseline(name).config()}")
            for opts in [{}, *SWEEPS.get(name, [])]:
                t = time.perf_counter()
                model = build_baseline(name, **opts).fit(train)
                fit_s = time.perf_counter() - t
                v, te = evaluate(model, splits["val"]), evaluate(model, splits["test"])
                label = ", ".join(f"{k}={v!r}" for k, v in opts.items()) or "(defaults)"
                print(
                    f"  {label:48} fit {fit_s:5.2f}s  val {100 * v['mean']:5.1f} "
                    f"(R@1 {100 * v['i2t@1']:4.1f}/{100 * v['t2i@1']:4.1f})  "
                    f"test {100 * te['mean']:5.1f}"
                )
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
