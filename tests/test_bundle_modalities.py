"""Bundles of N modalities: a run trained with `--add` exports with the encoders of its source
(run or bundle, followed back through added runs), and the bundle encodes raw audio exactly as
the audio store held it."""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import anybind
from _toy import replicas
from anybind.align import load_recipe
from anybind.align.frozen import AddSpec
from anybind.align.trainer import train
from anybind.bundle import BundleError, export_bundle
from anybind.data import DATA_PREFIXES, load_dataset, register_dataset_prefix
from anybind.data.index import DatasetIndex
from anybind.errors import AnybindError, DataError
from anybind.features import extract

OVERRIDES = ["train.max_steps=20", "train.batch_size=32", "train.val_every=10"]
COLOUR_HZ = {"red": 330.0, "green": 550.0, "blue": 880.0}
RATE = 16000


# ---- a tiny dataset with image, caption and audio fields ---------------------------------------------
def list_avtoy(location: str) -> DatasetIndex:
    """`avtoy:DIR`: the records of DIR/manifest.json (image, captions, one spoken clip per caption, split)."""
    records = json.loads((Path(location) / "manifest.json").read_text())
    # from_records makes lists of text fields only: list the clips as text, then name their modality
    index = DatasetIndex.from_records("avtoy", records, {"image": "image", "caption": "text", "audio": "text"},
                                      root=str(location))
    index.fields["audio"] = "audio"
    return index


@contextmanager
def avtoy_data(cache_root: Path):
    """The `avtoy:` prefix registered and ANYBIND_CACHE set, for as long as a module's tests run
    (unregistered after: other tests list the registered prefixes)."""
    register_dataset_prefix("avtoy", list_avtoy, help="test data: images, captions and audio", replace=True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ANYBIND_CACHE", str(cache_root))
            yield
    finally:
        DATA_PREFIXES.unregister("avtoy")


def tone(hz: float, seed: int, rate: int = RATE, seconds: float = 0.4) -> np.ndarray:
    """A tone of one colour's pitch plus noise of its own: distinct per item, real audio."""
    t = np.arange(int(rate * seconds)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.1, t.size)
    return (0.4 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def make_avtoy(root: Path) -> str:
    """The Karpathy replica's 60 images and captions, a WAV per caption (every fifth at 22.05 kHz)."""
    import soundfile

    karpathy, *_ = replicas(root)
    index = load_dataset(f"karpathy:{karpathy}")
    (root / "audio").mkdir()
    records = []
    for i, (item, image, caps, split) in enumerate(zip(*[index.column(c) for c in ("item_id", "image", "caption", "split")],
                                                       strict=True)):
        colour, clips = caps[0].split()[1], []
        for j in range(len(caps)):
            rate = 22050 if (2 * i + j) % 5 == 0 else RATE
            clips.append(f"audio/{item}-{j}.wav")
            soundfile.write(root / clips[-1], tone(COLOUR_HZ[colour], 2 * i + j, rate), rate, subtype="PCM_16")
        records.append({"item_id": item, "image": index.resolve(image), "caption": caps, "audio": clips,
                        "split": split})
    (root / "manifest.json").write_text(json.dumps(records))
    return f"avtoy:{root}"


def build_audio_bundle(root: Path, correction: str = "qb-norm") -> SimpleNamespace:
    """image+text trained jointly (random encoders), audio added onto text, exported as one bundle."""
    data = make_avtoy(root)
    index = load_dataset(data)
    stores = {"image": extract("random:image", index, precision="fp32", progress=False),
              "text": extract("random:text", index, precision="fp32", progress=False)}
    source = train(load_recipe("default", [*OVERRIDES, f"correction={{name: {correction}, beta: 20}}"]), stores,
                   out=root / "source", progress=False)
    stores["audio"] = extract("random:audio", index, field="audio", precision="fp32", progress=False)
    added = train(load_recipe("default", OVERRIDES), {"audio": stores["audio"], "text": stores["text"]},
                  out=root / "added", add=AddSpec.from_source(source.out, "audio", to="text"), progress=False)
    bundle = export_bundle(added.out, root / "bundle")
    return SimpleNamespace(root=root, data=data, index=index, stores=stores, source=source, added=added,
                           bundle=bundle, model=anybind.load(bundle))


def audio_paths(index: DatasetIndex, store) -> list[str]:
    """The WAV of each row of an audio store, from the listing."""
    audio = dict(zip(index.item_ids, index.column("audio"), strict=True))
    return [index.resolve(audio[i][j]) for i, j in zip(store.item_ids, store.caption_index, strict=True)]


_SHARED: dict = {}


def shared_audio_bundle(tmp_path_factory) -> SimpleNamespace:
    """`build_audio_bundle` once per test session (this module and test_serve_audio read it; tests
    write only new names beside it). Use it inside `avtoy_data(its root / "cache")`."""
    if "built" not in _SHARED:
        root = tmp_path_factory.mktemp("avbundle")
        with avtoy_data(root / "cache"):
            _SHARED["built"] = build_audio_bundle(root)
    return _SHARED["built"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    shared = shared_audio_bundle(tmp_path_factory)
    with avtoy_data(shared.root / "cache"):
        yield shared


# ---- export ------------------------------------------------------------------------------------------
def test_an_added_run_exports_every_modality_with_its_encoder_and_the_model_unchanged(built):
    info = json.loads((built.bundle / "bundle.json").read_text())
    assert list(info["modalities"]) == ["image", "text", "audio"] and info["joint"] == ["image", "text"]
    assert info["added"] == {"audio": {"to": "text", "kind": "projectors"}}
    assert {m: e["encoder"] for m, e in info["modalities"].items()} == \
        {"image": "random:image", "text": "random:text", "audio": "random:audio"}
    assert info["modalities"]["audio"]["dtype"] == "float16" and info["modalities"]["audio"]["layers"]
    run_model = built.added.out / "model"
    for f in run_model.rglob("*"):  # the model folder ships as trained: nothing refitted
        if f.is_file():
            assert (built.bundle / "model" / f.relative_to(run_model)).read_bytes() == f.read_bytes(), f
    card = json.loads((built.bundle / "card.json").read_text())
    assert card["joint"] == ["image", "text"] and card["training_data"]["dataset"].startswith("avtoy")
    assert [(a["modality"], a["to"]) for a in card["added"]] == [("audio", "text")]
    assert card["added"][0]["train"]["pairs"] > 0
    md = (built.bundle / "card.md").read_text()
    assert "| audio | `random:audio` |" in md and "added onto text" in md and "audio added onto the frozen text" in md
    model = built.model
    assert model.modalities == ["image", "text", "audio"] and model.joint == ["image", "text"]
    assert model.added == {"audio": "text"} and model.side("audio") == "text" == model.side("text")


@pytest.mark.slow  # two more trainings (about 30 s)
def test_a_bundle_or_an_added_bundle_can_be_the_source(built):
    # audio added onto the exported image+text bundle, then speech added onto the audio bundle
    plain = export_bundle(built.source.out, built.root / "plain-bundle")
    recipe = load_recipe("default", OVERRIDES)
    pair = {"audio": built.stores["audio"], "text": built.stores["text"]}
    onto_bundle = train(recipe, pair, out=built.root / "onto-bundle", add=AddSpec.from_source(plain, "audio"),
                        progress=False)
    b1 = anybind.load(export_bundle(onto_bundle.out, built.root / "b1"))
    assert b1.modalities == ["image", "text", "audio"] and b1.info["modalities"]["text"]["encoder"] == "random:text"
    speech = extract("random:audio@5", built.index, field="audio", precision="fp32", progress=False)
    chained = train(recipe, {"speech": speech, "text": built.stores["text"]}, out=built.root / "chained",
                    add=AddSpec.from_source(built.added.out, "speech"), progress=False)
    b2 = anybind.load(export_bundle(chained.out, built.root / "b2"))
    assert b2.modalities == ["image", "text", "audio", "speech"] and b2.added == {"audio": "text", "speech": "text"}
    assert {m: e["encoder"] for m, e in b2.info["modalities"].items()}["image"] == "random:image"
    card = json.loads((built.root / "b2" / "card.json").read_text())
    assert [a["modality"] for a in card["added"]] == ["audio", "speech"]
    # the same clips through both bundles: the audio part is the same model, so the same rows
    clips = audio_paths(built.index, built.stores["audio"])[:3]
    torch.testing.assert_close(b2.encode("audio", clips), built.model.encode("audio", clips), atol=0, rtol=0)


def test_export_refuses_an_added_run_whose_source_changed_or_is_gone(built, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(built.added.out, run)
    src = json.loads((run / "source.json").read_text())
    (run / "source.json").write_text(json.dumps({**src, "fingerprint": "0" * 16}))
    with pytest.raises(AnybindError, match="changed since 'audio' was added onto it"):
        export_bundle(run, tmp_path / "b")
    (run / "source.json").write_text(json.dumps({**src, "model": str(tmp_path / "gone"), "source": str(tmp_path / "gone")}))
    with pytest.raises(AnybindError, match="is gone"):
        export_bundle(run, tmp_path / "b")
    assert not (tmp_path / "b").exists()


# ---- encoding raw audio ------------------------------------------------------------------------------
def test_raw_audio_through_the_bundle_equals_the_bound_model_on_the_stored_features(built):
    import soundfile

    model, store = built.model, built.stores["audio"]
    layers = model.info["modalities"]["audio"]["layers"]
    paths = audio_paths(built.index, store)

    def stored(rows):  # the bound model on the audio store's rows (the same batch shape as the bundle's)
        return model.bound.encode("audio", [torch.from_numpy(store[lay].read(np.asarray(rows))).float()
                                            for lay in layers])

    rows = list(range(8))  # rows 0 and 5 are 22.05 kHz files: resampled the same way
    z = model.encode("audio", [paths[r] for r in rows])
    torch.testing.assert_close(z, stored(rows), atol=0, rtol=0)
    assert z.shape == (8, model.dim) and torch.allclose(z.norm(dim=1), torch.ones(8))
    # bytes, (array, rate) pairs, 1-D arrays at 16 kHz, a single clip: the same rows
    torch.testing.assert_close(model.encode_audio([Path(paths[r]).read_bytes() for r in (0, 1)]), stored([0, 1]),
                               atol=0, rtol=0)
    samples, rate = soundfile.read(paths[1], dtype="float32")
    assert rate == RATE
    torch.testing.assert_close(model.encode_audio((samples, rate)), stored([1]), atol=0, rtol=0)
    torch.testing.assert_close(model.encode_audio(samples), stored([1]), atol=0, rtol=0)
    torch.testing.assert_close(model.encode_audio(paths[2]), stored([2]), atol=0, rtol=0)


def test_bad_audio_and_missing_modalities_are_clear_errors(built, tmp_path):
    model = built.model
    with pytest.raises(DataError, match="silent audio"):
        model.encode_audio(np.zeros(RATE, np.float32))
    with pytest.raises(DataError, match="unreadable audio"):
        model.encode_audio(b"RIFF not really a wav")
    with pytest.raises(DataError, match="file not found"):
        model.encode_audio(str(tmp_path / "nope.wav"))
    with pytest.raises(BundleError, match="no audio items"):
        model.encode_audio([])
    with pytest.raises(BundleError, match="binds image, text, audio, not 'video'"):
        model.encode("video", ["x"])
    probs = model.classify([audio_paths(built.index, built.stores["audio"])[0]], ["red", "green"], modality="audio")
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(1), torch.ones(1))
