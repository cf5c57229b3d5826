"""The spoken built-ins: real espeak-ng clips, openclipart's ids/groups/folds kept, byte-stable synthesis."""

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from anybind.data import list_datasets, load_dataset
from anybind.data.audio import load_audio
from anybind.data.spoken import (
    RENDERINGS,
    clip_ref,
    list_openclipart_speech,
    list_wordnet_speech,
    renderings_for,
    spoken_text,
    synthesize,
)
from anybind.errors import DataError

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="Debian espeak-ng not installed")
HAS_WORDNET = Path("/usr/share/wordnet/data.noun").is_file()
HAS_OPENCLIPART = Path("/usr/share/openclipart/png").is_dir()


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.wav"))}


def test_spoken_text_keeps_at_most_25_words():
    long = " ".join(f"w{i}," for i in range(40))
    assert spoken_text(long) == " ".join(f"w{i}," for i in range(25)).rstrip(",")
    assert spoken_text("  a   red\napple ") == "a red apple" and spoken_text(None) == ""
    assert renderings_for("train") == (0, 1, 2) and renderings_for("val") == renderings_for("test") == (0,)


def test_synthesis_is_byte_stable_and_atomic(tmp_path):
    text = "-v a caption that starts like an option; and a semicolon"
    a = synthesize(text, RENDERINGS[0], tmp_path / "a" / "x.wav")
    b = synthesize(text, RENDERINGS[0], tmp_path / "b" / "x.wav")
    assert a.read_bytes() == b.read_bytes() and len(load_audio(a)) > 16000  # over a second of speech
    c = synthesize(text, RENDERINGS[2], tmp_path / "c.wav")  # faster: shorter
    assert len(load_audio(c)) < len(load_audio(a))
    assert not list(tmp_path.rglob(".*.tmp"))
    assert clip_ref(text, RENDERINGS[0]) != clip_ref(text, RENDERINGS[1]) != clip_ref(text + ".", RENDERINGS[1])


def test_a_missing_espeak_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install espeak-ng"):
        list_wordnet_speech(size=3, audio_dir=tmp_path)


def test_a_missing_wordnet_names_the_debian_package(tmp_path):
    with pytest.raises(DataError, match=r"data\.noun.*apt-get install wordnet-base"):
        list_wordnet_speech(root=tmp_path, size=3, audio_dir=tmp_path)


def test_a_bad_count_is_refused(tmp_path):
    with pytest.raises(DataError, match="size must be a positive whole number"):
        list_wordnet_speech(size=0, audio_dir=tmp_path)
    with pytest.raises(DataError, match="limit must be a positive whole number"):
        list_openclipart_speech(limit="many", audio_dir=tmp_path)


@pytest.mark.skipif(not HAS_WORDNET, reason="Debian wordnet-base not installed")
def test_wordnet_speech_items_renderings_and_determinism(tmp_path):
    idx = list_wordnet_speech(size=10, audio_dir=tmp_path / "one")
    assert len(idx) == 10 and idx.fields == {"audio": "audio", "caption": "text"}
    rows = idx.table.to_pylist()
    assert all(re.fullmatch(r"n\d{8}", r["item_id"]) and r["group"] == r["item_id"] for r in rows)
    assert len({r["label"] for r in rows}) > 3  # spread over the lexicographer files
    for r in rows:
        assert len(r["caption"]) == 1 and 3 <= len(r["caption"][0].split()) <= 25 and '"' not in r["caption"][0]
        assert len(r["audio"]) == (3 if r["split"] == "train" else 1)
        assert r["audio"][0] == clip_ref(r["caption"][0], RENDERINGS[0])  # rendering 0 first, always
    assert {r["split"] for r in rows} >= {"train"} and len(idx.field_rows("audio")[0]) > 10
    again = list_wordnet_speech(size=10, audio_dir=tmp_path / "two")
    assert again.table.drop(["audio"]).equals(idx.table.drop(["audio"])) and again.column("audio") == idx.column("audio")
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")  # same bytes, synthesised twice
    assert len(load_audio(idx.field_rows("audio")[2][0])) > 8000


@pytest.mark.skipif(not HAS_WORDNET, reason="Debian wordnet-base not installed")
def test_wordnet_speech_by_spec_with_a_count(cache):
    idx = load_dataset("wordnet-speech:4")
    assert idx.name == "wordnet-speech-4" and len(idx) == 4
    assert Path(idx.root).is_relative_to(cache) and all(Path(r).is_file() for r in idx.field_rows("audio")[2])
    rows = {r["name"]: r for r in list_datasets()}
    assert rows["wordnet-speech"]["fields"] == {"audio": "audio", "caption": "text"}


@pytest.mark.slow  # lists openclipart (its listing is cached after the first time)
@pytest.mark.skipif(not (HAS_OPENCLIPART and HAS_WORDNET), reason="openclipart-png / wordnet-base not installed")
def test_openclipart_speech_keeps_openclipart_items_groups_and_folds(tmp_path):
    speech = list_openclipart_speech(limit=12, audio_dir=tmp_path / "one")
    listed = load_dataset("openclipart")
    clipart = {r["item_id"]: r for r in listed.table.to_pylist()}
    rows = speech.table.to_pylist()
    assert len(rows) == 12 and speech.fields == {"audio": "audio", "caption": "text"}
    assert speech.item_ids == listed.spread(12).item_ids  # the same subset as openclipart's spread(12)
    for r in rows:
        ref = clipart[r["item_id"]]
        assert (r["group"], r["split"], r["fold"], r["label"]) == (ref["group"], ref["split"], ref["fold"], ref["label"])
        assert r["caption"] == [spoken_text(ref["caption"][0])]
        assert len(r["audio"]) == (3 if r["split"] == "train" else 1)
        assert r["audio"][0] == clip_ref(r["caption"][0], RENDERINGS[0])
    assert {r["split"] for r in rows} >= {"train", "val"}
    assert all(len(load_audio(ref)) > 4000 for ref in speech.field_rows("audio")[2])
    again = list_openclipart_speech(limit=12, audio_dir=tmp_path / "two")
    assert again.column("audio") == speech.column("audio")
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")
    wordnet = list_wordnet_speech(size=50, audio_dir=tmp_path / "one")
    assert not set(wordnet.item_ids) & set(clipart)  # the second spoken set shares no item
