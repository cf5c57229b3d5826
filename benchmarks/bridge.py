"""Bridging two bound models through text, measured on the emergent speech -> image pairs.

A = image-text (efficientnet-lite0 + minilm-l6, the `default` recipe, openclipart): the base models
of the emergent-speech protocol (`benchmarks/emergent_speech.py`, one per fold; reused from its
results log, trained when missing). B = audio-text from *other* encoders (whisper-tiny-en +
mpnet-base), trained jointly per fold on `openclipart-speech:3000` (the fold's train items; its
val items for early stopping). C = A + B's audio through a map fitted on text alone: WordNet glosses
(`wordnet-speech:2000`) plus the fold's non-test openclipart-speech captions, each encoded by
minilm (A's side) and mpnet (B's side). Per fold: audio -> image and image -> audio recall@1/@10
on the fold's test images that have a spoken caption (rendering 0 as the query), exactly the items
and queries `evaluate/emergent.py` scores the progressively bound model on (A + audio trained onto
A's text: the reference), beside chance. The map's options (and the "auto" map) are chosen on
held-out corpus rows (text -> text through the map), never on the emergent test.

    python benchmarks/bridge.py --folds 0,1,2,3,4 --seeds 0 --mlp-seeds 0,1,2 \\
        --progressive /work/meas/emergent --out benchmarks/results/bridge
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from anybind.align import load_recipe
from anybind.align.bound import BoundModel
from anybind.align.bridge import (
    TRAINING_FREE,
    best_map,
    compose,
    corpus_embeddings,
    corpus_from_stores,
    fit_map,
    held_out,
    join_corpora,
)
from anybind.align.data import row_splits
from anybind.align.trainer import train
from anybind.data import load_dataset
from anybind.evaluate.emergent import (
    _mean_sd,
    emergent_protocol,
    score_pairs,
    speech_setup,
    split_items,
)
from anybind.features import extract

SPEECH, GLOSSES = "openclipart-speech:3000", "wordnet-speech:2000"
KEYS = ("audio_to_image_R@1", "audio_to_image_R@10", "image_to_audio_R@1", "image_to_audio_R@10")


def stores() -> dict:
    """Every store the measurement reads (cached; mpnet is extracted on first use)."""
    speech, glosses = load_dataset(SPEECH), load_dataset(GLOSSES)
    return {"audio": extract("whisper-tiny-en", speech, layers="final", progress=False),
            "speech_minilm": extract("minilm-l6", speech, layers="final", progress=False),
            "speech_mpnet": extract("mpnet-base", speech, layers="final", progress=False),
            "gloss_minilm": extract("minilm-l6", glosses, layers="final", progress=False),
            "gloss_mpnet": extract("mpnet-base", glosses, layers="final", progress=False)}


def test_items(setup, s: dict, fold: int) -> set[str]:
    """The items evaluate/emergent.py scores for this fold: test images with a spoken caption, none
    the addition (or B, or the corpus) saw."""
    items = split_items(setup.base["image"], "test", fold)
    edge = s["speech_minilm"]
    items -= {i for i, sp in zip(edge.item_ids, row_splits(edge, fold)) if sp in ("train", "val")}
    return items & set(s["audio"].item_ids)


def train_b(s: dict, fold: int, seed: int, out: Path, steps: int) -> BoundModel:
    recipe = load_recipe("default", [f"train.max_steps={steps}"])
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, seed=seed))
    return train(recipe, {"audio": s["audio"], "text": s["speech_mpnet"]}, out=out / "b" / f"fold{fold}-seed{seed}",
                 fold=fold, progress=False, baselines=False).model


def corpus_for(a, b, s: dict, fold: int):
    edge = s["speech_minilm"]
    seen = {i for i, sp in zip(edge.item_ids, row_splits(edge, fold)) if sp in ("train", "val")}
    return join_corpora(corpus_from_stores(s["gloss_minilm"], s["gloss_mpnet"], a, b, "text", name="wordnet"),
                        corpus_from_stores(s["speech_minilm"], s["speech_mpnet"], a, b, "text", keep=seen,
                                           name="openclipart-speech train+val"))


def reference(setup, folder: Path, fold: int, seed: int) -> dict:
    """The progressive model's record of (fold, seed): read from the protocol's log (an older log
    has no keys), else trained and scored by `emergent_protocol`."""
    log = folder / "results.jsonl"
    for rec in map(json.loads, log.read_text().splitlines() if log.exists() else []):
        if (rec["fold"], rec["seed"], rec["addition"]) == (fold, seed, "spoken openclipart"):
            return rec
    (rec,) = [r for r in emergent_protocol(setup, [fold], [seed], folder, progress=False)
              if r["addition"] == "spoken openclipart"]
    return rec


def one_fold(setup, record: dict, s: dict, fold: int, seed: int, mlp_seeds, out: Path, steps: int) -> dict:
    t0 = time.perf_counter()
    a = BoundModel.load(Path(record["base_run"]) / "model")
    b = train_b(s, fold, seed, out, steps)
    t_b = time.perf_counter() - t0
    corpus = corpus_for(a, b, s, fold)
    x, y = corpus_embeddings(a, b, "text", corpus)
    val = held_out(corpus.groups)
    fits = {n: fit_map(n, x, y, val, seed) for n in TRAINING_FREE}
    fits |= {f"mlp seed {m}": fit_map("mlp", x, y, val, m) for m in mlp_seeds}
    items = test_items(setup, s, fold)
    query = {"audio": ("audio", s["audio"], 0)}
    scored = {}
    for label, fitted in fits.items():
        got = score_pairs(compose(a, b, "text", fitted.map), ("image", setup.base["image"]), query, items)["audio"]
        scored[label] = {"val": fitted.val, "options": fitted.options, "tried": fitted.tried, **{k: got[k] for k in KEYS},
                         "chance": {k: got["chance"][k] for k in KEYS}, "gallery": got["gallery"]}
    auto = best_map({k: v for k, v in fits.items() if k in (*TRAINING_FREE, f"mlp seed {mlp_seeds[0]}")})
    progressive = record["scores"]["audio"]
    assert progressive["gallery"] == scored["procrustes"]["gallery"], "not the items the reference scored"
    return {"fold": fold, "seed": seed, "maps": scored, "auto": next(k for k, v in fits.items() if v is auto),
            "progressive": {k: progressive[k] for k in KEYS}, "spoken_text": {k: record["scores"]["spoken"][k.replace(
                "audio", "spoken")] for k in KEYS}, "corpus": {"rows": len(corpus), "held_out": int(val.sum())},
            "seconds": {"b": t_b, "all": time.perf_counter() - t0}}


def summary(records: list[dict]) -> list[dict]:
    """mean +- sd over folds x seeds (the MLP rows: x MLP seeds too) per method, in %."""
    def row(name, values, val=None):
        out = {"method": name, "n": len(values), **{k: _mean_sd([100 * v[k] for v in values]) for k in KEYS}}
        if val:
            out["val text->text mean_R@1"] = _mean_sd([100 * v["mean_R@1"] for v in val])
        return out

    rows = [row("progressive (audio trained onto A's text)", [r["progressive"] for r in records]),
            row("spoken text through A (reference)", [r["spoken_text"] for r in records])]
    for name in TRAINING_FREE:
        rows.append(row(f"bridge: {name}", [r["maps"][name] for r in records], [r["maps"][name]["val"] for r in records]))
    mlp = [v for r in records for k, v in r["maps"].items() if k.startswith("mlp")]
    rows.append(row("bridge: mlp (trained)", mlp, [v["val"] for v in mlp]))
    rows.append(row("bridge: auto (chosen on held-out text)", [r["maps"][r["auto"]] for r in records],
                    [r["maps"][r["auto"]]["val"] for r in records]))
    rows.append(row("chance", [r["maps"]["procrustes"]["chance"] for r in records]))
    return rows


def markdown(rows: list[dict]) -> str:
    cols = [*KEYS, "val text->text mean_R@1"]
    lines = ["| method | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c][0]:.1f} ± {r[c][1]:.1f}" if c in r else "" for c in cols]
        lines.append(f"| {r['method']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_log(log: Path) -> dict:
    return {(r["fold"], r["seed"]): r for r in map(json.loads, log.read_text().splitlines())} if log.exists() else {}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--seeds", default="0", help="seeds of A, B and the progressive reference")
    p.add_argument("--mlp-seeds", default="0,1,2")
    p.add_argument("--progressive", default="runs/emergent-speech", help="the emergent-speech protocol's folder "
                   "(its results log is reused; missing runs are trained)")
    p.add_argument("--out", default="benchmarks/results/bridge")
    p.add_argument("--work", default="runs/bridge", help="B's training runs")
    p.add_argument("--b-steps", type=int, default=100, help="B's training steps at most (the default recipe, "
                   "early stopping on its val split; 100 fits 5 folds on 2 shared cores)")
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    setup = dataclasses.replace(speech_setup(speech=SPEECH, disjoint=None, cascade=False, progress=False), maps=())
    s = stores()
    log = out / "results.jsonl"
    mlp_seeds = [int(m) for m in args.mlp_seeds.split(",")]
    for seed in map(int, args.seeds.split(",")):
        for fold in map(int, args.folds.split(",")):
            done = read_log(log)  # again per fold: another process may share the log
            if (fold, seed) in done:
                continue
            record = reference(setup, Path(args.progressive), fold, seed)
            done[(fold, seed)] = one_fold(setup, record, s, fold, seed, mlp_seeds, work, args.b_steps)
            with log.open("a") as fh:
                fh.write(json.dumps(done[(fold, seed)], sort_keys=True) + "\n")
            print(f"fold {fold} seed {seed}: {done[(fold, seed)]['seconds']['all']:.0f} s", flush=True)
    rows = summary(list(read_log(log).values()))
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "table.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
