"""Results documents (schema, summary, paired differences), the Markdown tables, the plots."""

import json
import math
import sys

import numpy as np
import pytest

from anybind.errors import AnybindError
from anybind.evaluate.results import (
    SCHEMA,
    ResultsError,
    add_run,
    metric_sort_key,
    new_results,
    paired_difference,
    read_results,
    summarise,
    t_quantile,
    write_results,
)

DATA = {"dataset": "openclipart", "dataset_fingerprint": "abc123",
        "stores": {"image": {"spec": "efficientnet-lite0", "layers": ["final"], "path": "/c/img"},
                   "text": {"spec": "minilm-l6", "layers": ["final"], "path": "/c/txt"}}}
PROTOCOL = {"folds": [0, 1, 2], "seeds": [0, 1], "description": "5-fold by group"}


def _doc(name="default", kind="trained", values=None, seeds=(0, 1), chance=None):
    """values[(fold, seed)] -> metrics dict; default: mean_R@10 = 0.1 * (fold + 1) + 0.01 * seed."""
    doc = new_results({"name": name, "kind": kind}, DATA, PROTOCOL, chance=chance)
    if values is None:
        values = {(f, s): {"retrieval/mean_R@10": 0.1 * (f + 1) + 0.01 * s} for f in range(3) for s in seeds}
    for (fold, seed), metrics in values.items():
        add_run(doc, fold, seed, metrics)
    return doc


def test_new_results_fills_schema_versions_and_defaults():
    doc = _doc()
    assert doc["schema"] == SCHEMA == "anybind.eval/1"
    assert set(doc["versions"]) == {"anybind", "torch", "numpy", "python"}
    assert doc["created"].endswith("+00:00")
    assert doc["model"]["recipe"] is None and doc["model"]["settings"] == {}
    with pytest.raises(ResultsError, match="kind"):
        new_results({"name": "x", "kind": "magic"}, DATA, PROTOCOL)
    with pytest.raises(ResultsError, match="already"):
        add_run(doc, 0, 0, {"retrieval/mean_R@10": 0.5})
    with pytest.raises(ResultsError, match="finite"):
        add_run(doc, 4, 0, {"retrieval/mean_R@10": float("nan")})
    with pytest.raises(ResultsError, match="not a number"):
        add_run(doc, 4, 0, {"retrieval/mean_R@10": "high"})


def test_summarise_hand_worked():
    doc = _doc(values={(0, 0): {"zeroshot/top1": 0.2, "retrieval/mean_R@1": 0.5},
                       (1, 0): {"zeroshot/top1": 0.4},
                       (2, 0): {"zeroshot/top1": 0.9}})
    s = summarise(doc)
    assert list(s) == ["retrieval/mean_R@1", "zeroshot/top1"]  # retrieval first
    top1 = s["zeroshot/top1"]
    assert top1["mean"] == pytest.approx(0.5)
    # deviations -0.3, -0.1, 0.4: sum of squares 0.26, / (3 - 1) = 0.13
    assert top1["sd"] == pytest.approx(math.sqrt(0.13))
    assert (top1["n"], top1["min"], top1["max"]) == (3, 0.2, 0.9)
    assert s["retrieval/mean_R@1"] == {"mean": 0.5, "sd": 0.0, "n": 1, "min": 0.5, "max": 0.5}


def test_metric_order_retrieval_then_zeroshot_then_probe():
    names = ["probe/fashion-mnist/projected_accuracy", "zeroshot/top1", "retrieval/mean_R@10",
             "retrieval/i2t_R@10", "retrieval/i2t_R@5", "retrieval/t2i_R@1", "zeroshot/balanced_accuracy",
             "retrieval/i2t_R@1", "other/x"]
    assert sorted(names, key=metric_sort_key) == [
        "retrieval/i2t_R@1", "retrieval/i2t_R@5", "retrieval/i2t_R@10", "retrieval/t2i_R@1",
        "retrieval/mean_R@10", "zeroshot/balanced_accuracy", "zeroshot/top1",
        "probe/fashion-mnist/projected_accuracy", "other/x"]


def test_paired_difference_hand_worked():
    m = "retrieval/mean_R@10"
    a = _doc("a", values={(0, 0): {m: 0.5}, (1, 0): {m: 0.6}, (2, 0): {m: 0.7}, (3, 0): {m: 0.9}}, seeds=(0,))
    b = _doc("b", values={(0, 0): {m: 0.4}, (1, 0): {m: 0.4}, (2, 0): {m: 0.4}}, seeds=(0,))
    d = paired_difference(a, b, m)  # differences 0.1, 0.2, 0.3 (fold 3 has no partner)
    assert d["n"] == 3 and len(d["pairs"]) == 3
    assert d["mean"] == pytest.approx(0.2) and d["sd"] == pytest.approx(0.1)
    half = 4.303 * 0.1 / math.sqrt(3)
    assert d["low"] == pytest.approx(0.2 - half, abs=1e-4) and d["high"] == pytest.approx(0.2 + half, abs=1e-4)


def test_paired_difference_matches_a_seedless_baseline_by_fold():
    m = "retrieval/mean_R@10"
    trained = _doc("trained", values={(f, s): {m: 0.5 + 0.1 * f + 0.01 * s} for f in range(3) for s in range(3)})
    baseline = _doc("procrustes", kind="baseline", values={(f, -1): {m: 0.4 + 0.1 * f} for f in range(3)})
    d = paired_difference(trained, baseline, m)
    assert d["n"] == 9  # every seed of every fold, against the fold's baseline value
    assert sorted({round(p["diff"], 9) for p in d["pairs"]}) == pytest.approx([0.1, 0.11, 0.12])
    assert d["mean"] == pytest.approx(0.11) and d["low"] > 0
    reverse = paired_difference(baseline, trained, m)
    assert reverse["n"] == 9 and reverse["mean"] == pytest.approx(-0.11) and reverse["high"] < 0
    # two trained models with several seeds pair exactly by (fold, seed)
    other = _doc("other", values={(f, s): {m: 0.5} for f in range(3) for s in (1, 2)})
    assert paired_difference(trained, other, m)["n"] == 6


def test_paired_difference_over_fold_means_hand_worked():
    m = "retrieval/mean_R@10"
    # differences: fold 0 seeds 0.1, 0.3 (mean 0.2); fold 1 0.2, 0.4 (0.3); fold 2 0.4, 0.4 (0.4)
    diffs = {(0, 0): 0.1, (0, 1): 0.3, (1, 0): 0.2, (1, 1): 0.4, (2, 0): 0.4, (2, 1): 0.4}
    a = _doc("a", values={k: {m: 0.5 + v} for k, v in diffs.items()}, seeds=(0, 1))
    b = _doc("b", values={k: {m: 0.5} for k in diffs}, seeds=(0, 1))
    d = paired_difference(a, b, m)
    assert d["n"] == 6 and d["mean"] == pytest.approx(0.3)
    f = d["folds"]  # fold means 0.2, 0.3, 0.4: mean 0.3, sd 0.1, t_{0.975, 2} = 4.303
    assert f["n"] == 3 and f["mean"] == pytest.approx(0.3) and f["sd"] == pytest.approx(0.1)
    assert f["low"] == pytest.approx(0.3 - 4.303 * 0.1 / math.sqrt(3), abs=1e-4)
    assert f["high"] - f["low"] > d["high"] - d["low"]  # fewer, independent values: the wider interval
    one_fold = paired_difference(_doc("a", values={(0, 0): {m: 0.6}, (0, 1): {m: 0.7}}, seeds=(0, 1)),
                                 _doc("b", values={(0, 0): {m: 0.5}, (0, 1): {m: 0.5}}, seeds=(0, 1)), m)
    assert one_fold["folds"] is None and one_fold["n"] == 2
    from anybind.evaluate.results import t_interval

    with pytest.raises(ResultsError, match="at least 2 values"):
        t_interval([0.3])
    from anybind.evaluate.report import compare_table

    table = compare_table([a, b], "a", m)
    assert "interval over fold means" in table and f"[{100 * f['low']:+.1f}, {100 * f['high']:+.1f}]" in table


def test_paired_difference_needs_two_pairs_and_the_same_data():
    m = "retrieval/mean_R@10"
    a = _doc("a", values={(0, 1): {m: 0.5}, (1, 1): {m: 0.6}})
    b = _doc("b", values={(0, 2): {m: 0.5}, (1, 1): {m: 0.6}})
    with pytest.raises(ResultsError, match="only 1 run"):
        paired_difference(a, b, m)
    c = _doc("c")
    c["data"] = {**DATA, "dataset_fingerprint": "other"}
    with pytest.raises(ResultsError, match="different data"):
        paired_difference(_doc("d"), c, m)


def test_t_quantile_falls_back_to_the_table(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # as if scipy were not installed
    assert t_quantile(0.975, 2) == pytest.approx(4.303)
    assert t_quantile(0.975, 100) == pytest.approx(1.96)
    with pytest.raises(ResultsError, match="scipy"):
        t_quantile(0.95, 4)


def test_write_read_round_trip(tmp_path):
    doc = _doc(chance={"retrieval/mean_R@10": 0.02})
    doc["runs"][0]["per_class"] = {"zeroshot": {"cat": 0.5, "dog": 0.25}}
    add_run(doc, 3, 0, {"retrieval/mean_R@10": np.float32(0.25)}, info={"best_step": np.int64(7), "log": tmp_path})
    path = write_results(doc, tmp_path / "sub" / "results.json")
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    back = read_results(path)
    assert back["runs"][:6] == doc["runs"][:6] and back["chance"] == doc["chance"]
    assert back["summary"]["retrieval/mean_R@10"]["n"] == 7
    assert back["runs"][-1]["info"] == {"best_step": 7, "log": str(tmp_path)}
    assert json.loads(path.read_text())["summary"] == back["summary"]


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.update(schema="anybind.eval/2"), "anybind.eval/2"),
    (lambda d: d.update(schema="something"), "not an anybind results file"),
    (lambda d: d.pop("protocol"), "'protocol'"),
    (lambda d: d["runs"][0].pop("metrics"), "'metrics'"),
    (lambda d: d["runs"][1]["metrics"].update({"zeroshot/top1": float("nan")}), "finite"),
    (lambda d: d["chance"].update({"zeroshot/top1": "high"}), "finite"),
])
def test_read_results_rejects_broken_documents(tmp_path, breakage, message):
    path = write_results(_doc(), tmp_path / "results.json")
    doc = json.loads(path.read_text())
    breakage(doc)
    path.write_text(json.dumps(doc))  # json writes NaN as a bare NaN, which json reads back
    with pytest.raises(ResultsError, match=message) as info:
        read_results(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, AnybindError)


def test_read_results_missing_or_not_json(tmp_path):
    with pytest.raises(ResultsError, match="no such results file"):
        read_results(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ResultsError, match="not valid JSON"):
        read_results(tmp_path / "bad.json")


def _two_models():
    m = ["retrieval/i2t_R@1", "retrieval/mean_R@10", "zeroshot/top1"]
    a = _doc("default", values={(f, s): {m[0]: 0.30 + 0.02 * f, m[1]: 0.60 + 0.01 * s, m[2]: 0.40}
                                for f in range(3) for s in range(2)},
             chance={m[0]: 0.01, m[1]: 0.05, m[2]: 0.1})
    b = _doc("procrustes", kind="baseline", values={(f, -1): {m[0]: 0.35, m[1]: 0.50} for f in range(3)})
    return a, b


def test_markdown_table_cells_bold_and_chance():
    from anybind.evaluate.report import markdown_table

    a, b = _two_models()
    table = markdown_table([a, b])
    lines = table.splitlines()
    assert lines[0] == "| model | retrieval/i2t_R@1 | retrieval/mean_R@10 |"  # zeroshot/top1 only in a
    # default: i2t_R@1 = 0.30, 0.32, 0.34 per fold (mean 32.0, sd 1.8); mean_R@10 = 0.60 / 0.61
    assert lines[2] == "| default | 32.0 ± 1.8 | **60.5 ± 0.5** |"
    assert lines[3] == "| procrustes | **35.0 ± 0.0** | 50.0 ± 0.0 |"
    assert lines[4] == "| *chance* | 1.0 | 5.0 |"
    assert "n runs: default 6, procrustes 3" in table
    single = markdown_table([a], metrics=["zeroshot/top1"], chance=False)
    assert "| default | 40.0 ± 0.0 |" in single and "**" not in single and "chance" not in single


def test_compare_table_paired_differences():
    from anybind.evaluate.report import compare_table

    a, b = _two_models()
    text = compare_table([a, b], "default", "retrieval/mean_R@10")
    row = next(line for line in text.splitlines() if line.startswith("| procrustes | +10.5"))
    assert "▲ above 0" in row and "| 6 |" in row
    assert compare_table([a, b]).count("| procrustes |") == 1
    with pytest.raises(ResultsError, match="'nobody'"):
        compare_table([a, b], "nobody")


def _png_ok(path):
    from PIL import Image

    assert path.exists() and path.stat().st_size > 2000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150


def _training_log(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, 61):
        lines.append({"step": step, "split": "train", "loss": 4.0 / step**0.3 + 0.05 * (step % 3),
                      "lr": 1e-3, "temperature": 0.05})
        if step % 20 == 0:
            r10 = {20: 0.3, 40: 0.45, 60: 0.4}[step]
            lines.append({"step": step, "split": "val", "mean_R@1": r10 / 3, "mean_R@10": r10,
                          "image_to_text_R@1": r10 / 3})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 61, \"spl")  # cut short
    return path


def test_plots_write_pngs(tmp_path):
    from anybind.evaluate.plots import (
        plot_per_class,
        plot_recall_at_k,
        plot_sweep,
        plot_training_curves,
        read_training_log,
    )

    log = _training_log(tmp_path / "run" / "metrics.jsonl")
    train, val = read_training_log(log)
    assert len(train) == 60 and [r["step"] for r in val] == [20, 40, 60]
    _png_ok(plot_training_curves(log, tmp_path / "a" / "training.png"))
    _png_ok(plot_per_class({"cat": 0.8, "dog": 0.3, "bird": 0.55}, tmp_path / "b" / "pc.png", "zero-shot"))
    ks = {f"retrieval/{d}_R@{k}": 0.1 * k ** 0.5 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    docs = [_doc("a", values={(f, 0): {k: v + 0.01 * f for k, v in ks.items()} for f in range(3)}, seeds=(0,)),
            _doc("b", values={(f, -1): {k: v / 2 for k, v in ks.items()} for f in range(3)})]
    _png_ok(plot_recall_at_k(docs, tmp_path / "c" / "recall.png"))
    series = {"default": [{"value": n, "mean": 0.2 + 0.05 * i, "sd": 0.02} for i, n in enumerate((500, 1000, 4000))],
              "sail": [{"value": n, "mean": 0.25 + 0.04 * i, "sd": 0.01} for i, n in enumerate((500, 1000, 4000))]}
    _png_ok(plot_sweep(series, tmp_path / "d" / "sweep.png", "training pairs", "mean R@10", log_x=True))
    with pytest.raises(ResultsError, match="recall@k"):
        plot_recall_at_k([_doc()], tmp_path / "e.png")


def test_write_report(tmp_path):
    from anybind.evaluate.report import write_report

    a, b = _two_models()
    a["runs"][0]["per_class"] = {"zeroshot": {"cat": 0.8, "dog": 0.1}}
    a["runs"][1]["per_class"] = {"zeroshot": {"cat": 0.6, "dog": 0.3}}
    a["runs"][0]["info"]["metrics_jsonl"] = str(_training_log(tmp_path / "metrics.jsonl"))
    paths = write_report([a, b], tmp_path / "report", reference="default")
    assert set(paths) == {"report", "recall_at_k", "per_class/default/zeroshot", "training/default"}
    for key, png in paths.items():
        if key != "report":
            _png_ok(png)
    text = paths["report"].read_text()
    assert "# Evaluation: default, procrustes" in text and "openclipart" in text and "`minilm-l6`" in text
    assert "| cat | 70.0 |" in text and "![recall@k](plots/recall_at_k.png)" in text
    assert "▲ above 0" in text and "plots/training-default.png" in text


# ---- files: written whole (anybind.atomic), named safely (anybind.checks.slug) -------------------
def test_a_failed_results_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results" / "default.json"
    write_results(_doc(), path)
    before = path.read_text()
    doc = _doc()
    doc["runs"][0]["info"]["handle"] = object()  # not JSON: fails before the file is touched
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_results(doc, path)
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["default.json"]  # no temporary left


def test_report_files_have_safe_names_and_no_leftovers(tmp_path):
    from anybind.evaluate.report import write_report

    a, _ = _two_models()
    a["model"]["name"] = "my model/v2"
    a["runs"][0]["per_class"] = {"zeroshot": {"cat": 0.8, "dog": 0.1}}
    paths = write_report(a, tmp_path / "report")
    png = paths["per_class/my model/v2/zeroshot"]
    assert png.parent == tmp_path / "report" / "plots" and png.name == "per-class-my_model_v2-zeroshot.png"
    _png_ok(png)
    every = [p.name for p in (tmp_path / "report").rglob("*")]
    assert not [n for n in every if n.startswith(".")], every  # no temporary files left behind
