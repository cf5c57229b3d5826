"""`anybind run`: run files, the whole pipeline on a small real run, and the cached second run."""

import json
from pathlib import Path

import pytest

from anybind.align.recipe import available_recipes, load_recipe
from anybind.cli import main
from anybind.encoders import list_encoders
from anybind.errors import AnybindError
from anybind.run import (
    RUNS_DIR,
    RunFile,
    RunFileError,
    last_invocation,
    load_run_file,
    run_pipeline,
)

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
    with pytest.raises(RunFileError, match="did you mean 'evaluate'"):
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
    first = last_invocation(out)
    assert set(first) == set(stages) and set(first.values()) == {"ran"}, first
    # the same file again: every stage cached (none re-ran, so no encoder was loaded)
    assert main(["run", str(runfile), "--out", str(out), "-q"]) == 0
    again = last_invocation(out)
    assert set(again) == set(stages) and set(again.values()) == {"cached"}, again
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
           baselines: [nn-transfer], sweep_n: [20, all]}}
""")
    out, own_cache = tmp_path / "run", tmp_path / "own-cache"
    assert main(["run", str(runfile), "--out", str(out), "--cache", str(own_cache), "-q"]) == 0
    doc = json.loads((out / "eval" / "results" / "linear.json").read_text())
    assert {"retrieval/mean_R@10", "zeroshot/balanced_accuracy", "probe/top1"} <= set(doc["runs"][0]["metrics"])
    assert (out / "report.html").exists() and (out / "bundle" / "bundle.json").exists()
    # --cache is honoured by every stage, the custom suite's labelled sets included
    assert not cache.exists() or not any(cache.iterdir()), sorted(cache.rglob("*"))[:5]
    assert len(list(own_cache.rglob("manifest.json"))) >= 3  # paired images, captions, the labelled set
    sweep = json.loads((out / "eval" / "sweep-n.json").read_text())
    assert sweep["schema"] == "anybind.sweep/1" and sweep["key"] == "n"
    assert [p["value"] for p in sweep["series"]["linear"]] == [20, "all"]
    assert sweep["series"]["linear"][0]["train_items"] == 20
    assert main(["run", str(runfile), "--out", str(out), "--cache", str(own_cache), "-q"]) == 0
    assert set(last_invocation(out).values()) == {"cached"}, last_invocation(out)


BASE = """
name: bad
data: openclipart
encoders:
  image: {spec: "random:image"}
  text: {spec: "random:text", layers: final}
assess: {enabled: false}
recipe: linear
"""

MISTAKES = {
    "task typo": ("evaluate: {tasks: [retreival]}", ["evaluate.tasks", "did you mean 'retrieval'"]),
    "builtin suite on other data": ("data: table:/no/pairs.csv", ["evaluate.suite: builtin", "table:/no/pairs.csv",
                                                                  "suite: custom"]),
    "spec does not parse": ('encoders: {image: {spec: "facebook/dinov2-small"}, text: {spec: "random:text"}}',
                            ["encoders.image.spec", "backend prefix"]),
    "spec of another modality": ('encoders: {image: {spec: minilm-l6}, text: {spec: "random:text"}}',
                                 ["encoders.image.spec", "minilm-l6 encodes text"]),
    "unknown recipe": ("recipe: lineer", ["recipe:", "no recipe 'lineer'"]),
    "bad override": ("overrides: [loss.bogus=1]", ["overrides:", "loss.bogus"]),
    "layers typo": ('encoders: {image: {spec: "random:image"}, text: {spec: "random:text", layers: "3,finale"}}',
                    ["encoders.text.layers", "did you mean 'final'"]),
    "nested key typo": ('encoders: {image: {spec: "random:image"}, text: {spec: "random:text", layer: final}}',
                        ["encoders.text.layer", "did you mean 'layers'"]),
    "unknown anchor": ("anchor: imgae", ["anchor", "did you mean 'image'"]),
    "unknown baseline": ("evaluate: {baselines: [procrustez]}", ["evaluate.baselines", "did you mean 'procrustes'"]),
    "unknown assess metric": ("assess: {metric: mutual_nn}", ["assess.metric", "mutual_knn"]),
    "task without its set": ("data: table:/no/pairs.csv\nevaluate: {suite: custom, tasks: [retrieval, probe]}",
                             ["evaluate.tasks names probe", "evaluate.probe is not set"]),
    "dataset prefix typo": ("data: tabel:/no/pairs.csv", ["data: unknown dataset", "did you mean 'table'"]),
    "fold that is not one": ("evaluate: {folds: [fixd]}", ["evaluate.folds[0]"]),
    "templates typo": ("evaluate: {templates: openai_imagnet}", ["evaluate.templates", "unknown template set 'openai_imagnet'",
                                                                  "openai_imagenet"]),
    "all inside a layer list": ('encoders: {image: {spec: "random:image", layers: "all,final"}, text: {spec: "random:text"}}',
                                ["encoders.image.layers", "'all' stands alone"]),
    "auto with no assessment": ('encoders: {image: {spec: "random:image", layers: auto}, text: {spec: "random:text"}}',
                                ["encoders.image.layers: auto", "anybind assess"]),
}


@pytest.mark.parametrize("mistake", list(MISTAKES), ids=lambda m: m.replace(" ", "-"))
def test_run_file_mistakes_are_refused_before_any_work(mistake, tmp_path, cache, capsys):
    change, needles = MISTAKES[mistake]
    keys = {line.split(":", 1)[0] for line in change.splitlines()}
    base = "\n".join(line for line in BASE.strip().splitlines() if line.split(":", 1)[0] not in keys
                     and not (line.startswith("  ") and "encoders" in keys))
    runfile = tmp_path / "bad.yaml"
    runfile.write_text(base + "\n" + change + "\n")
    out = tmp_path / "run"
    assert main(["run", str(runfile), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()  # refused before the run folder was made,
    assert not cache.exists() or not any(cache.iterdir())  # and before anything was listed or extracted


def test_a_layers_setting_is_checked_by_the_one_layers_parser():
    from anybind.encoders.layers import parse_layers
    from anybind.run import check_layer_text

    for text in ("last, -2, layer.3, final", "8", "all", " auto "):
        assert check_layer_text(text, "k") == text.strip()
    for text in ("3,finale", "all,final", "layer.x"):
        with pytest.raises(AnybindError) as want:
            parse_layers(text, syntax_only=True)
        with pytest.raises(RunFileError) as got:
            check_layer_text(text, "encoders.text.layers")
        assert str(got.value) == f"encoders.text.layers: {want.value}"


def test_evaluate_templates_are_checked_before_any_work(tmp_path, cache):
    """A template file is read and checked up front (each template needs one {c}), not when the
    zero-shot task reaches it after extract and train."""
    base = BASE.replace("recipe: linear", "recipe: linear\nevaluate: {templates: %s}")
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text('["a photo of a cat."]')
    good.write_text('["a photo of a {c}."]')
    runfile = tmp_path / "run.yaml"
    runfile.write_text(base % bad)
    with pytest.raises(RunFileError, match=r"evaluate.templates: template file .*bad.json: template 0 .* has 0"):
        load_run_file(runfile)
    runfile.write_text(base % (tmp_path / "missing.json"))
    with pytest.raises(RunFileError, match="evaluate.templates: unknown template set"):
        load_run_file(runfile)
    for ok in (good, "clipart"):
        runfile.write_text(base % ok)
        assert load_run_file(runfile).evaluate.templates == str(ok)
    assert not cache.exists()


def test_a_run_file_built_in_python_is_checked_too(tmp_path, cache):
    run = RunFile(name="py", data="table:/no/pairs.csv", recipe="linear",
                  encoders={"image": {"spec": "random:image"}, "text": {"spec": "random:text"}})
    assert run.anchor == "image" and run.encoders["text"].layers == "final"  # the first modality anchors
    with pytest.raises(RunFileError, match="evaluate.suite: builtin"):
        run_pipeline(run, out=tmp_path / "run")
    assert not (tmp_path / "run").exists() and not cache.exists()
    with pytest.raises(RunFileError, match="training binds two modalities"):
        run_pipeline(RunFile(encoders={m: {"spec": f"random:{m}"} for m in ("image", "text", "audio")}),
                     out=tmp_path / "run")
    yaml_layers = RunFile(encoders={"image": {"spec": "random:image", "layers": [2, "final"]},
                                    "text": {"spec": "random:text", "layers": 3}})
    assert yaml_layers.encoders["image"].layers == "2,final" and yaml_layers.encoders["text"].layers == "3"
