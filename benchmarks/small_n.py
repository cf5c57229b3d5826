"""What works at small n (issue 18, item 5): recipe variants of the default at 1,000 training pairs.

Each variant is the `default` recipe with a few `--set` overrides, trained on fold 0's curated
1,000 items (`anybind curate`, the chosen settings of `curate_sweep.py`) or on a seeded random
1,000, and scored by the built-in suite on fold 0's *validation* split: the only place a variant
is chosen. A variant that wins there is then run on the test split (`--stage test`) beside the
default, and on all of a fold's pairs to check that it does not lose there.

    ANYBIND_CACHE=/tmp/abcache OMP_NUM_THREADS=2 python benchmarks/small_n.py --stage val
    ANYBIND_CACHE=/tmp/abcache python benchmarks/small_n.py --stage test --variants default,pca-128

Every result is one line of `benchmarks/results/small_n/log.jsonl` keyed by its settings (a killed
run resumes); the table (mean ± sd over seeds, with the default's paired difference) is printed
and written to `benchmarks/results/small_n/table-<stage>.md`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from anybind._hashing import hash_obj
from anybind.align.curate import read_concepts
from anybind.align.trainer import train
from anybind.evaluate.protocol import ModelSpec, ResultsLog
from anybind.evaluate.suite import HEADLINE, Suite
from curate_sweep import CHOSEN, VARIANTS, VOCABULARY, WORK, concept_features, curated_items

RESULTS = Path(__file__).parent / "results" / "small_n"
SCORE = "suite/score"
#: name -> overrides of the default recipe
CANDIDATES: dict[str, tuple[str, ...]] = {
    "default": (),
    "pca-64": ("projector.default.pca=64",),
    "pca-128": ("projector.default.pca=128",),
    "pca-256": ("projector.default.pca=256",),
    "pca-128-whiten": ("projector.default.pca=128", "projector.default.pca_whiten=true"),
    "dropout-0.3": ("projector.default.dropout=0.3",),
    "weight-decay-0.3": ("optimizer.weight_decay=0.3",),
    "blend-0.3": ("blend.weight=0.3",),
    "blend-0.7": ("blend.weight=0.7",),
    "structure-10": ("loss.structure_weight=10", "loss.structure_warmup_steps=20"),
    "dim-256": ("dim=256",),
    # at 1,000 pairs the best checkpoint was the first validated one (step 25 of 60) in 17 of 22 runs above
    "epochs-25": ("train.epochs=25", "optimizer.warmup_steps=5"),
    "epochs-15": ("train.epochs=15", "optimizer.warmup_steps=5", "train.val_every=5"),
    "val-every-5": ("train.val_every=5",),
}


def run_one(suite: Suite, spec: ModelSpec, n: int, seed: int, split: str, items: list[str] | None) -> dict:
    recipe = spec.recipe_obj(seed)
    run_key = hash_obj({"recipe": recipe.to_dict(), "fold": 0, "n": n, "seed": seed,
                        "items": None if items is None else hash_obj(sorted(items)), "splits": suite.splits_fingerprint})
    t0 = time.perf_counter()
    result = train(recipe, suite.stores, out=WORK / "runs" / run_key, layers=suite.layers, fold=0, progress=False,
                   baselines=False, max_train_pairs=None if items is not None or n <= 0 else n, train_items=items)
    metrics, _, _ = suite.evaluate(result.model, 0, split)
    return {"metrics": metrics, "best_step": result.best_step, "seconds": round(time.perf_counter() - t0, 1)}


def sweep(suite: Suite, split: str, names: list[str], subsets: list[str], n: int, seeds) -> list[dict]:
    log = ResultsLog(RESULTS / "log.jsonl")
    concepts = read_concepts(VOCABULARY)
    curated, _ = curated_items(suite, 0, n, VARIANTS[CHOSEN], concepts, concept_features(suite, concepts), None)
    records = []
    for subset in subsets:
        for name in names:
            spec = ModelSpec(name, recipe="default", overrides=CANDIDATES[name])
            for seed in seeds:
                key = hash_obj({"subset": subset, "n": n, "seed": seed, "split": split,
                                "recipe": spec.recipe_obj().to_dict(), "splits": suite.splits_fingerprint})
                rec = log.get(key)
                if rec is None:
                    items = curated if subset == "curated" else None
                    rec = {"key": key, "variant": name, "subset": subset, "n": n, "seed": seed, "split": split,
                           **run_one(suite, spec, n if subset != "all" else 0, seed, split, items)}
                    log.add(rec)
                    print(f"{subset} n {n} {name} seed {seed} {split}: {100 * rec['metrics'][SCORE]:.1f} "
                          f"({rec['seconds']}s)", flush=True)
                records.append(rec)
    return records


def table(records: list[dict], metric: str) -> str:
    """mean ± sd over seeds per (subset, variant), and the paired difference from the default."""
    lines = ["| subset | variant | runs | mean ± sd | minus default (paired, mean [min, max]) |", "|---|---|---|---|---|"]
    by = {(r["subset"], r["variant"], r["seed"]): 100 * r["metrics"][metric] for r in records}
    for subset, variant in dict.fromkeys((r["subset"], r["variant"]) for r in records):
        v = {s: x for (sub, var, s), x in by.items() if (sub, var) == (subset, variant)}
        d = [x - by[(subset, "default", s)] for s, x in v.items() if (subset, "default", s) in by]
        vals = list(v.values())
        sd = f" ± {np.std(vals, ddof=1):.1f}" if len(vals) > 1 else ""
        diff = f"{np.mean(d):+.1f} [{min(d):+.1f}, {max(d):+.1f}]" if d and variant != "default" else ""
        lines.append(f"| {subset} | {variant} | {len(vals)} | {np.mean(vals):.1f}{sd} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("val", "test"), default="val")
    ap.add_argument("--variants", default=",".join(CANDIDATES), help="comma list of " + ", ".join(CANDIDATES))
    ap.add_argument("--subsets", default="curated", help="comma list of curated, random, all")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    suite = Suite.builtin(progress=True)
    split = "val" if args.stage == "val" else "test"
    records = sweep(suite, split, args.variants.split(","), args.subsets.split(","), args.n, range(args.seeds))
    text = f"fold 0, {split} split, n {args.n}; suite score and headline metrics in %"
    for metric in (SCORE, *HEADLINE):
        text += f"\n\n{metric}\n\n" + table(records, metric)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"table-{args.stage}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
