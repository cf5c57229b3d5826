"""The cost of capping the default recipe's caption-transfer bank (issue 18, item 3).

The default recipe blends its MLP space with nn-transfer, whose bank held every training image
(and its mean caption). `blend.bank` caps it: k-means centroids with their members' mean captions
(`kmeans`) or the member nearest each centroid (`subsample`), optionally weighting each bank row's
softmax logit by log(member count) (`member_weighted`). This script measures, on the built-in
suite (efficientnet-lite0 + minilm-l6, openclipart group folds, `anybind eval`'s protocol):

- `--stage val`: the variants on fold 0's validation split (the choice is made here only);
- `--stage test`: the chosen variant at every cap on the test folds, beside the MLP alone and
  nn-transfer alone (the blend's own settings, k 10), mean ± sd over folds x seeds;
- `--stage cost`: the bytes of the saved blend state and the per-query blend time of the
  torch-free runtime at each cap (fold 0's train split), and at a 50,000-row bank.

    OMP_NUM_THREADS=1 python benchmarks/bounded_blend.py --stage val
    OMP_NUM_THREADS=1 python benchmarks/bounded_blend.py --stage test --folds 0,1,2,3,4 --seeds 0
    OMP_NUM_THREADS=1 python benchmarks/bounded_blend.py --stage cost

Every (model, fold, seed, split) result is appended to a results log (`anybind.evaluate.protocol`
ResultsLog) in the work folder, so a killed run resumes where it stopped; the log and the tables
are copied to `benchmarks/results/bounded_blend/` after every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from anybind.evaluate.protocol import ModelSpec, ResultsLog, baseline_spec, evaluate_one
from anybind.evaluate.suite import Suite

CAPS = (0, 5000, 2000, 1000, 500)  # 0: every training image (6,860-6,950 per fold)
VAL_CAPS = (2000, 500)  # where the variants are compared (the all-rows model is the reference)
VARIANTS = (("kmeans", False), ("kmeans", True), ("subsample", False), ("subsample", True))
LARGE_BANK = 50_000  # the default recipe's cap: the bank of any training set larger than this
RESULTS = Path(__file__).parent / "results" / "bounded_blend"
SCORE = "suite/score"


def blend_spec(cap: int, reduction: str = "kmeans", weighted: bool = False) -> ModelSpec:
    """The default recipe with its blend's bank capped at `cap` rows (0: all)."""
    blend = (f"blend={{name: nn-transfer, weight: 0.5, k: 10, bank: {cap}, bank_reduction: {reduction}, "
             f"member_weighted: {str(weighted).lower()}}}")
    name = "all" if cap == 0 else f"{cap} {reduction}{' member-weighted' if weighted else ''}"
    return ModelSpec(name, recipe="default", overrides=(blend,))


def run(specs: list[ModelSpec], suite: Suite, work: Path, folds, seeds, split: str) -> list[dict]:
    log_ = ResultsLog(work / "log.jsonl")
    records = []
    for spec in specs:
        for fold in folds:
            for seed in seeds:
                t0 = time.perf_counter()
                rec = evaluate_one(spec, suite, fold, seed, work, log_, split=split)
                records.append(rec)
                _progress(f"{spec.name:32s} fold {fold} seed {rec['seed']:2d} {split}: {SCORE} "
                          f"{100 * rec['metrics'][SCORE]:.1f} ({time.perf_counter() - t0:.0f} s)", work)
    return records


def _progress(line: str, work: Path) -> None:
    """Print a finished result and copy the results log into the committed results folder."""
    print(line, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "log.jsonl", RESULTS / f"log-{work.name}.jsonl")


def swapped(cap: int, reduction: str, weighted: bool, suite: Suite, fold: int, split: str, work: Path,
            log_: ResultsLog) -> dict:
    """The fold's full-bank default run (trained once, or read from the log) with its blend's bank
    capped: the projectors are the same, only the baseline is refitted. Resumes from the log."""
    from anybind._hashing import hash_obj
    from anybind.align.bound import BoundModel
    from anybind.align.fit import fit_baseline
    from anybind.evaluate.protocol import suite_identity

    spec = blend_spec(cap, reduction, weighted)
    key = hash_obj({"swap": 1, "model": spec.settings(), "suite": suite_identity(suite), "fold": fold, "split": split})
    if log_.get(key) is not None:
        return log_.get(key)
    t0 = time.perf_counter()
    full = evaluate_one(blend_spec(0), suite, fold, 0, work, log_, split=split)
    trained = BoundModel.load(Path(full["info"]["metrics_jsonl"]).parent / "model")
    fd = suite.fold_data(fold)
    options = {"k": 10, "bank": cap, "bank_reduction": reduction, "member_weighted": weighted}
    baseline = fit_baseline("nn-transfer", options, fd.data, fd.split_pairs["train"])
    model = BoundModel(trained.layers, trained.anchor, space=trained.space, baseline=baseline, weight=trained.weight,
                       correction=trained.correction, recipe=trained.recipe)
    metrics, per_class, info = suite.evaluate(model, fold, split, ("retrieval", "zeroshot", "probe"))
    rec = {"key": key, "model": f"{spec.name} (swapped)", "fold": fold, "seed": 0, "split": split, "metrics": metrics,
           "per_class": per_class, "info": info | {"seconds": round(time.perf_counter() - t0, 1)}}
    log_.add(rec)
    return rec


def run_swapped(caps, variants, suite: Suite, work: Path, folds, split: str) -> list[dict]:
    records = []
    for fold in folds:
        for cap in caps:
            for reduction, weighted in variants:
                log_ = ResultsLog(work / "log.jsonl")  # read again: another process may share the folder
                rec = swapped(cap, reduction, weighted, suite, fold, split, work, log_)
                records.append(rec)
                _progress(f"{rec['model']:42s} fold {fold} {split}: {SCORE} {100 * rec['metrics'][SCORE]:.1f} "
                          f"({rec['info']['seconds']:.0f} s)", work)
    return records


def summarise(records: list[dict], keys=(SCORE, "retrieval/mean_recall", "zeroshot/balanced_accuracy",
                                         "probe/top1")) -> dict[str, dict]:
    """model name -> metric -> (mean, sd, n) in %, over the records of that model."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == name]
        out[name] = {}
        for k in keys:
            v = 100 * np.array([r["metrics"][k] for r in mine])
            out[name][k] = (round(float(v.mean()), 2), round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 2), len(v))
    return out


def table(summary: dict[str, dict], title: str) -> str:
    keys = list(next(iter(summary.values())))
    lines = [f"### {title}", "", "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, metrics in summary.items():
        cells = [f"{m:.1f} ± {s:.1f}" if n > 1 else f"{m:.1f}" for m, s, n in metrics.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(name: str, summary: dict, text: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(text + "\n")
    print(text)


def stage_val(suite: Suite, work: Path, caps, variants, retrain: bool) -> None:
    if retrain:
        records = run([blend_spec(0)] + [blend_spec(c, r, w) for c in caps for r, w in variants], suite, work, [0], [0],
                      "val")
    else:
        records = run([blend_spec(0)], suite, work, [0], [0], "val") + run_swapped(caps, variants, suite, work, [0], "val")
    summary = summarise(records)
    write("val-retrained" if retrain else "val", summary, table(summary, "fold 0 validation, seed 0 (%)"))


def stage_test(suite: Suite, work: Path, folds, seeds, caps, models: str, reduction: str, weighted: bool) -> None:
    """`models`: "caps" (the capped blends), "references" (the full bank, the MLP alone, nn-transfer
    alone: they do not depend on the reduction, so they may run beside the choice) or "all"."""
    if models == "caps":  # the full-bank run of each fold with its bank capped (trained when missing)
        records = run_swapped(caps, [(reduction, weighted)], suite, work, folds, "test")
    else:  # the MLP alone last: the most expensive and the least needed
        specs = [blend_spec(0), baseline_spec("nn-transfer", k=10),
                 ModelSpec("MLP alone", recipe="default", overrides=("blend={name: none}",))]
        records = run(specs, suite, work, folds, seeds, "test")
    summary = summarise(records)
    write(f"test-{models}-{'-'.join(map(str, caps))}" if models == "caps" else f"test-{models}", summary, table(summary, f"test folds {','.join(map(str, folds))} x seeds "
                                                    f"{','.join(map(str, seeds))} (%)"))


def stage_table() -> None:
    """Every record of the results logs copied here (several processes may have run): a validation
    table and a test table, each model's runs listed."""
    logs = sorted(RESULTS.glob("log*.jsonl"))
    unique = {r["key"]: r for log in logs for r in map(json.loads, log.read_text().splitlines())}
    order = ["all", *(f"{c} " for c in CAPS[1:]), "nn-transfer", "MLP alone"]
    for split, title in (("val", "fold 0 validation, seed 0 (%)"), ("test", "test folds, mean ± sd over folds (%)")):
        records = sorted((r for r in unique.values() if r["split"] == split),
                         key=lambda r: (next(i for i, o in enumerate(order) if r["model"].startswith(o)), r["model"],
                                        r["fold"], r["seed"]))
        summary = summarise(records)
        runs = {name: sorted({(r["fold"], r["seed"]) for r in records if r["model"] == name}) for name in summary}
        text = table(summary, title)
        if split == "test":
            text += "\n\n" + paired_differences(records)
        write(split, {"models": summary, "runs (fold, seed)": runs}, text)


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # Student's t, two-sided 95%, by degrees of freedom


def paired_differences(records: list[dict]) -> str:
    """Each capped model's suite score minus the full bank's on the same folds: mean and 95% t interval."""
    full = {(r["fold"], r["seed"]): r["metrics"][SCORE] for r in records if r["model"] == "all"}
    lines = ["model − all (suite score, points, paired by fold): mean [95% t interval], folds"]
    for name in dict.fromkeys(r["model"] for r in records if r["model"] != "all"):
        d = 100 * np.array([r["metrics"][SCORE] - full[(r["fold"], r["seed"])] for r in records
                            if r["model"] == name and (r["fold"], r["seed"]) in full])
        if len(d) > 1:
            half = T_975.get(len(d) - 1, 2.0) * d.std(ddof=1) / np.sqrt(len(d))
            lines.append(f"- {name}: {d.mean():+.1f} [{d.mean() - half:+.1f}, {d.mean() + half:+.1f}], n = {len(d)}")
        elif len(d):
            lines.append(f"- {name}: {d.mean():+.1f}, n = 1")
    return "\n".join(lines)


def query_ms(model, images: np.ndarray, batch: int, repeats: int = 3) -> float:
    """Median over `repeats` of the runtime's blend time per query, in ms, `batch` queries a call."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for start in range(0, len(images), batch):
            model.encode("image", images[start:start + batch])
        times.append((time.perf_counter() - t0) / len(images))
    return round(1000 * float(np.median(times)), 3)


def bank_cost(baseline, queries: np.ndarray) -> dict:
    """Saved bytes of a fitted nn-transfer and the torch-free runtime's time per query."""
    from anybind.runtime.blend import Baseline as RuntimeBaseline

    with tempfile.TemporaryDirectory() as tmp:
        baseline.save(Path(tmp) / "b")
        saved = sum(f.stat().st_size for f in (Path(tmp) / "b").iterdir())
        runtime = RuntimeBaseline(Path(tmp) / "b")
        same = np.abs(runtime.encode("image", queries[:64]) - baseline.encode("image", queries[:64]).numpy()).max()
        return {"rows": len(runtime.state["_anchor_image"]), "bytes": saved,
                "ms_per_query_batch1": query_ms(runtime, queries[:200], 1),
                "ms_per_query_batch256": query_ms(runtime, queries, 256), "max_abs_diff_torch_vs_runtime": float(same)}


def fold0_pairs(suite: Suite):
    from anybind.align.baselines import PairedArrays

    fd = suite.fold_data(0)
    a, p, pairs = fd.data.side(fd.data.anchor_name), fd.data.side(fd.data.partner_name), fd.split_pairs["train"]
    anchors, inverse = np.unique(pairs.anchor_rows, return_inverse=True)
    train = PairedArrays(a.rows(anchors)[-1].numpy(), p.rows(pairs.partner_rows)[-1].numpy(), inverse.astype(np.int64))
    test_rows = np.unique(fd.split_pairs["test"].anchor_rows)
    return train, a.rows(test_rows)[-1].numpy()


def stage_cost(suite: Suite, reduction: str, weighted: bool) -> None:
    from anybind.align.baselines import PairedArrays, build_baseline

    train, queries = fold0_pairs(suite)
    rows = {}
    for cap in CAPS:
        t0 = time.perf_counter()
        model = build_baseline("nn-transfer", k=10, bank=cap, bank_reduction=reduction, member_weighted=weighted)
        model.fit(train)
        rows[str(cap or "all")] = bank_cost(model, queries) | {"fit_s": round(time.perf_counter() - t0, 2)}
        print(cap, rows[str(cap or "all")], flush=True)
    rng = np.random.default_rng(0)  # a 50,000-row bank of these dimensions: what the cap holds at any n
    big = PairedArrays.one_to_one(rng.normal(size=(LARGE_BANK, train.image.shape[1])).astype(np.float32),
                                  rng.normal(size=(LARGE_BANK, train.text.shape[1])).astype(np.float32))
    rows[f"{LARGE_BANK} (any n above it)"] = bank_cost(build_baseline("nn-transfer", k=10).fit(big), queries)
    print(rows[f"{LARGE_BANK} (any n above it)"], flush=True)
    lines = ["| bank rows | saved blend state (bytes) | runtime ms/query (1 a call) | ms/query (256 a call) |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['bytes']:,} | {v['ms_per_query_batch1']} | {v['ms_per_query_batch256']} |"
              for k, v in rows.items()]
    write("cost", rows, "\n".join(lines))


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("val", "test", "cost", "table"), required=True)
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--models", default="all", choices=("all", "caps", "references"))
    ap.add_argument("--caps", default=None, help=f"comma-separated caps (val: {VAL_CAPS}; test: {CAPS[1:]})")
    ap.add_argument("--variants", default=None, help="val: reduction[+members],... (default: all four)")
    ap.add_argument("--reduction", default="kmeans", choices=("kmeans", "subsample"))
    ap.add_argument("--member-weighted", action="store_true")
    ap.add_argument("--retrain", action="store_true",
                    help="val: train each capped model (early stopping on its own blend) instead of capping the "
                         "bank of the fold's full-bank run")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bounded_blend",
                    help="the results log and the trained runs (resumable)")
    args = ap.parse_args(argv)
    if args.stage == "table":
        return stage_table()
    suite = Suite.builtin("efficientnet-lite0", "minilm-l6", progress=False)
    if args.stage == "val":
        variants = VARIANTS if not args.variants else [(v.split("+")[0], v.endswith("+members"))
                                                       for v in args.variants.split(",")]
        stage_val(suite, args.work, parse_ints(args.caps) if args.caps else VAL_CAPS, variants, args.retrain)
    elif args.stage == "test":
        stage_test(suite, args.work, parse_ints(args.folds), parse_ints(args.seeds),
                   parse_ints(args.caps) if args.caps else CAPS[1:], args.models, args.reduction, args.member_weighted)
    else:
        stage_cost(suite, args.reduction, args.member_weighted)


if __name__ == "__main__":
    main()
