"""load_audio on every kind of reference and every bad case; audio fields in tables, folders, shards."""

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from anybind.data import load_dataset
from anybind.data.audio import AUDIO_EXTENSIONS, is_audio, load_audio
from anybind.data.folders import list_folder
from anybind.data.tables import detect_columns, list_table
from anybind.data.webdataset import list_webdataset
from anybind.errors import DataError

sf = pytest.importorskip("soundfile")
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="Debian espeak-ng not installed")


def _speak(path: Path, text: str = "a small red bird on a branch") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), "--stdin"], input=text.encode(), check=True)
    return path


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    return _speak(tmp_path_factory.mktemp("audio") / "bird.wav")


@pytest.fixture(scope="module")
def samples(speech):
    data, rate = sf.read(speech, dtype="float32")
    return data, rate


# ---- every kind of reference ----------------------------------------------------------------------
def test_a_wav_path_is_mono_float32_at_the_rate_asked(speech, samples):
    data, rate = samples
    assert rate == 22050  # espeak-ng's own rate: every load below resamples
    out = load_audio(speech)
    assert out.dtype == np.float32 and out.ndim == 1
    assert len(out) == pytest.approx(len(data) * 16000 / 22050, abs=1)
    assert np.array_equal(load_audio(str(speech)), out) and np.array_equal(load_audio(f"file://{speech}"), out)
    assert len(load_audio(speech, sample_rate=8000)) == pytest.approx(len(data) * 8000 / 22050, abs=1)


def test_flac_ogg_and_mp3_decode_like_the_wav(tmp_path, speech, samples):
    data, rate = samples
    ref = load_audio(speech)
    for ext in (".flac", ".ogg", ".mp3"):
        path = tmp_path / f"bird{ext}"
        try:
            sf.write(path, data, rate)
        except Exception as exc:  # noqa: BLE001 - an old libsndfile without that format
            pytest.skip(f"libsndfile cannot write {ext}: {exc}")
        out = load_audio(path)
        assert abs(len(out) - len(ref)) < 0.05 * len(ref), ext  # MP3 adds encoder padding
        if ext == ".flac":  # lossless up to the 16-bit quantisation
            assert np.abs(out - ref).max() < 1e-3
        else:
            assert out.std() > 0.01, ext


def test_bytes_uploads_tar_members_arrays_and_pairs(tmp_path, speech, samples):
    data, rate = samples
    ref = load_audio(speech)
    blob = speech.read_bytes()
    assert np.array_equal(load_audio(blob), ref)
    with open(speech, "rb") as upload:
        assert np.array_equal(load_audio(upload), ref)
    assert np.array_equal(load_audio(io.BytesIO(blob)), ref)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tf:
        tf.add(speech, arcname="k1.wav")
    assert np.array_equal(load_audio(f"tar://{shard}#k1.wav"), ref)
    assert np.allclose(load_audio((data, rate)), ref, atol=1e-6)
    assert np.array_equal(load_audio(data[:1000], sample_rate=22050), data[:1000])  # an array: already at the rate


def test_channels_are_averaged_and_integers_scaled(samples):
    data, rate = samples
    stereo = np.stack([data, 0.5 * data], axis=1)
    assert np.allclose(load_audio((stereo, rate), 22050), 0.75 * data, atol=1e-6)
    assert np.allclose(load_audio((stereo.T.copy(), rate), 22050), 0.75 * data, atol=1e-6)  # (channels, frames)
    pcm = (data * 32767).astype(np.int16)
    assert np.allclose(load_audio(pcm, 22050), data, atol=1e-3)
    u8 = (128 + data * 100).astype(np.uint8)  # unsigned PCM is centred on 128
    assert np.allclose(load_audio(u8, 22050), (u8.astype(np.float32) - 128) / 128, atol=1e-6)


def test_resampling_keeps_a_tone_where_it_is():
    rate, seconds = 44100, 1.0
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = load_audio((tone, rate), 16000)
    assert len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) == 440  # 1 s at 16 kHz: bin k is k Hz
    assert np.array_equal(out, load_audio((tone, rate), 16000))  # deterministic


# ---- bad audio: a DataError whose message is the reason ------------------------------------------
@pytest.mark.parametrize("make, reason", [
    (lambda d: np.zeros(16000, np.float32), "silent audio"),
    (lambda d: np.full(100, 1e-5, np.float32), "silent audio"),
    (lambda d: np.clip(d * 50, -1, 1), r"clipped audio \(\d+\.\d% of samples at full scale\)"),
    (lambda d: np.zeros(0, np.float32), "empty audio"),
    (lambda d: np.concatenate([d, [np.nan]]).astype(np.float32), "non-finite audio"),
    (lambda d: np.concatenate([d, [np.inf]]).astype(np.float32), "non-finite audio"),
])
def test_bad_samples_are_refused_with_the_reason(make, reason, samples):
    with pytest.raises(DataError, match=reason):
        load_audio((make(samples[0]), samples[1]))


def test_bad_files_are_refused_with_the_reason(tmp_path, speech, samples):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(8000, np.float32), 16000)
    with pytest.raises(DataError, match="^silent audio$"):
        load_audio(silent)
    clipped = tmp_path / "clipped.wav"
    sf.write(clipped, np.clip(samples[0] * 50, -1, 1), samples[1])
    with pytest.raises(DataError, match="^clipped audio"):
        load_audio(clipped)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(DataError, match="^empty audio$"):
        load_audio(empty)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    with pytest.raises(DataError, match=f"^unreadable audio: {corrupt}"):
        load_audio(corrupt)
    with pytest.raises(DataError, match="^unreadable audio: audio bytes: Format not recognised"):
        load_audio(b"not audio at all")
    with pytest.raises(DataError, match="unreadable audio: file not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(DataError, match="is a directory"):
        load_audio(tmp_path)
    with pytest.raises(DataError, match="has no member"):
        load_audio(f"tar://{_one_member_shard(tmp_path, speech)}#other.wav")


def _one_member_shard(tmp_path, speech) -> Path:
    shard = tmp_path / "one.tar"
    with tarfile.open(shard, "w") as tf:
        tf.add(speech, arcname="k.wav")
    return shard


def test_bad_arguments_are_refused(samples):
    with pytest.raises(DataError, match="sample_rate must be a positive integer"):
        load_audio(samples[0], sample_rate=0)
    with pytest.raises(DataError, match="sample rate must be a positive integer"):
        load_audio((samples[0], 22050.5))
    with pytest.raises(DataError, match="must hold real numbers"):
        load_audio(np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"must be \(frames,\)"):
        load_audio(np.ones((2, 3, 4), np.float32) * 0.1)
    with pytest.raises(DataError, match="unknown audio reference scheme"):
        load_audio("s3://bucket/x.wav")
    with pytest.raises(DataError, match="cannot open audio from a int"):
        load_audio(3)


def test_audio_extensions():
    assert {".wav", ".flac", ".ogg", ".mp3"} <= set(AUDIO_EXTENSIONS)
    assert is_audio("a/B.WAV") and is_audio(Path("x.flac")) and not is_audio("x.png")


def test_importing_anybind_data_audio_loads_neither_soundfile_nor_scipy():
    code = ("import sys, anybind, anybind.data.audio; "
            "assert 'soundfile' not in sys.modules and 'scipy' not in sys.modules")
    subprocess.run([sys_executable(), "-c", code], check=True)


def sys_executable() -> str:
    import sys

    return sys.executable


# ---- audio fields in datasets ---------------------------------------------------------------------
def test_a_table_with_an_audio_column(tmp_path, speech, cache):
    shutil.copy(speech, tmp_path / "a.wav")
    (tmp_path / "clips").mkdir()
    shutil.copy(speech, tmp_path / "clips" / "b.flac")
    table = tmp_path / "pairs.csv"
    table.write_text("audio,caption,label\na.wav,a bird,bird\nclips/b.flac,another bird,bird\n")
    idx = list_table(table)
    assert idx.fields == {"audio": "audio", "caption": "text"}
    assert idx.item_ids == ["a.wav", "clips/b.flac"]
    refs = idx.field_rows("audio")[2]
    assert refs == [str(tmp_path / "a.wav"), str(tmp_path / "clips" / "b.flac")]
    assert all(len(load_audio(r)) > 1000 for r in refs)
    assert load_dataset(f"table:{table}").fields == idx.fields


def test_a_generic_file_column_of_audio_files_is_the_audio_column(tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text('{"path": "x.wav", "text": "hello"}\n{"path": "y.mp3", "text": "bye"}\n')
    assert list_table(table).fields == {"audio": "audio", "caption": "text"}
    both = detect_columns(["image", "audio_path", "caption"])
    assert both["image"] == "image" and both["audio"] == "audio_path"
    images = detect_columns(["path", "caption"], sample={"path": ["a.png", "b.wav"]})
    assert images["image"] == "path" and images["audio"] is None
    named = detect_columns(["clip", "caption"], audio="clip")
    assert named["audio"] == "clip" and named["image"] is None
    with pytest.raises(DataError, match=r"no image column \(nor audio column\).*name it with image=\.\.\. \(or audio=\.\.\.\)"):
        detect_columns(["foo", "caption"])


def test_a_table_with_image_and_audio(tmp_path, speech):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    shutil.copy(speech, tmp_path / "a.wav")
    table = tmp_path / "t.csv"
    table.write_text("id,image,audio,caption\n1,a.png,a.wav,red\n")
    idx = list_table(table)
    assert idx.fields == {"image": "image", "audio": "audio", "caption": "text"}
    assert idx.field_rows("audio")[2] == [str(tmp_path / "a.wav")]


def test_a_folder_of_audio_classes(tmp_path, speech):
    for rel in ("dog/1.wav", "dog/2.flac", "cat/1.wav", "cat/.hidden.wav"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        shutil.copy(speech, tmp_path / rel)
    idx = list_folder(tmp_path)
    assert idx.fields == {"audio": "audio", "caption": "text"}
    assert idx.item_ids == ["cat/1.wav", "dog/1.wav", "dog/2.flac"]
    assert idx.column("label") == ["cat", "dog", "dog"] and idx.column("caption")[0] == ["cat"]
    assert len(load_audio(idx.field_rows("audio")[2][2])) > 1000
    assert load_dataset(str(tmp_path), cache=tmp_path.parent / "c").fields == idx.fields  # detected as a folder


def test_a_folder_of_images_and_audio_pairs_them(tmp_path, speech):
    from PIL import Image

    (tmp_path / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "1.png")
    shutil.copy(speech, tmp_path / "dog" / "1.wav")
    shutil.copy(speech, tmp_path / "dog" / "2.wav")
    idx = list_folder(tmp_path)
    assert idx.fields == {"image": "image", "audio": "audio", "caption": "text"}
    rows = {r["item_id"]: r for r in idx.table.to_pylist()}
    assert rows["dog/1"]["image"] == "dog/1.png" and rows["dog/1"]["audio"] == "dog/1.wav"
    assert rows["dog/2"]["image"] is None and rows["dog/2"]["audio"] == "dog/2.wav"


def test_webdataset_shards_with_audio(tmp_path, speech):
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for key, text in (("a", "a bird"), ("b", "a song")):
            tf.add(speech, arcname=f"{key}.wav")
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(text.encode())
            tf.addfile(info, io.BytesIO(text.encode()))
        info = tarfile.TarInfo("c.txt")  # a caption with neither image nor audio: not a sample
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    idx = list_webdataset(shard.parent)
    assert idx.fields == {"audio": "audio", "caption": "text"}
    assert idx.item_ids == ["00000/a", "00000/b"] and idx.column("caption") == [["a bird"], ["a song"]]
    ref = idx.field_rows("audio")[2][0]
    assert ref == f"tar://{shard.resolve()}#a.wav"
    assert np.array_equal(load_audio(ref), load_audio(speech))
