"""Serving a bundle with audio: one index of image and audio rows, any-to-any search, audio
uploads on every endpoint (bad ones refused with the reason), and the web page in a real browser.

The bundle: random encoders, image+text trained jointly with a qb-norm correction, audio added
onto text (`test_bundle_modalities.build_audio_bundle`, built once for both modules)."""

import io
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from _serving import HAS_CHROMIUM, NO_CHROMIUM, headless_chromium, live
from anybind.cli import main
from test_bundle_modalities import RATE, audio_paths, avtoy_data, shared_audio_bundle, tone

pytest.importorskip("faiss", reason="the serve extra is not installed: pip install 'anybind[serve]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'anybind[serve]'")

from anybind.serve.index import VectorIndex, VectorIndexError, build_index, search_index  # noqa: E402


@pytest.fixture(scope="module")
def av(tmp_path_factory):
    """The audio bundle and one exact index of its image and audio rows, built by the CLI."""
    built = shared_audio_bundle(tmp_path_factory)
    with avtoy_data(built.root / "cache"):
        index = built.root / "index"
        assert main(["index", "--bundle", str(built.bundle), "--data", built.data, "--modality", "image",
                     "--modality", "audio", "--out", str(index), "-q"]) == 0
        yield SimpleNamespace(**vars(built), index_path=index, idx=VectorIndex.load(index),
                              clips=audio_paths(built.index, built.stores["audio"]))


def _wav(samples: np.ndarray, rate: int = RATE, fmt: str = "WAV") -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype="PCM_16" if fmt == "WAV" else None)
    return buf.getvalue()


# ---- the index -------------------------------------------------------------------------------------------
def test_one_index_holds_both_modalities_and_searches_any_to_any_exactly(av):
    idx, model = av.idx, av.model
    assert idx.modalities == ["image", "audio"] and (idx.count("image"), idx.count("audio")) == (60, 120)
    assert idx.row_modalities[:60] == ["image"] * 60 and idx.row_modalities[60:] == ["audio"] * 120
    assert idx.info["format"] == "anybind.index/2" and idx.augmented and idx.info["fields"] == {"image": "image",
                                                                                                 "audio": "audio"}
    g_img, off_img = model.gallery("image", model.encode_image(idx.paths[:60]))
    g_aud, off_aud = model.gallery("audio", model.encode_audio(idx.paths[60:]))
    q_audio = model.encode_audio(av.clips[:3])
    # audio (bound onto text) -> images: across sides, so with the images' offsets
    brute = (q_audio @ g_img.T - off_img[None]).numpy()
    hits = idx.search(q_audio, k=5, corrected={"image": True}, modality="image")
    for i in range(3):
        np.testing.assert_allclose(hits.scores[i], np.sort(brute[i])[::-1][:5], atol=1e-4)
        assert set(hits.modalities[i]) == {"image"}
    # audio -> audio: the same side, plain cosine: a clip finds itself first
    one = search_index(idx, audio=av.clips[7], k=3, bundle=model, modality="audio")
    assert one.rows[0][0] == 60 + 7 and one.scores[0][0] == pytest.approx(1.0, abs=1e-4)
    # text -> audio rows: text and audio rank on the same side, so no offsets either
    q_text = model.encode_text(["a red square number 3"])
    want = np.sort((q_text @ g_aud.T).numpy()[0])[::-1][:4]
    got = search_index(idx, text="a red square number 3", k=4, bundle=model, modality="audio")
    np.testing.assert_allclose(got.scores[0], want, atol=1e-4)
    # all rows: each modality searched with its own ranking, merged by score
    every = search_index(idx, audio=av.clips[7], k=10, bundle=model)
    apart = [search_index(idx, audio=av.clips[7], k=10, bundle=model, modality=m) for m in ("image", "audio")]
    merged = sorted(zip(apart[0].scores[0] + apart[1].scores[0], apart[0].rows[0] + apart[1].rows[0]),
                    key=lambda t: -t[0])[:10]
    assert every.rows[0] == [r for _, r in merged] and every.subs[0][0] == 1  # row 67: item 3's second clip
    with pytest.raises(VectorIndexError, match="holds image, audio rows, not 'text'"):
        search_index(idx, text="red", bundle=model, modality="text")
    with pytest.raises(VectorIndexError, match="give one query"):
        search_index(idx, text="red", audio=av.clips[0], bundle=model)


def test_cli_search_with_audio_and_one_modality(av, capsys):
    assert main(["search", str(av.index_path), "--audio", av.clips[4], "--modality", "image", "--k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["modality"] for r in rows] == ["image"] * 3
    assert main(["search", str(av.index_path), "--audio", av.clips[4], "--modality", "audio", "--k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == av.clips[4]
    assert main(["search", str(av.index_path), "red", "--audio", av.clips[4]]) == 2  # two queries
    assert main(["index", "--bundle", str(av.bundle), "--data", av.data, "--modality", "image", "--modality", "audio",
                 "--field", "image", "--out", str(av.root / "x"), "-q"]) == 2  # one field for two modalities
    assert main(["index", "--bundle", str(av.bundle), "--data", av.data, "--modality", "video",
                 "--out", str(av.root / "x"), "-q"]) == 2


def test_an_index_of_the_first_format_still_loads_and_searches(av, tmp_path):
    new = build_index(av.model, av.index, tmp_path / "image", progress=False)  # image only
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tmp_path / "image" / "index-0.faiss", old / "index.faiss")
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(tmp_path / "image" / "items.parquet").drop(["modality"]), old / "items.parquet")
    info = json.loads((tmp_path / "image" / "index.json").read_text())
    for key in ("parts", "modalities", "fields"):
        info.pop(key)
    (old / "index.json").write_text(json.dumps({**info, "format": "anybind.index/1"}))
    legacy = VectorIndex.load(old)
    assert legacy.modalities == ["image"] and len(legacy) == 60 and legacy.row_modalities == ["image"] * 60
    q = av.model.encode_text(["something blue"])
    assert legacy.search(q, 5).ids == new.search(q, 5).ids
    with pytest.raises(VectorIndexError, match="older anybind"):  # rebuilding over it needs --overwrite
        build_index(av.model, av.index, old, progress=False)


# ---- the HTTP API ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(av):
    from fastapi.testclient import TestClient

    from anybind.serve.app import create_app

    app = create_app(av.model, av.idx, max_upload_bytes=200_000, labels=["red", "green", "blue"],
                     max_audio_seconds=2)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_audio_uploads_on_every_endpoint(av, client):
    model, clip = av.model, Path(av.clips[10])
    h = client.get("/health").json()
    assert h["modalities"] == ["image", "text", "audio"] and h["index"]["modalities"] == {"image": 60, "audio": 120}
    r = client.post("/embed", files={"file": ("c.wav", clip.read_bytes(), "audio/wav")}).json()
    assert r["modality"] == "audio"
    np.testing.assert_allclose(r["embeddings"], model.encode_audio([clip]).numpy(), atol=1e-6)
    # the type is found from the bytes too (no type, no extension), or said by the form
    r = client.post("/embed", files={"file": ("blob", clip.read_bytes(), "application/octet-stream")}).json()
    assert r["modality"] == "audio"
    flac = _wav(tone(440.0, 99), fmt="FLAC")
    r = client.post("/embed", files={"file": ("x", flac, "application/octet-stream")}, data={"type": "audio"}).json()
    np.testing.assert_allclose(r["embeddings"], model.encode_audio(flac).numpy(), atol=1e-6)

    r = client.post("/classify", files={"file": ("c.wav", clip.read_bytes(), "audio/wav")}).json()
    assert r["modality"] == "audio" and {x["label"] for x in r["labels"]} == {"red", "green", "blue"}
    r = client.post("/search", files={"file": ("c.wav", clip.read_bytes(), "audio/wav")},
                    data={"k": "5", "modality": "image"}).json()
    want = search_index(av.idx, audio=str(clip), k=5, bundle=model, modality="image")
    assert [x["item_id"] for x in r["results"]] == want.ids[0] and all("image_url" in x for x in r["results"])
    assert client.get(r["results"][0]["image_url"].replace("http://testserver", "")).status_code == 200
    r = client.post("/search", files={"file": ("c.wav", clip.read_bytes(), "audio/wav")},
                    data={"modality": "audio", "k": "1"}).json()
    assert r["results"][0]["audio_url"].endswith("?sub=0")
    got = client.get(r["results"][0]["audio_url"].replace("http://testserver", ""))
    assert got.status_code == 200 and got.headers["content-type"] == "audio/x-wav" and got.content == clip.read_bytes()
    r = client.get("/search", params={"q": "a red square", "k": 3, "modality": "audio"}).json()
    assert [x["modality"] for x in r["results"]] == ["audio"] * 3
    r = client.post("/search", files={"file": ("r.png", _png(), "image/png")}, data={"k": "3"}).json()
    assert r["query"] == {"modality": "image"} and len(r["results"]) == 3  # an image query, all rows


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


BAD_AUDIO = [
    ("corrupt", {"files": {"file": ("c.wav", b"RIFF\x10\x00\x00\x00WAVEfmt garbage", "audio/wav")}}, 415, "not readable audio"),
    ("text as wav", {"files": {"file": ("c.wav", b"hello, I am text", "audio/wav")}}, 415, "not readable audio"),
    ("png said audio", {"files": {"file": ("r.png", _png(), "image/png")}, "data": {"type": "audio"}}, 415,
     "not readable audio"),
    ("silent", {"files": {"file": ("s.wav", _wav(np.zeros(RATE, np.float32)), "audio/wav")}}, 422, "silent audio"),
    ("no samples", {"files": {"file": ("e.wav", _wav(np.zeros(0, np.float32)), "audio/wav")}}, 422, "empty audio"),
    ("empty file", {"files": {"file": ("e.wav", b"", "audio/wav")}}, 400, "empty"),
    ("too long", {"files": {"file": ("l.wav", _wav(tone(440.0, 1, seconds=3.0)), "audio/wav")}}, 422, "too long (3.0 s"),
    ("too large", {"files": {"file": ("b.wav", _wav(tone(440.0, 2, seconds=7.0)), "audio/wav")}}, 413, "too large"),
    ("odd type", {"files": {"file": ("c.wav", b"RIFF", "audio/wav")}, "data": {"type": "video"}}, 400,
     "type must be image or audio"),
]


@pytest.mark.parametrize("url", ["/embed", "/classify", "/search"])
@pytest.mark.parametrize("name,kwargs,status,words", BAD_AUDIO, ids=[b[0] for b in BAD_AUDIO])
def test_bad_audio_gets_a_4xx_with_the_reason_and_the_server_stays_up(client, url, name, kwargs, status, words):
    r = client.post(url, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("method,url,kwargs,status,words", [
    ("get", "/search", {"params": {"q": "red", "modality": "video"}}, 400, "modality must be one of image, audio"),
    ("post", "/search", {"json": {"q": "red"}}, 415, "multipart"),
    ("get", "/audio/nope", {}, 404, "no indexed audio clip"),
    ("get", "/audio/1000", {"params": {"sub": "7"}}, 404, "no indexed audio clip"),
    ("get", "/audio/1000", {"params": {"sub": "x"}}, 400, "sub must be an integer"),
    ("get", "/audio/..%2F..%2Fetc%2Fpasswd", {}, 404, "no indexed audio clip"),
])
def test_bad_search_and_audio_requests(client, method, url, kwargs, status, words):
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status and words in r.json()["error"], r.text


def test_a_bundle_without_audio_refuses_audio_uploads_by_name(av):
    from fastapi.testclient import TestClient

    from anybind.bundle import export_bundle
    from anybind.serve.app import create_app

    plain = export_bundle(av.source.out, av.root / "plain-for-serve")
    with TestClient(create_app(plain)) as c:
        r = c.post("/embed", files={"file": ("c.wav", Path(av.clips[0]).read_bytes(), "audio/wav")})
        assert r.status_code == 400 and "cannot read audio" in r.json()["error"]


# ---- the web page in a real browser ----------------------------------------------------------------------
@pytest.fixture()
def live_server(av):
    """uvicorn on a free loopback port, in a thread; stopped after the test."""
    from anybind.serve.app import create_app

    with live(create_app(av.model, av.idx)) as base:
        yield base


@pytest.mark.skipif(not HAS_CHROMIUM, reason=NO_CHROMIUM)
def test_the_page_searches_images_with_an_uploaded_and_a_recorded_sound(av, live_server, tmp_path):
    pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(tmp_path / "profile", "--use-fake-ui-for-media-stream",
                               "--use-fake-device-for-media-stream")  # a fake microphone: a beep
    loaded = ("return Array.from(document.querySelectorAll('#gallery img'))"
              ".filter(i => i.complete && i.naturalWidth > 0).length")
    try:
        driver.get(live_server)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "60 image + 120 audio items" in d.find_element(By.ID, "info").text)
        assert driver.find_element(By.ID, "rows").get_attribute("value") == "image"
        driver.find_element(By.ID, "audio-file").send_keys(av.clips[5])  # a WAV through the file input
        wait.until(lambda d: "results for the sound" in d.find_element(By.ID, "search-status").text)
        wait.until(lambda d: d.execute_script(loaded) >= 10)
        figures = driver.find_elements(By.CSS_SELECTOR, "#gallery figure")
        assert len(figures) == 20 and not driver.find_elements(By.CSS_SELECTOR, "#gallery audio")
        want = search_index(av.idx, audio=av.clips[5], k=20, bundle=av.model, modality="image").ids[0]
        shown = driver.execute_script("return Array.from(document.querySelectorAll('#gallery img')).map(i => i.alt)")
        assert shown == want
        # record a second of the fake microphone: converted to WAV in the page, searched the same way
        driver.execute_script("document.getElementById('search-status').textContent = ''")
        record = driver.find_element(By.ID, "record-btn")
        record.click()
        wait.until(lambda d: d.find_element(By.ID, "record-btn").text == "Stop")
        time.sleep(1.0)
        record.click()
        wait.until(lambda d: "results for the sound “recording.wav”" in d.find_element(By.ID, "search-status").text
                   or "error" in d.find_element(By.ID, "search-status").get_attribute("class"))
        assert "error" not in driver.find_element(By.ID, "search-status").get_attribute("class"), \
            driver.find_element(By.ID, "search-status").text
        wait.until(lambda d: d.execute_script(loaded) >= 10)
    finally:
        driver.quit()
