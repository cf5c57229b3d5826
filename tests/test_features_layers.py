"""`--layers` resolution: one function for extract, train and run (features never imports assess)."""

import json

import pytest

from anybind.errors import AnybindError, LayerError
from anybind.features.layers import latest_assessment_path, resolve_layers

NAMES = ["layer.0", "layer.1", "layer.2", "layer.3", "final"]


def test_names_lists_and_keywords():
    assert resolve_layers(None, NAMES) == ["final"]
    assert resolve_layers("", NAMES) == ["final"]
    assert resolve_layers("final", NAMES) == ["final"]
    assert resolve_layers("1, 2,final", NAMES) == ["layer.1", "layer.2", "final"]
    assert resolve_layers("last", NAMES) == ["layer.3"]
    assert resolve_layers("-1", NAMES) == resolve_layers("layer.-1", NAMES) == ["layer.3"]
    assert resolve_layers("layer.-2", NAMES) == ["layer.2"]
    assert resolve_layers("all", NAMES) == NAMES
    assert resolve_layers(["layer.2", 2], NAMES) == ["layer.2"]  # duplicates dropped, order kept
    assert resolve_layers("8,final", None) == ["layer.8", "final"]  # unchecked without names
    assert resolve_layers("2", {n: 16 for n in NAMES}) == ["layer.2"]  # a {name: dim} mapping


def test_unknown_layers_are_refused_clearly():
    with pytest.raises(LayerError, match=r"has no layer '9': it has layer.0 ... layer.3 and final"):
        resolve_layers("9", NAMES, encoder="random:text")
    with pytest.raises(LayerError, match="did you mean 'final'"):
        resolve_layers("fnal", NAMES)
    with pytest.raises(LayerError, match="need the layer names"):
        resolve_layers("all", None)
    with pytest.raises(LayerError, match="need the layer names"):
        resolve_layers("last", None)


def _assessment() -> dict:
    return {"format": 1, "recommendation": {
        "pair": {"image": {"encoder": "enc-a", "layers": ["layer.2"]},
                 "text": {"encoder": "enc-b", "layers": ["final"]}, "score": 0.5},
        "encoders": {"enc-a": {"layers": ["layer.2"], "score": 0.5}, "enc-b": {"layers": ["final"], "score": 0.5}}}}


def test_auto_reads_an_assessment_file_folder_dict_or_the_cache(tmp_path):
    (tmp_path / "assess").mkdir()
    (tmp_path / "assess" / "assessment.json").write_text(json.dumps(_assessment()))
    assert resolve_layers("auto", NAMES, tmp_path / "assess", encoder="enc-a") == ["layer.2"]
    assert resolve_layers("auto", NAMES, tmp_path / "assess" / "assessment.json", encoder="enc-b") == ["final"]
    assert resolve_layers("auto", NAMES, _assessment(), modality="image") == ["layer.2"]
    latest = latest_assessment_path(tmp_path / "cache")
    latest.parent.mkdir(parents=True)
    latest.write_text(json.dumps(_assessment()))
    assert resolve_layers(" auto ", NAMES, encoder="enc-a", cache=tmp_path / "cache") == ["layer.2"]
    with pytest.raises(AnybindError, match="did not score enc-z"):
        resolve_layers("auto", NAMES, _assessment(), encoder="enc-z")
    with pytest.raises(AnybindError, match="does not exist: run `anybind assess`"):
        resolve_layers("auto", NAMES, encoder="enc-a", cache=tmp_path / "empty")


def test_auto_checks_the_recommended_layers_against_the_encoder():
    with pytest.raises(LayerError, match="has no layer 'layer.2'"):
        resolve_layers("auto", ["layer.0", "final"], _assessment(), encoder="enc-a")


def test_features_does_not_import_assess():
    import subprocess
    import sys

    code = "import sys, anybind.features; print(any(m.startswith('anybind.assess') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_names_are_checked_against_the_syntax_without_layer_names():
    # `anybind train --layers text=finale` with no store names yet: refused now, not later
    with pytest.raises(LayerError, match=r"'finale' is not a layer \(did you mean 'final'\?\)"):
        resolve_layers("3,finale", None)
    with pytest.raises(LayerError, match="'layer.x' is not a layer"):
        resolve_layers(["layer.x"], None)
    assert resolve_layers([8, " final"], None) == ["layer.8", "final"]  # numbers become layer.N


def test_all_and_auto_stand_alone():
    for text in ("all,final", "3,auto", ["all"] + ["final"]):
        with pytest.raises(LayerError, match="stands alone"):
            resolve_layers(text, NAMES)
    assert resolve_layers(["all"], NAMES) == NAMES  # a list of one is the keyword


def test_the_layers_syntax_is_parsed_in_one_module():
    """No second parser: the patterns of the syntax appear only in anybind/encoders/layers.py."""
    from pathlib import Path

    import anybind

    src = Path(anybind.__file__).parent
    patterns = (r'r"-?\d+', r"layer\.-", r"layer\.(-", '== "last"', "_LAYER_TOKEN")
    found = [f"{p.relative_to(src)}: {pat}" for p in src.rglob("*.py") if p.name != "layers.py" or p.parent.name != "encoders"
             for pat in patterns if pat in p.read_text()]
    assert not found, found
