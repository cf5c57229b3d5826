"""`anybind run`: run files, the whole pipeline on a small real run, and the cached second run."""

import json
import time
from pathlib import Path

import pytest

from anybind.align.recipe import available_recipes, load_recipe
from anybind.cli import main
from anybind.encoders import list_encoders
from anybind.run import RUNS_DIR, RunFileError, load_run_file

REAL = Path("/usr/share/openclipart/png").is_dir() and Path("/usr/share/datasets/fashion-mnist").is_dir()


@pytest.mark.parametrize("path", sorted(RUNS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_built_in_run_file_parses_and_names_registered_parts(path):
    run = load_run_file(path)
    load_recipe(run.recipe, run.overrides)
    known = {r["spec"] for r in list_encoders()}
    prefixes = {s.split(":", 1)[0] for s in known if ":" in s}
    for enc in run.encoders.values():
        assert enc.spec in known or enc.spec.split(":", 1)[0] in prefixes, enc.spec


def test_every_recipe_parses():
    for name in available_recipes():
        assert load_recipe(name).name == name


def test_run_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nencoders: {image: {spec: efficientnet-lite0}, text: {spec: minilm-l6}}\nevalute: {}\n")
    with pytest.raises(RunFileError, match="evalute"):
        load_run_file(bad)
    bad.write_text("name: x\nencoders: {image: {spec: efficientnet-lite0}}\n")
    with pytest.raises(RunFileError, match="two modalities"):
        load_run_file(bad)
    with pytest.raises(RunFileError, match="no run file"):
        load_run_file("no-such-run")
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not REAL, reason="Debian openclipart-png and dataset-fashion-mnist not installed")
def test_a_small_real_run_end_to_end_then_fully_cached(tmp_path, cache, capsys):
    runfile = tmp_path / "small.yaml"
    runfile.write_text("""
name: small
data: openclipart
items: 240
encoders:
  image: {spec: efficientnet-lite0, layers: final}
  text: {spec: minilm-l6, layers: final}
assess: {items: 160}
recipe: default
overrides: [train.max_steps=20, train.val_every=10, train.batch_size=128]
evaluate: {probe_sizes: [200, 100], baselines: [nn-transfer]}
""")
    # the cache already holds a caption store with more layers than the run asks for: a hit, and
    # the run must still read only `final` (it once trained on both and failed)
    from anybind.data import load_dataset
    from anybind.features import extract

    extract("minilm-l6", load_dataset("openclipart", cache=cache).spread(240), layers="3,final", cache=cache,
            progress=False)
    out = tmp_path / "run"
    assert main(["run", str(runfile), "--out", str(out), "-q"]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert stages["extract.text"]["outputs"]["layers"] == ["final"]
    for name in ("report.html", "report.md", "stages.json", "run.yaml", "bundle/bundle.json", "assess/assessment.json"):
        assert (out / name).exists(), name
    html = (out / "report.html").read_text()
    order = [html.index(h) for h in ("What was run", "Results", "Training curves", "Layer x layer", "Recall@k",
                                     "Per-class accuracy", "The bundle")]
    assert order == sorted(order) and html.count("data:image/png;base64,") >= 4  # self-contained
    doc = json.loads((out / "eval" / "results" / "default.json").read_text())
    assert doc["runs"][0]["metrics"]["retrieval/mean_R@10"] > doc["chance"]["retrieval/mean_R@10"]
    import anybind

    assert anybind.load(out / "bundle").encode_text(["a red bird"]).shape[0] == 1
    # the same file again: every stage cached, no encoder loaded, well within 30 s
    t0 = time.perf_counter()
    assert main(["run", str(runfile), "--out", str(out), "-q"]) == 0
    assert time.perf_counter() - t0 < 30
    this_run = json.loads((out / "report.json").read_text())["this_run"]
    assert all(v == 0.0 for k, v in this_run.items() if k != "report"), this_run


def test_a_custom_suite_run_on_standard_layouts(tmp_path, cache):
    """A run file on the user's own data: a Karpathy JSON for retrieval, an ImageNet-style folder
    for zero-shot and the probe (tiny replicas, random encoders)."""
    from _toy import replicas

    karpathy, _, val, _ = replicas(tmp_path)
    runfile = tmp_path / "custom.yaml"
    runfile.write_text(f"""
name: custom
data: karpathy:{karpathy}
encoders:
  image: {{spec: "random:image"}}
  text: {{spec: "random:text"}}
assess: {{enabled: false}}
recipe: linear
overrides: [train.max_steps=10, train.val_every=5, train.batch_size=32]
evaluate: {{suite: custom, zeroshot: "imagenet:{val}", probe: "imagenet:{val}", templates: default,
           baselines: [nn-transfer]}}
""")
    out = tmp_path / "run"
    assert main(["run", str(runfile), "--out", str(out), "-q"]) == 0
    doc = json.loads((out / "eval" / "results" / "linear.json").read_text())
    assert {"retrieval/mean_R@10", "zeroshot/balanced_accuracy", "probe/top1"} <= set(doc["runs"][0]["metrics"])
    assert (out / "report.html").exists() and (out / "bundle" / "bundle.json").exists()
