"""Cross-validation splits, the suite's tasks and the resumable protocol, on planted stores."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _synthetic import planted_stores
from _toy import replicas
from anybind.align.data import PairedFeatures
from anybind.cli import main
from anybind.data.crossval import fold_splits
from anybind.evaluate import results as res
from anybind.evaluate.protocol import (
    Grid,
    ModelSpec,
    ResultsLog,
    baseline_spec,
    compare_models,
    run_model,
    sweep,
)
from anybind.evaluate.suite import LabelledFeatures, Suite

FAST = ("train.max_steps=40", "train.val_every=10", "train.batch_size=128", "train.patience=3")


# ---- cross-validation splits -------------------------------------------------------------------------
def test_fold_splits_by_hand():
    # ten groups, one per fold pair; "big" holds 30% of the items and must always train
    groups = ["a", "a", "b", "c", "d", "e", "big", "big", "big", "f"]
    folds = [0, 0, 1, 1, 2, 3, 4, 4, 4, 0]
    s = fold_splits(groups, folds, fold=0, max_group_share=0.25)
    assert list(s[[0, 1, 9]]) == ["test"] * 3  # every fold-0 item
    assert set(s[[2, 3]]) <= {"val", "train"}  # fold 1 is the validation fold, about half of its groups
    assert list(s[[4, 5]]) == ["train", "train"]
    assert list(s[6:9]) == ["train"] * 3  # oversized group: never test, even though its fold is 4
    s4 = fold_splits(groups, folds, fold=4, max_group_share=0.25)
    assert "test" not in s4[6:9]
    # the validation half is decided per group: both items of a group always agree
    many = [f"g{i // 2}" for i in range(400)]
    f = [1] * 400
    v = fold_splits(many, f, fold=0, max_group_share=1.0)
    assert all(v[i] == v[i + 1] for i in range(0, 400, 2))
    assert 0.35 < np.mean(v == "val") < 0.65
    with pytest.raises(ValueError, match="fold must be"):
        fold_splits(groups, folds, fold=5)


def test_paired_features_use_the_fold(tmp_path):
    img, txt = planted_stores(tmp_path, n_items=300)
    folds = np.array(img.rows.column("fold").to_pylist())
    for f in range(5):
        data = PairedFeatures({"image": img, "text": txt}, fold=f)
        test_items = np.unique(data.pairs("test").anchor_rows)
        assert set(test_items) == set(np.nonzero(folds == f)[0])  # items are their own groups here
        val_items = np.unique(data.pairs("val").anchor_rows)
        assert set(folds[val_items]) == {(f + 1) % 5}
        assert not set(test_items) & set(np.unique(data.pairs("train").anchor_rows))


# ---- the suite on planted data -----------------------------------------------------------------------
@pytest.fixture()
def planted_suite(tmp_path):
    """A suite whose tasks have known answers: 4 classes carried by the planted latent."""
    img, txt = planted_stores(tmp_path / "stores", n_items=400, latent=8)
    x = img.array("final").read()
    # the class of an item: the sign pattern of two latent directions seen through the image features
    proj = np.random.default_rng(1).standard_normal((x.shape[1], 2)).astype(np.float32)
    code = ((x @ proj) > 0).astype(int) @ np.array([1, 2])
    classes = ["c0", "c1", "c2", "c3"]
    label = {i: classes[c] for i, c in zip(img.item_ids, code, strict=True)}
    probe = LabelledFeatures("planted", [torch.from_numpy(x)], code, classes, np.arange(len(code)) % 4 != 0)
    return Suite(img, txt, zeroshot_labels=lambda ids: [label[i] for i in ids], class_names=classes,
                 templates=["{c}"], probe=probe, prompt_features=[torch.zeros(4, txt.layers["final"])])


def test_zeroshot_on_a_model_whose_answer_is_known(planted_suite):
    """Images embed as their class direction, prompts as the class direction: zero-shot is perfect."""
    suite = planted_suite
    fd = suite.fold_data(0)
    rows, y, _ = suite.zeroshot_rows(fd, "test")
    code_of_row = {int(r): int(c) for r, c in zip(rows, y, strict=True)}
    eye = torch.eye(4)

    class Oracle:
        def encode(self, modality, feats):
            n = len(feats[0])
            if modality == "text":  # the 4 prompts, in class order
                return eye[:n]
            return eye[torch.as_tensor([code_of_row.get(i, 0) for i in range(n)])]

    class RowAware(Oracle):  # the suite passes features of `rows`; map them back by content
        def encode(self, modality, feats):
            if modality == "text":
                return eye
            x = feats[0]
            allx = torch.from_numpy(suite.stores["image"].array("final").read())
            idx = [int(torch.argmin(((allx - r) ** 2).sum(1))) for r in x]
            return eye[torch.as_tensor([code_of_row[i] for i in idx])]

    m, per_class = suite.zeroshot(RowAware(), fd, "test")
    assert m["zeroshot/top1"] == 1.0 and m["zeroshot/balanced_accuracy"] == 1.0
    assert set(per_class) <= {"c0", "c1", "c2", "c3"} and all(v == 1.0 for v in per_class.values())
    chance = suite.chance(0)
    assert chance["zeroshot/balanced_accuracy"] == 0.25
    assert suite.majority(0)["zeroshot/top1"] == pytest.approx(np.bincount(y).max() / len(y))


def test_protocol_runs_resumes_and_compares(planted_suite, tmp_path):
    suite, out = planted_suite, tmp_path / "eval"
    trained = ModelSpec("linear", recipe="linear", overrides=FAST)
    base = baseline_spec("procrustes")
    doc_t = run_model(trained, suite, folds=[0, 1], seeds=[0, 1], out=out, progress=False)
    doc_b = run_model(base, suite, folds=[0, 1], seeds=[0, 1], out=out, progress=False)
    assert [(r["fold"], r["seed"]) for r in doc_t["runs"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(r["fold"], r["seed"]) for r in doc_b["runs"]] == [(0, -1), (1, -1)]  # no seed: fitted once per fold
    for doc in (doc_t, doc_b):
        for run in doc["runs"]:
            m = run["metrics"]
            assert all(0.0 <= v <= 1.0 for v in m.values())
            # a planted correspondence: far above chance on retrieval, and the probe learns the classes
            assert m["retrieval/mean_R@10"] > 3 * doc["chance"]["retrieval/mean_R@10"]
            assert m["probe/top1"] > 0.6
            assert m["suite/score"] == pytest.approx(np.mean([m["retrieval/mean_recall"],
                                                              m["zeroshot/balanced_accuracy"], m["probe/top1"]]))
            assert 0.0 <= run["info"]["leakage_share"] <= 1.0  # measured on the raw image features
    assert "majority class" in doc_t["reference"] and "frozen encoder (probe)" in doc_t["reference"]
    # the documents validate and round-trip
    path = res.write_results(doc_t, tmp_path / "linear.json")
    assert res.read_results(path)["runs"] == doc_t["runs"]
    diff = res.paired_difference(doc_t, doc_b, "retrieval/mean_R@10")
    assert diff["n"] == 4 and diff["low"] <= diff["mean"] <= diff["high"]
    # a second call reads every result back from the log: nothing is trained again
    lines = (out / "log.jsonl").read_text().splitlines()
    mtimes = {p: p.stat().st_mtime for p in (out / "runs").rglob("best/*")}
    again = run_model(trained, suite, folds=[0, 1], seeds=[0, 1], out=out, progress=False)
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in doc_t["runs"]]
    assert (out / "log.jsonl").read_text().splitlines() == lines
    assert mtimes == {p: p.stat().st_mtime for p in (out / "runs").rglob("best/*")}


def test_a_cut_log_line_is_redone_not_fatal(tmp_path):
    log = ResultsLog(tmp_path / "log.jsonl")
    log.add({"key": "a", "metrics": {}})
    with open(tmp_path / "log.jsonl", "a") as fh:
        fh.write('{"key": "b", "metr')  # killed mid-write
    again = ResultsLog(tmp_path / "log.jsonl")
    assert again.get("a") is not None and again.get("b") is None


def test_tuning_reads_validation_only_and_sweeps_resume(planted_suite, tmp_path):
    suite, out = planted_suite, tmp_path / "eval"
    docs = compare_models([ModelSpec("linear", recipe="linear", overrides=FAST), baseline_spec("nn-transfer")],
                          suite, out, folds=[0, 1], seeds=[0], grid=Grid(), progress=False)
    for doc in docs:
        tuning = doc["model"]["tuning"]
        assert tuning["split"] == "val" and len(tuning["candidates"]) == 3  # the same budget for every model
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert {r["split"] for r in logged if r["fold"] == 0 and r["model"] == "linear"} == {"val", "test"}
    assert sorted((out / "results").glob("*.json"))
    points = sweep(ModelSpec("linear", recipe="linear", overrides=FAST), suite, "n", [40, "all"], out,
                   folds=[0], seeds=[0, 1], progress=False)
    assert [p["n_runs"] for p in points] == [2, 2]
    assert points[0]["train_items"] == 40 and points[1]["train_items"] > 200
    field = sweep(ModelSpec("linear", recipe="linear", overrides=FAST), suite, "optimizer.lr", [0.001, 0.01], out,
                  folds=[0], seeds=[0], progress=False)
    assert len(field) == 2 and all(0 <= p["mean"] <= 1 for p in field)


def test_retrieval_correction_ships_in_the_evaluation(planted_suite, tmp_path):
    suite = planted_suite
    qb = ModelSpec("linear+qb", recipe="linear", overrides=FAST, correction=(("beta", 20.0), ("name", "qb-norm")))
    plain = ModelSpec("linear", recipe="linear", overrides=FAST)
    a = run_model(qb, suite, folds=[0], seeds=[0], out=tmp_path, tasks=("retrieval",), progress=False)
    b = run_model(plain, suite, folds=[0], seeds=[0], out=tmp_path, tasks=("retrieval",), progress=False)
    assert a["runs"][0]["metrics"] != b["runs"][0]["metrics"]  # the same training, a different ranking
    assert set(a["runs"][0]["metrics"]) == set(b["runs"][0]["metrics"])


def test_recipes_that_differ_only_in_their_blend_train_separately(planted_suite, tmp_path):
    # the blend is fitted before training and read by validation and early stopping: a setting of
    # its own, never a resume of another blend's run (a correction is fitted after: shared)
    specs = [ModelSpec(f"blend{w}", recipe="linear", overrides=FAST + (f"blend={{name: nn-transfer, weight: {w}}}",))
             for w in (0.25, 0.75)]
    for spec in specs:
        run_model(spec, planted_suite, folds=[0], seeds=[0], out=tmp_path, tasks=("retrieval",), progress=False)
    assert len(list((tmp_path / "runs").iterdir())) == 2
    qb = specs[0].with_overrides("correction={name: qb-norm, beta: 20}", name="blend+qb")
    run_model(qb, planted_suite, folds=[0], seeds=[0], out=tmp_path, tasks=("retrieval",), progress=False)
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_cli_compare_prints_the_table(planted_suite, tmp_path, capsys):
    docs = [run_model(s, planted_suite, folds=[0, 1], seeds=[0], out=tmp_path, progress=False, tasks=("retrieval",))
            for s in (baseline_spec("procrustes"), baseline_spec("nn-transfer"))]
    paths = [str(res.write_results(d, tmp_path / f"{d['model']['name']}.json")) for d in docs]
    assert main(["eval", "--compare", *paths, "--reference", "procrustes", "--metric", "retrieval/mean_R@10",
                 "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "procrustes" in out and "nn-transfer" in out and "chance" in out
    assert (tmp_path / "report" / "report.md").exists()
    assert main(["eval", "--compare", str(tmp_path / "missing.json")]) == 2


def test_a_training_free_bound_model_gives_normalised_rows_and_blends_to_unit_norm(planted_suite):
    from anybind.align.bound import BoundModel
    from anybind.align.fit import fit_baseline

    fd = planted_suite.fold_data(0)
    base = fit_baseline("cca", {}, fd.data, fd.split_pairs["train"])
    rows = fd.data.side("image").rows(np.arange(5))
    z = BoundModel(fd.data.layers, "image", baseline=base).encode("image", rows)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    assert torch.allclose(F.normalize(z, dim=1), z)
    # a blend sets the two spaces side by side, weighted so a cosine is w * s1 + (1 - w) * s2
    both = BoundModel(fd.data.layers, "image", space=None, baseline=base)
    both.space, both.weight = _unit_space(fd), 0.3
    zb = both.encode("image", rows)
    torch.testing.assert_close(zb.norm(dim=1), torch.ones(5))
    s1 = both.space.encode("image", rows) @ both.space.encode("image", rows).T
    torch.testing.assert_close(zb @ zb.T, 0.3 * s1 + 0.7 * (z @ z.T), atol=1e-5, rtol=0)


def _unit_space(fd):
    from anybind.align.projectors import build_projector
    from anybind.align.space import ProjectorSpace

    torch.manual_seed(0)
    dims = {n: fd.data.side(n).dims[0] for n in fd.data.names}
    return ProjectorSpace({n: build_projector("linear", d, 16) for n, d in dims.items()}, fd.data.layers)


def test_cli_eval_on_user_datasets_in_standard_layouts(tmp_path, cache, capsys):
    """Retrieval on a Karpathy-split JSON, zero-shot and the probe on an ImageNet-style folder."""
    karpathy, _, val, _ = replicas(tmp_path)
    out = tmp_path / "eval"
    argv = ["eval", "--image", "random:image", "--text", "random:text", "--models", "nn-transfer,procrustes",
            "--data", f"karpathy:{karpathy}", "--zeroshot", f"imagenet:{val}", "--probe", f"imagenet:{val}",
            "--folds", "0,1", "--seeds", "1", "--metric", "retrieval/mean_R@10", "--reference", "nn-transfer",
            "--out", str(out), "-q"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "nn-transfer" in text and "procrustes" in text and "leakage" in text
    doc = res.read_results(out / "results" / "nn-transfer.json")
    assert doc["data"]["zeroshot_classes"] == ["n00000", "n00001", "n00002"]  # folder names (no names file)
    for run in doc["runs"]:
        assert {"retrieval/mean_R@10", "zeroshot/balanced_accuracy", "probe/top1"} <= set(run["metrics"])
    assert (out / "report.md").exists()


def test_fold_and_seed_arguments_are_a_count_or_a_list():
    from anybind.cli import _count_or_list
    from anybind.errors import AnybindError

    assert _count_or_list("5") == [0, 1, 2, 3, 4] and _count_or_list("1") == [0]
    assert _count_or_list("0,2") == [0, 2] and _count_or_list("2,") == [2]
    with pytest.raises(AnybindError, match="'0,'"):
        _count_or_list("0")  # "no folds" is never what was meant
    with pytest.raises(AnybindError, match="a count"):
        _count_or_list("x")


def test_a_regrouped_dataset_reruns_instead_of_reading_stale_results(tmp_path):
    # results and trained runs are keyed by the stores *and* their grouping: after the dataset
    # index regroups items (sync_splits on a cache hit), fold 0 is another split and must re-run
    from anybind.data.index import DatasetIndex
    from anybind.features.extract import sync_splits

    img, txt = planted_stores(tmp_path / "stores", n_items=300)
    spec, out = ModelSpec("linear", recipe="linear", overrides=FAST), tmp_path / "eval"
    before = Suite(img, txt)
    run_model(spec, before, folds=[0], seeds=[0], out=out, tasks=("retrieval",), progress=False)
    run_model(spec, Suite(img, txt), folds=[0], seeds=[0], out=out, tasks=("retrieval",), progress=False)
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # same grouping: read back
    recs = [{"item_id": i, "image": f"{i}.png", "group": f"pair{k // 2}"} for k, i in enumerate(img.item_ids)]
    regrouped_index = DatasetIndex.from_records("planted", recs, {"image": "image"})
    assert sync_splits(img, regrouped_index) > 0 and sync_splits(txt, regrouped_index) > 0
    after = Suite(img, txt)
    assert after.splits_fingerprint != before.splits_fingerprint
    doc = run_model(spec, after, folds=[0], seeds=[0], out=out, tasks=("retrieval",), progress=False)
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # re-run on the new split
    assert len(list((out / "runs").iterdir())) == 2  # and trained again, not resumed from the old split
    test_items = np.unique(after.fold_data(0).split_pairs["test"].anchor_rows)
    pair_of = {k: k // 2 for k in range(300)}
    train_items = set(np.unique(after.fold_data(0).split_pairs["train"].anchor_rows).tolist())
    assert not any(pair_of[t] == pair_of[u] for t in test_items for u in train_items if abs(t - u) == 1)
    assert doc["runs"][0]["metrics"]["retrieval/mean_R@10"] > 0
