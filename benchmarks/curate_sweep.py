"""Concept-coverage curation against a random subset of the same size (issue 18, item 4).

The data-efficiency protocol of the README (the default recipe trained on n of a fold's train
items, scored by the built-in suite: efficientnet-lite0 + minilm-l6 on openclipart group folds):

- `random`: `anybind eval --sweep n=` 's subset (`max_train_pairs`: a seeded random n items; the
  seed also seeds training), 3 seeds;
- `curated`: `anybind curate`'s n items (`anybind.align.curate`: WordNet nouns as the vocabulary,
  round-robin across concepts, near-duplicates dropped), the same for every seed; the seeds seed
  training only.

    OMP_NUM_THREADS=1 python benchmarks/curate_sweep.py --stage val    # choose the curation settings
    OMP_NUM_THREADS=1 python benchmarks/curate_sweep.py --stage test --folds 0
    OMP_NUM_THREADS=1 python benchmarks/curate_sweep.py --stage test --folds 1,2,3,4 --seeds 0

`--stage val` compares the curation variants (`VARIANTS`) on fold 0's *validation* split (the only
place a setting is chosen); `--stage test` runs `CHOSEN` on the test split. Every result is one line
of `benchmarks/results/curate/log.jsonl` keyed by its settings, so a killed run resumes; the table
(mean ± sd over folds x seeds) is printed and written to `table-<stage>-folds<k>.md`, and each fold's curation
report (coverage.json, coverage.png, items.txt) to `benchmarks/results/curate/fold<k>-n<n>/`.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

from anybind._hashing import hash_obj
from anybind.align.curate import (
    curate_pool,
    embed_concepts,
    load_pool,
    read_concepts,
    write_curation,
)
from anybind.align.trainer import train
from anybind.evaluate.protocol import ModelSpec, ResultsLog
from anybind.evaluate.suite import HEADLINE, Suite

RESULTS = Path(__file__).parent / "results" / "curate"
WORK = Path.home() / ".cache" / "anybind" / "curate-sweep"  # trained runs and concept features (not committed)
SIZES = (500, 1000, 2000, 4000)
VAL_SIZES = (1000, 2000)
VOCABULARY = "wordnet"  # not the suite's zero-shot class names: those would curate towards the test labels
VARIANTS = {  # name -> curate_pool settings, compared on fold 0's validation split
    "dedup 0.95": {"duplicate_cosine": 0.95},
    "dedup 0.98": {"duplicate_cosine": 0.98},
    "no dedup": {"duplicate_cosine": None},
}
CHOSEN = "dedup 0.95"  # set from --stage val (see the README)
SCORE = "suite/score"
SPEC = ModelSpec("default", recipe="default")


def concept_features(suite: Suite, concepts: list[str]) -> np.ndarray:
    """The vocabulary embedded by the caption store's encoder, cached by vocabulary and store."""
    store = suite.stores["text"]
    key = hashlib.sha256(("\n".join(concepts) + str(store.path.name)).encode()).hexdigest()[:16]
    path = WORK / f"concepts-{key}.npy"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        np.save(path, embed_concepts(store, concepts, progress=True))
    return np.load(path)


def curated_items(suite: Suite, fold: int, n: int, settings: dict, concepts, feats, report_dir: Path | None):
    pool = load_pool(suite.stores, suite.layers, fold=fold)
    result = curate_pool(pool, concepts, feats, n, **settings)
    if report_dir is not None:
        write_curation(result, report_dir)
    return result.item_ids, result.report


def one_run(suite: Suite, fold: int, n: int, seed: int, split: str, items: list[str] | None) -> dict:
    """Train the default recipe on a random n (items None) or on `items`, and score `split`."""
    recipe = SPEC.recipe_obj(seed)
    run_key = hash_obj({"recipe": recipe.to_dict(), "fold": fold, "n": n, "seed": seed,
                        "items": None if items is None else hash_obj(sorted(items)), "splits": suite.splits_fingerprint})
    t0 = time.perf_counter()
    result = train(recipe, suite.stores, out=WORK / "runs" / run_key, layers=suite.layers, fold=fold, progress=False,
                   baselines=False, max_train_pairs=n if items is None else None, train_items=items)
    metrics, _, info = suite.evaluate(result.model, fold, split)
    return {"metrics": metrics, "train_items": n if items is None else len(items), "best_step": result.best_step,
            "leakage_share": info.get("leakage_share"), "seconds": round(time.perf_counter() - t0, 1)}


def sweep(suite: Suite, stage: str, folds, seeds, sizes, which=("random", "curated")) -> list[dict]:
    log_ = ResultsLog(RESULTS / "log.jsonl")
    concepts = read_concepts(VOCABULARY)
    feats = concept_features(suite, concepts)
    split = "val" if stage == "val" else "test"
    arms = [("random", None)] + [(f"curated ({v})", VARIANTS[v]) for v in (VARIANTS if stage == "val" else [CHOSEN])]
    arms = [(arm, settings) for arm, settings in arms if arm.split()[0] in which]
    records = []
    for fold in folds:
        for n in sizes:
            for arm, settings in arms:
                items = report = None
                if settings is not None:
                    report_dir = RESULTS / f"fold{fold}-n{n}" if stage == "test" else None
                    items, report = curated_items(suite, fold, n, settings, concepts, feats, report_dir)
                for seed in seeds:
                    key = hash_obj({"arm": arm, "settings": settings, "vocabulary": VOCABULARY, "fold": fold, "n": n,
                                    "seed": seed, "split": split, "recipe": SPEC.recipe_obj().to_dict(),
                                    "splits": suite.splits_fingerprint})
                    rec = log_.get(key)
                    if rec is None:
                        rec = {"key": key, "arm": arm, "fold": fold, "n": n, "seed": seed, "split": split,
                               "curation": report, **one_run(suite, fold, n, seed, split, items)}
                        log_.add(rec)
                        print(f"fold {fold} n {n} {arm} seed {seed}: {100 * rec['metrics'][SCORE]:.1f} "
                              f"({rec['seconds']}s)", flush=True)
                    records.append(rec)
    return records


def coverage(suite: Suite, fold: int, sizes, seeds) -> str:
    """Concepts covered (items' assigned concepts) by the random subsets and by the curated one."""
    from anybind.align.curate import assign_concepts
    from anybind.align.trainer import subsample_items

    concepts = read_concepts(VOCABULARY)
    feats = concept_features(suite, concepts)
    pool = load_pool(suite.stores, suite.layers, fold=fold)
    concept, _ = assign_concepts(pool.captions, pool.caption_item, feats)
    position = {item: i for i, item in enumerate(pool.item_ids)}
    train = suite.fold_data(fold).split_pairs["train"]
    ids = suite.stores["image"].item_ids
    rows = ["| subset | " + " | ".join(f"{n:,}" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    random_cells, curated_cells = [], []
    for n in sizes:
        got = [len({concept[position[ids[int(r)]]] for r in np.unique(subsample_items(train, n, s).item)}) for s in seeds]
        random_cells.append(f"{np.mean(got):.0f}")
        chosen = curate_pool(pool, concepts, feats, n, **VARIANTS[CHOSEN]).item_ids
        curated_cells.append(str(len({concept[position[i]] for i in chosen})))
    rows += [f"| random | {' | '.join(random_cells)} |", f"| curated ({CHOSEN}) | {' | '.join(curated_cells)} |"]
    return (f"fold {fold}: WordNet concepts covered ({len(concepts):,} in the vocabulary, "
            f"{len(set(concept.tolist()))} assigned to some train item)\n\n" + "\n".join(rows))


def table(records: list[dict], sizes, metric: str = SCORE) -> str:
    """mean ± sd (runs) of `metric`, in %, per subset and n."""
    arms = list(dict.fromkeys(r["arm"] for r in records))
    lines = ["| subset | " + " | ".join(f"{n:,}" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for arm in arms:
        cells = []
        for n in sizes:
            v = [100 * r["metrics"][metric] for r in records if r["arm"] == arm and r["n"] == n]
            sd = f" ± {np.std(v, ddof=1):.1f}" if len(v) > 1 else ""
            cells.append(f"{np.mean(v):.1f}{sd} ({len(v)})" if v else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(records: list[dict], sizes, metric: str = SCORE) -> str:
    """curated − random in `metric` (points), runs paired by (fold, seed): 95% t intervals over the
    paired runs and over the per-fold mean differences (a fold's seeds share its test set)."""
    from anybind.evaluate.results import t_interval

    curated = next((r["arm"] for r in records if r["arm"] != "random"), None)
    lines = ["| n | Δ mean | runs | 95% interval (runs) | folds | 95% interval (fold means) |", "|---:|---:|---:|---|---:|---|"]
    for n in sizes:
        value = {(r["arm"], r["fold"], r["seed"]): 100 * r["metrics"][metric] for r in records if r["n"] == n}
        diffs = {(f, s): value[(curated, f, s)] - v for (a, f, s), v in value.items() if a == "random" and (curated, f, s) in value}
        folds = sorted({f for f, _ in diffs})
        means = [float(np.mean([d for (f, _), d in diffs.items() if f == fold])) for fold in folds]
        if len(diffs) < 2:
            continue
        runs, fold = t_interval(list(diffs.values())), t_interval(means) if len(means) > 1 else None
        by_fold = f"[{fold['low']:+.1f}, {fold['high']:+.1f}]" if fold else "-"
        lines.append(f"| {n:,} | {runs['mean']:+.1f} | {runs['n']} | [{runs['low']:+.1f}, {runs['high']:+.1f}] | "
                     f"{len(means)} | {by_fold} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("val", "test"), default="test")
    ap.add_argument("--folds", default="0", help="comma-separated folds (val: fold 0 only)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--coverage", action="store_true", help="only count the concepts each subset covers (fold 0)")
    ap.add_argument("--report", action="store_true",
                    help="only print and write the table of what the log holds (no training)")
    ap.add_argument("--arms", default="random,curated", help="which subsets to run (a second process can take one)")
    ap.add_argument("--sizes", default=None, help="comma-separated n (default: 500,1000,2000,4000; val: 1000,2000)")
    args = ap.parse_args()
    folds = [0] if args.stage == "val" else [int(f) for f in args.folds.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(VAL_SIZES if args.stage == "val" else SIZES)
    if args.coverage:
        text = coverage(Suite.builtin(progress=True), folds[0], sizes, range(args.seeds))
        print(text)
        (RESULTS / "coverage.md").write_text(text + "\n")
        return
    if args.report:  # every logged run of this split (the recipe's bank cap, added meanwhile, changes nothing here)
        split = "val" if args.stage == "val" else "test"
        logged = [r for r in ResultsLog(RESULTS / "log.jsonl")._done.values() if r["split"] == split and r["fold"] in folds]
        # the newest run of each cell: a re-curated subset (new concept features, recipe) re-runs under a new key
        records = list({(r["fold"], r["arm"], r["n"], r["seed"]): r for r in logged}.values())
    else:
        suite = Suite.builtin(progress=True)
        records = sweep(suite, args.stage, folds, range(args.seeds), sizes, args.arms.split(","))
    text = f"{args.stage} split, folds {','.join(map(str, folds))}; mean ± sd (runs)"
    for metric in (SCORE, *HEADLINE):
        text += f"\n\n{metric}\n\n" + table(records, sizes, metric)
    text += "\n\ncurated − random, suite score\n\n" + paired(records, sizes)
    print(text)
    (RESULTS / f"table-{args.stage}-folds{'-'.join(map(str, folds))}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
