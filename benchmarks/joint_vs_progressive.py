"""Joint vs progressive binding of three modalities, with the same optimiser steps and batch size.

On spoken openclipart triples (efficientnet-lite0 images of openclipart, minilm-l6 captions and
whisper-tiny-en clips of `openclipart-speech:3000`, joined on the items they share), per group
fold x seed:

* progressive: image-text first (`freeze-align`, InfoNCE, S/2 steps), then audio added onto the
  frozen text space (`train --add`, S/2 steps);
* joint: all three at once for S steps with `anchor-infonce` (every modality against the image),
  `all-pairs` (every pair of modalities) or `symile` (the multilinear inner product, at a cosine's
  scale: ``normalise: rms``, the default; "symile l2" is the package's scale, for comparison).

Every model is scored on the fold's test triples (rendering 0: one clip per test item): recall@1
and @10 both ways for every pair of modalities, and the joint query (caption + speech -> image:
the multilinear product for Symile, the sum of cosines for the others; `fit.joint_query_retrieval`,
ties counted against the query as every recall here), beside chance. Results
append to OUT/results.jsonl and are reused on a rerun (a killed run resumes at the next model).

    python benchmarks/joint_vs_progressive.py --folds 0,1,2,3,4 --seeds 0,1,2 --steps 240
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

METHODS = ("progressive", "joint anchor-infonce", "joint all-pairs", "joint symile", "joint symile l2")
PAIRS = (("image", "text"), ("image", "audio"), ("text", "audio"))
KS = (1, 10)
VERSION = 2  # 2: Symile validates by its joint queries; the joint query counts ties against it


def stores() -> dict:
    from anybind.data import load_dataset
    from anybind.features import extract

    speech = load_dataset("openclipart-speech:3000")
    return {"image": extract("efficientnet-lite0", load_dataset("openclipart"), layers="final"),
            "text": extract("minilm-l6", speech, layers="final"),
            "audio": extract("whisper-tiny-en", speech, layers="final")}


BATCH = 256  # every method, every stage


def recipe(loss: str, steps: int, seed: int):
    from anybind.align import load_recipe

    name, *options = loss.split(" ")  # "symile l2": the loss's normalise option
    return load_recipe("freeze-align", [f"loss.name={name}", f"train.max_steps={steps}", f"train.seed={seed}",
                                        f"train.batch_size={BATCH}", "train.patience=1000", "train.val_every=20",
                                        "train.checkpoint_every=20", *(f"loss.normalise={o}" for o in options)])


def train_model(method: str, triple: dict, fold: int, seed: int, steps: int, out: Path):
    """The bound model of one method (trained, or resumed from its run folder)."""
    from anybind.align.frozen import AddSpec
    from anybind.align.trainer import train

    common = {"fold": fold, "progress": False, "baselines": False}
    if method == "progressive":
        pair = {"image": triple["image"], "text": triple["text"]}
        train(recipe("infonce", steps // 2, seed), pair, out=out / "base", across_datasets=True, **common)
        add = AddSpec.from_source(out / "base", "audio", to="text")
        speech = {"audio": triple["audio"], "text": triple["text"]}
        return train(recipe("infonce", steps - steps // 2, seed), speech, out=out / "add", add=add, **common).model
    loss = method.split(" ", 1)[1]
    return train(recipe(loss, steps, seed), triple, out=out, across_datasets=True, **common).model


def score(model, data, test, method: str) -> dict:
    from anybind.align.fit import joint_query_retrieval, pair_retrieval
    from anybind.align.joint_losses import joint_rule

    out = {}
    with torch.no_grad():
        for gallery, query in PAIRS:
            m = pair_retrieval(model, data, test, gallery, query, ks=KS)
            out.update({f"{query}_to_{gallery}_R@{k}": m[f"text_to_image_R@{k}"] for k in KS})
            out.update({f"{gallery}_to_{query}_R@{k}": m[f"image_to_text_R@{k}"] for k in KS})
    rule = joint_rule("symile" if "symile" in method else "infonce")
    with torch.no_grad():
        joint = joint_query_retrieval(model, data, test, "image", rule, ks=KS)
    out.update({f"text+audio_to_image_R@{k}": joint[f"R@{k}"] for k in KS})
    out["test_images"] = int(len(np.unique(test.anchor_rows)))
    out.update({f"chance_R@{k}": k / out["test_images"] for k in KS})
    return out


def run_all(folds, seeds, steps: int, out: Path) -> list[dict]:
    from anybind.align.data import PairedFeatures
    from anybind.evaluate.protocol import ResultsLog

    triple, log, records = stores(), ResultsLog(out / "results.jsonl"), []
    for fold in folds:
        data = PairedFeatures(triple, fold=fold, across_datasets=True)
        test = data.pairs("test")
        for seed in seeds:
            for method in METHODS:
                key = f"v{VERSION}|steps {steps}|batch {BATCH}|fold {fold}|seed {seed}|{method}"
                if log.get(key) is None:
                    t0 = time.perf_counter()
                    model = train_model(method, triple, fold, seed, steps, out / f"fold{fold}-seed{seed}" / method.replace(" ", "-"))
                    rec = {"key": key, "method": method, "fold": fold, "seed": seed, **score(model, data, test, method),
                           "seconds": round(time.perf_counter() - t0, 1)}
                    log.add(json.loads(json.dumps(rec, sort_keys=True)))
                    print(f"fold {fold} seed {seed} {method}: {rec['seconds']} s", flush=True)
                records.append(log.get(key))
    return records


def summarise(records: list[dict]) -> str:
    cols = [f"{q}_to_{g}_R@{k}" for g, q in PAIRS for k in KS] + [f"{g}_to_{q}_R@10" for g, q in PAIRS]
    cols += [f"text+audio_to_image_R@{k}" for k in KS]
    head = "| method | " + " | ".join(c.replace("_to_", "->").replace("_R@", " R@") for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for method in METHODS:
        rs = [r for r in records if r["method"] == method]
        if rs:
            cells = [f"{100 * np.mean([r[c] for r in rs]):.1f} ± {100 * np.std([r[c] for r in rs], ddof=1 if len(rs) > 1 else 0):.1f}"
                     for c in cols]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    chance = {k: 100 * np.mean([r[f"chance_R@{k}"] for r in records]) for k in KS}
    lines.append("| chance | " + " | ".join(f"{chance[int(c.rsplit('@', 1)[1])]:.1f}" for c in cols) + " |")
    n = {(r['fold'], r['seed']) for r in records}
    return "\n".join(lines) + f"\n\n{len(n)} fold x seed runs per method, mean ± sd in %"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=240, help="optimiser steps of every method (progressive: half each)")
    p.add_argument("--out", default="runs/joint-vs-progressive")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    records = run_all([int(f) for f in args.folds.split(",")], [int(s) for s in args.seeds.split(",")],
                      args.steps, Path(args.out))
    table = summarise(records)
    Path(args.out, "summary.md").write_text(table + "\n")
    print(table)
    print(f"\n{len(records)} models in {time.perf_counter() - t0:.0f} s; records: {args.out}/results.jsonl")


if __name__ == "__main__":
    main()
