"""`anybind bridge`: two bound models joined through the modality they share.

A binds image + text (random:text), B binds audio + text through *another* text encoder
(random:text@5), both trained on the avtoy data (images, captions, a tone per caption) and exported.
C = A's space + B's audio, mapped through a map fitted on captions alone."""

import hashlib
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

import anybind
from _serving import live
from anybind.align import load_recipe
from anybind.align.bound import BoundModel
from anybind.align.bridge import (
    BridgeError,
    CCAInto,
    bridge_models,
    build_bridge_map,
    check_bridgeable,
    compose,
    corpus_from_stores,
    fit_map,
    held_out,
    load_bridge_map,
)
from anybind.align.trainer import train
from anybind.bundle import export_bundle
from anybind.bundle.bridge import bridge
from anybind.cli import main
from anybind.data import load_dataset
from anybind.errors import AnybindError
from anybind.features import extract
from test_bundle_modalities import audio_paths, avtoy_data, make_avtoy

OVERRIDES = ["train.max_steps=20", "train.batch_size=32", "train.val_every=10"]


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge")
    with avtoy_data(root / "cache"):
        data = make_avtoy(root)
        index = load_dataset(data)
        stores = {"image": extract("random:image", index, precision="fp32", progress=False),
                  "text_a": extract("random:text", index, precision="fp32", progress=False),
                  "text_b": extract("random:text@5", index, precision="fp32", progress=False),
                  "audio": extract("random:audio", index, field="audio", precision="fp32", progress=False)}
        run_a = train(load_recipe("default", OVERRIDES), {"image": stores["image"], "text": stores["text_a"]},
                      out=root / "run-a", progress=False)
        run_b = train(load_recipe("default", OVERRIDES), {"audio": stores["audio"], "text": stores["text_b"]},
                      out=root / "run-b", progress=False, anchor="audio")
        made = SimpleNamespace(root=root, data=data, index=index, stores=stores, a=export_bundle(run_a.out, root / "A"),
                               b=export_bundle(run_b.out, root / "B"))
        made.c = bridge(made.a, made.b, via="text", out=root / "C", corpus=data, maps=["procrustes", "ridge"],
                        progress=False)
        yield made


def test_the_bridged_bundle_keeps_a_and_adds_b_audio(pair):
    a_files, c_files = _hashes(pair.a / "model"), _hashes(pair.root / "C" / "model")
    # A's parts byte-identical; only the config (which now lists the added part) and added/ are new
    assert {k: v for k, v in c_files.items() if not k.startswith("added/") and k != "config.json"} == \
        {k: v for k, v in a_files.items() if k != "config.json"}
    assert {k for k in c_files if k.startswith("added/")} >= {"added/audio/config.json", "added/audio/map/config.json",
                                                              "added/audio/map/weights.safetensors",
                                                              "added/audio/source/config.json"}
    info = json.loads((pair.root / "C" / "bundle.json").read_text())
    assert list(info["modalities"]) == ["image", "text", "audio"]
    assert {m: e["encoder"] for m, e in info["modalities"].items()} == \
        {"image": "random:image", "text": "random:text", "audio": "random:audio"}  # text: A's encoder
    assert info["added"]["audio"]["to"] == "text" and info["added"]["audio"]["kind"].startswith("bridge:")
    report = pair.c.report
    assert report["chosen"]["map"] in ("procrustes", "ridge") and set(report["maps"]) == {"procrustes", "ridge"}
    assert report["corpus"]["rows"] == 120 and 0 < report["corpus"]["held_out_rows"] < 120


def test_the_bridged_bundle_loads_and_answers_every_modality(pair):
    a, c = anybind.load(pair.a), anybind.load(pair.root / "C")
    assert c.modalities == ["image", "text", "audio"] and c.added == {"audio": "text"}
    clips = audio_paths(pair.index, pair.stores["audio"])[:4]
    images = [pair.index.resolve(x) for x in pair.index.column("image")[:3]]
    z_aud, z_img, z_txt = c.encode_audio(clips), c.encode_image(images), c.encode_text(["a red square"])
    assert z_aud.shape == (4, a.dim) and torch.allclose(z_aud.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(z_img, a.encode_image(images)) and torch.equal(z_txt, a.encode_text(["a red square"]))
    # the audio path is B's bound audio vector through the saved map
    b = anybind.load(pair.b)
    fitted = load_bridge_map(pair.root / "C" / "model" / "added" / "audio" / "map")
    assert torch.allclose(z_aud, fitted.encode("audio", b.encode_audio(clips)), atol=1e-6)
    assert torch.equal(c.encode_audio(clips), z_aud)  # deterministic


def test_the_bridged_bundle_serves(pair):
    from anybind.serve.app import create_app

    pytest.importorskip("fastapi")
    clip = audio_paths(pair.index, pair.stores["audio"])[5]
    c = anybind.load(pair.root / "C")
    with live(create_app(pair.root / "C")) as base:
        health = httpx.get(base + "health", timeout=30).json()
        assert set(health.get("modalities", c.modalities)) >= {"image", "text", "audio"}
        with open(clip, "rb") as fh:
            r = httpx.post(base + "embed", files={"file": ("c.wav", fh.read(), "audio/wav")}, timeout=60)
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["embeddings"], c.encode_audio([clip]).numpy(), atol=1e-5)
        r = httpx.post(base + "embed", json={"texts": ["a blue square"]}, timeout=60)
        np.testing.assert_allclose(r.json()["embeddings"], c.encode_text(["a blue square"]).numpy(), atol=1e-5)


def test_a_bridged_bundle_is_refused_by_the_onnx_export_naming_the_bridge(pair):
    from anybind.bundle.onnx_export import OnnxExportError, export_onnx

    with pytest.raises(OnnxExportError, match=r"audio: added through a bridge from another bound model \(bridge:"):
        export_onnx(pair.root / "C")
    assert not (pair.root / "C" / "onnx").exists()  # refused before anything is written


def test_the_cli_bridges_bound_model_folders_with_corpus_stores(pair, capsys):
    out = pair.root / "C-models"
    with avtoy_data(pair.root / "cache"):
        code = main(["bridge", str(pair.a / "model"), str(pair.b / "model"), "--out", str(out), "--map", "cca",
                     "--corpus-stores", str(pair.stores["text_a"].path), str(pair.stores["text_b"].path), "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "chosen: cca" in printed and "audio added onto text" in printed
    model = BoundModel.load(out)
    assert model.modalities == ["image", "text", "audio"] and model.added["audio"].kind == "bridge:cca"
    assert not (out / "bundle.json").exists()  # bare models give a bare model


def test_refusals(pair):
    a, b = BoundModel.load(pair.a / "model"), BoundModel.load(pair.b / "model")
    with pytest.raises(BridgeError, match="A binds image, text, not 'audio'"):
        check_bridgeable(a, b, "audio")
    with pytest.raises(BridgeError, match="B binds image, text, not 'speech'|A binds image, text, not 'speech'"):
        check_bridgeable(a, b, "speech")
    with pytest.raises(BridgeError, match="A already binds image"):
        check_bridgeable(a, a, "text")
    corpus = corpus_from_stores(pair.stores["text_a"], pair.stores["text_b"], a, b, "text")
    with avtoy_data(pair.root / "cache"):  # a corpus store without the layer A's text side reads
        other = extract("random:text", pair.index, layers="layer.1", precision="fp32", progress=False)
    with pytest.raises(BridgeError, match="lacks layer"):
        corpus_from_stores(other, pair.stores["text_b"], a, b, "text")
    wrong = build_bridge_map("ridge").fit(torch.randn(30, b.dim), torch.randn(30, a.dim + 1))
    with pytest.raises(BridgeError, match=f"lands in {a.dim + 1} dims, but A's space has {a.dim}"):
        compose(a, b, "text", wrong)
    with pytest.raises(BridgeError, match=r"unknown bridge map 'procrustez' \(did you mean 'procrustes'\?\)"):
        bridge_models(a, b, "text", corpus, maps="procrustez")
    with pytest.raises(AnybindError, match="needs two bundles"):
        bridge(pair.a / "model", pair.b, out=pair.root / "x", corpus=pair.data)
    with pytest.raises(AnybindError, match="exists and is not empty"):
        bridge(pair.a, pair.b, out=pair.root / "C", corpus=pair.data)
    with pytest.raises(AnybindError, match="neither a bundle nor a bound model"):
        bridge(pair.root, pair.b, out=pair.root / "y", corpus=pair.data)


# ---- the maps ------------------------------------------------------------------------------------------
def _rotated(n=400, d=24, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, d))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return torch.from_numpy((y @ rotation).astype(np.float32)), torch.from_numpy(y.astype(np.float32)), rotation


def test_procrustes_recovers_a_known_rotation():
    """B's text space = an orthogonal rotation of A's: Procrustes finds the rotation back."""
    x, y, rotation = _rotated()
    fitted = fit_map("procrustes", x, y, held_out(np.arange(len(x)).astype(str)))
    assert fitted.val["mean_R@1"] == 1.0
    z = fitted.map.encode("text", x)
    assert torch.allclose(z, y, atol=1e-4)
    # the fitted matrix is R^T up to the (here ~1) scale; the means of x and y are ~0 and carried through
    matrix = fitted.map.matrix.numpy()
    np.testing.assert_allclose(matrix / np.linalg.norm(matrix[0]), rotation.T, atol=1e-3)


def test_cca_lands_in_a_space_and_full_rank_equals_least_squares():
    x, y, _ = _rotated(seed=1)
    full = CCAInto(dim=0, reg=0.0).fit(x, y)
    ls = build_bridge_map("ridge", alpha=0.0).fit(x, y)
    assert torch.allclose(full.encode("text", x), ls.encode("text", x), atol=1e-4)
    assert torch.allclose(full.encode("text", x), y, atol=1e-4)
    # fewer components: a reduced-rank map, still in A's dims; canonical correlations sorted, in [0, 1]
    low = CCAInto(dim=4, reg=0.1).fit(x, y)
    assert low.encode("text", x).shape == y.shape and low.matrix.shape == (24, 24)
    rho = low.correlations.numpy()
    assert len(rho) == 4 and np.all(np.diff(rho) <= 1e-6) and rho.max() <= 1 + 1e-6


def test_the_mlp_map_trains_deterministically_and_saves(tmp_path):
    x, y, _ = _rotated(n=300, d=16, seed=2)
    first = build_bridge_map("mlp", hidden=64, epochs=40, seed=3).fit(x, y)
    again = build_bridge_map("mlp", hidden=64, epochs=40, seed=3).fit(x, y)
    assert torch.equal(first.w1, again.w1)
    sims = (first.encode("text", x) * y).sum(dim=1)
    assert sims.mean() > 0.9  # a rotation is learnable by the MLP on its training rows
    first.save(tmp_path / "m")
    back = load_bridge_map(tmp_path / "m")
    assert torch.equal(back.encode("text", x), first.encode("text", x))
    with pytest.raises(BridgeError, match="mlp: temperature"):
        build_bridge_map("mlp", temperature=0.0)


def test_held_out_rows_keep_groups_together():
    groups = np.array([f"g{i // 3}" for i in range(3000)])
    val = held_out(groups)
    assert 0.05 < val.mean() < 0.15
    for g in np.unique(groups):
        assert len(set(val[groups == g])) == 1
    assert np.array_equal(val, held_out(groups))


# ---- one real bridge: minilm-l6 (A) and mpnet-base (B) --------------------------------------------------
@pytest.mark.slow
def test_a_real_minilm_to_mpnet_bridge_on_wordnet_glosses(tmp_path_factory):
    """A reads text with minilm-l6, B with mpnet-base; the bridge is fitted on 300 WordNet glosses
    encoded by both, and text -> text retrieval through it on held-out glosses is far above chance."""
    from anybind.encoders import create_encoder

    pytest.importorskip("transformers")
    try:
        create_encoder("minilm-l6"), create_encoder("mpnet-base")
        glosses = load_dataset("wordnet-speech:300")
    except AnybindError as e:
        pytest.skip(f"needs the packaged minilm-l6 and mpnet-base and WordNet + espeak-ng: {e}")
    root = tmp_path_factory.mktemp("real-bridge")
    overrides = [*OVERRIDES, "blend={name: none}"]
    with avtoy_data(root / "cache"):
        index = load_dataset(make_avtoy(root))
        image = extract("random:image", index, precision="fp32", progress=False)
        audio = extract("random:audio", index, field="audio", precision="fp32", progress=False)
        runs = {name: train(load_recipe("default", overrides), {first: store, "text": extract(text, index, progress=False)},
                            out=root / name, progress=False, anchor=first)
                for name, first, store, text in (("a", "image", image, "minilm-l6"), ("b", "audio", audio, "mpnet-base"))}
        a, b = (export_bundle(runs[n].out, root / n.upper()) for n in ("a", "b"))
        made = bridge(a, b, via="text", out=root / "C", corpus="wordnet-speech:300", maps=["procrustes", "ridge"],
                      progress=False)
    report = made.report
    assert report["corpus"]["rows"] == len(glosses) == 300
    held = report["corpus"]["held_out_rows"]
    best = max(m["val"]["mean_R@1"] for m in report["maps"].values())
    assert best > 20 / held  # chance is 1 / held
    c = anybind.load(root / "C")
    assert c.info["modalities"]["text"]["encoder"] == "minilm-l6" and c.info["modalities"]["audio"]["encoder"] == "random:audio"
    z = c.encode_audio(audio_paths(index, audio)[:2])
    assert z.shape == (2, c.dim)
