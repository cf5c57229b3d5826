"""Ranking candidate stores, the report files, and `--layers auto`."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from anybind.assess.rank import assess
from anybind.cli import main
from anybind.errors import AnybindError
from anybind.features import extract, write_store
from anybind.features.layers import auto_layers
from anybind.saving import read_config

sys.path.insert(0, str(Path(__file__).parent))
from _toy import toy_text_index  # noqa: E402


def _stores(root: Path, n=400, seed=0, all_train=True):
    """Text 'final' is a linear view of a latent; image candidate A holds it at layer.2 (its final
    is noisier), candidate B is unrelated noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 8)).astype(np.float32)
    ids = [f"it{i:04d}" for i in range(n)]
    splits = ["train"] * n if all_train else None  # None: the index's hash rule (train/val/test)
    good = {"layer.1": rng.standard_normal((n, 24)).astype(np.float32),
            "layer.2": z @ rng.standard_normal((8, 24)).astype(np.float32),
            "final": z @ rng.standard_normal((8, 16)).astype(np.float32) + 1.5 * rng.standard_normal((n, 16)).astype(np.float32)}
    a = write_store(root / "a", good, ids, modality="image", field="image", dataset="syn", encoder="enc-a", splits=splits)
    b = write_store(root / "b", {"layer.1": rng.standard_normal((n, 12)).astype(np.float32),
                                 "final": rng.standard_normal((n, 12)).astype(np.float32)},
                    ids, modality="image", field="image", dataset="syn", encoder="enc-b", splits=splits)
    t = write_store(root / "t", {"final": z @ rng.standard_normal((8, 20)).astype(np.float32)}, ids,
                    modality="text", field="caption", dataset="syn", encoder="enc-t", splits=splits)
    return a, b, t


def test_ranking_report_and_recommendation(tmp_path, cache):
    a, b, t = _stores(tmp_path)
    result = assess({"image": [b, a], "text": [t]}, n=300, k=10, out=tmp_path / "report", progress=False)
    ranked = result.ranked()
    assert ranked[0].a.path == a.path and ranked[0].best[:2] == ("layer.2", "final")
    assert ranked[0].best[2] > 0.5 > ranked[1].best[2]
    assert ranked[0].scores.shape == (3, 1) and ranked[0].n == 300
    rec = result.recommendation()
    assert rec["pair"]["image"] == {"encoder": "enc-a", "layers": ["layer.2"]}
    assert rec["encoders"]["enc-b"]["layers"][0] in ("layer.1", "final")
    out = tmp_path / "report"
    data = json.loads((out / "assessment.json").read_text())
    assert data["ranking"][0]["best"]["a"] == "layer.2" and data["ranking"][0]["heatmap"] == "heatmap-01.png"
    assert (out / "heatmap-01.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1 | enc-a | enc-t | layer.2 x final |" in (out / "ranking.md").read_text()
    # what assess writes is what `--layers auto` reads (anybind.features.layers: one reader)
    assert auto_layers("enc-a") == ["layer.2"]  # from the cache's latest.json
    assert auto_layers("enc-a", out / "assessment.json") == ["layer.2"]
    assert auto_layers("enc-a", out) == ["layer.2"]  # the report folder
    assert auto_layers(None, out, modality="image") == ["layer.2"]  # the best pair's side
    with pytest.raises(AnybindError, match="did not score nothing-like-this"):
        auto_layers("nothing-like-this")


def test_assess_has_no_second_auto_reader():
    import anybind.assess
    import anybind.assess.rank

    assert not hasattr(anybind.assess, "auto_layers") and not hasattr(anybind.assess.rank, "auto_layers")


def test_layers_auto_in_extract(tmp_path, cache):
    with pytest.raises(AnybindError, match="run `anybind assess` first"):
        extract("random:text", toy_text_index(), layers="auto", progress=False)
    f = tmp_path / "assessment.json"
    f.write_text(json.dumps({"recommendation": {"encoders": {"random:text": {"layers": ["layer.2"], "score": 0.5}}}}))
    store = extract("random:text", toy_text_index(), layers="auto", assessment=f, progress=False)
    assert list(store.layers) == ["layer.2"]


def test_cli_assess(tmp_path, cache, capsys):
    a, b, t = _stores(tmp_path)
    code = main(["assess", "--store", f"image={a.path}", "--store", f"image={b.path}", "--store", f"text={t.path}",
                 "--n", "200", "--k", "sqrt", "--out", str(tmp_path / "rep"), "-q"])
    assert code == 0
    out = capsys.readouterr().out
    assert "recommended: image=enc-a layers layer.2" in out
    assert main(["assess", "--store", f"image={a.path}", "-q"]) == 2


def test_train_layers_auto_uses_the_assessment(tmp_path, cache, capsys):
    a, b, t = _stores(tmp_path, n=500, all_train=False)
    assess({"image": [a, b], "text": [t]}, n=300, out=tmp_path / "rep", progress=False)
    code = main(["train", "--recipe", "linear", "--store", f"image={a.path}", "--store", f"text={t.path}",
                 "--layers", "image=auto", "--set", "train.max_steps=4", "--set", "train.batch_size=64",
                 "--set", "train.val_every=2", "--out", str(tmp_path / "run"), "-q"])
    assert code == 0, capsys.readouterr().err
    bound = read_config(tmp_path / "run" / "best")  # the saved model's config (format 2)
    assert bound["layers"]["image"] == ["layer.2"]  # what the assessment recommended for enc-a
