"""Serving: the vector index, the HTTP API, the web page in a real browser, the open_clip shim.

One tiny real bundle (random encoders on the Karpathy replica, with a qb-norm retrieval
correction so the index must carry offsets) and one exact index over the replica serve every test.
"""

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import anybind
from _serving import HAS_CHROMIUM, NO_CHROMIUM, headless_chromium, live
from _toy import replicas
from anybind.cli import main

pytest.importorskip("faiss", reason="the serve extra is not installed: pip install 'anybind[serve]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'anybind[serve]'")

from anybind.serve.index import VectorIndex, VectorIndexError, build_index, search_index  # noqa: E402

COLOURS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A bundle (qb-norm correction) and a flat index over the replica's 60 images, built by the CLI."""
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANYBIND_CACHE", str(root / "cache"))
        karpathy, *_ = replicas(root)
        run, bundle, index = root / "run", root / "bundle", root / "index"
        assert main(["train", "--recipe", "default", "--store", f"image=random:image+karpathy:{karpathy}",
                     "--store", f"text=random:text+karpathy:{karpathy}", "--set", "train.max_steps=10",
                     "--set", "train.batch_size=32", "--set", "train.val_every=5",
                     "--set", "correction.name=qb-norm", "--out", str(run), "-q"]) == 0
        assert main(["export", "--run", str(run), "--out", str(bundle), "-q"]) == 0
        assert main(["index", "--bundle", str(bundle), "--data", f"karpathy:{karpathy}", "--out", str(index), "-q"]) == 0
        model = anybind.load(bundle)
        yield SimpleNamespace(root=root, karpathy=karpathy, bundle=bundle, index_path=index, model=model,
                              index=VectorIndex.load(index))


# ---- the index ---------------------------------------------------------------------------------------
def test_exact_index_equals_brute_force_ranking_with_the_correction_offsets(served):
    idx, model = served.index, served.model
    assert (len(idx), idx.kind, idx.dim, idx.modality) == (60, "flat", model.dim, "image")
    assert idx.augmented and idx.info["correction"] == "qb-norm" and idx.info["vector_dim"] == model.dim + 1
    assert idx.info["bundle"] == str(served.bundle.resolve()) and len(idx.info["bundle_fingerprint"]) == 16
    assert all(Path(p).is_file() for p in idx.paths) and idx.refs[0] == "1000.jpg"
    # brute force from the raw images through the bundle: cosine with g' minus each item's offset
    g, offset = model.gallery("image", model.encode_image(idx.paths))
    assert offset is not None and float(offset.std()) > 0
    queries = ["a red square number 3", "something blue", "green", "a square"]
    q = model.encode_text(queries)
    brute = (q @ g.T - offset[None]).numpy()
    hits = idx.search(q, k=10)
    for i in range(len(queries)):
        want = np.sort(brute[i])[::-1][:10]
        np.testing.assert_allclose(hits.scores[i], want, atol=1e-4)
        np.testing.assert_allclose([brute[i, r] for r in hits.rows[i]], hits.scores[i], atol=1e-4)
        assert hits.ids[i] == [idx.item_ids[r] for r in hits.rows[i]]
    # the library call and the CLI give the same answer
    one = search_index(served.index_path, text=queries[0], k=5, bundle=model)
    assert one.ids[0] == hits.ids[0][:5]


def test_an_indexed_images_own_embedding_finds_it_first(served):
    idx, model = served.index, served.model
    for row in (0, 7, 31, 59):
        hits = search_index(idx, image=idx.paths[row], k=3, bundle=model)  # image query: plain cosine with g'
        assert hits.ids[0][0] == idx.item_ids[row] and hits.scores[0][0] == pytest.approx(1.0, abs=1e-4)
        raw = idx.search(model.encode_image([idx.paths[row]]), k=1, corrected=False)
        assert raw.ids[0] == [idx.item_ids[row]]
    for kind in ("hnsw", "ivf"):  # the approximate kinds, on the same vectors
        other = build_index(model, f"karpathy:{served.karpathy}", served.root / f"index-{kind}", kind=kind, progress=False)
        assert other.kind == kind and len(other) == 60
        assert other.search(model.encode_image([idx.paths[5]]), 1, corrected=False).ids[0] == [idx.item_ids[5]]


def test_cli_search_prints_results_and_json(served, capsys):
    assert main(["search", str(served.index_path), "something red", "--k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3] and all(Path(r["path"]).is_file() for r in rows)
    assert main(["search", str(served.index_path), "--image", served.index.paths[4], "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].split()[2] == served.index.item_ids[4]
    assert main(["search", str(served.index_path)]) == 2  # no query at all
    assert main(["search", str(served.index_path), "   "]) == 2
    assert main(["search", str(served.root / "nowhere"), "x"]) == 2


def test_rebuilding_is_instant_and_another_kind_needs_overwrite(served):
    again = build_index(served.bundle, f"karpathy:{served.karpathy}", served.index_path, progress=False)
    assert again.info["created"] == served.index.info["created"]  # up to date: not rebuilt
    with pytest.raises(VectorIndexError, match="--overwrite"):
        build_index(served.bundle, f"karpathy:{served.karpathy}", served.index_path, kind="hnsw", progress=False)
    assert main(["index", "--bundle", str(served.bundle), "--data", "openclipart-nope", "--out",
                 str(served.root / "x"), "-q"]) == 2


def test_cli_says_how_broadly_an_approximate_index_searches(served, capsys):
    out = served.root / "index-hnsw-cli"
    assert main(["index", "--bundle", str(served.bundle), "--data", f"karpathy:{served.karpathy}", "--out", str(out),
                 "--kind", "hnsw", "-q"]) == 0
    params = VectorIndex.load(out).part("image")["params"]
    assert params["recall_at_10"] == 1.0 and params["ef_search"] == 64  # 60 rows: every search is exhaustive
    assert "image: approximate search (ef_search 64), recall@10 1.000 on 60 of its own rows" in capsys.readouterr().out


def test_a_corrupt_image_is_skipped_and_reported(served, capsys):
    copy = served.root / "corrupt"
    shutil.copytree(served.karpathy.parent, copy)
    (copy / "1013.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["index", "--bundle", str(served.bundle), "--data", f"karpathy:{copy / served.karpathy.name}",
                 "--out", str(served.root / "index-corrupt"), "-q"]) == 0
    assert "skipped 1 unreadable items, e.g. 1013:" in capsys.readouterr().out
    idx = VectorIndex.load(served.root / "index-corrupt")
    assert len(idx) == 59 and "1013" not in idx.item_ids and idx.info["skipped_items"][0]["item_id"] == "1013"


def test_overwrite_replaces_an_index_only_once_the_new_one_is_complete(served, monkeypatch):
    import anybind.serve.index as index_module

    data = f"karpathy:{served.karpathy}"
    foreign = served.root / "not-an-index"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(VectorIndexError, match="not an anybind index"):  # refused before any work
        build_index(served.model, data, foreign, overwrite=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    target = served.root / "index-replaced"
    assert build_index(served.model, data, target, kind="flat", progress=False).kind == "flat"

    def broken(vectors, kind):
        raise RuntimeError("killed while building")

    with monkeypatch.context() as mp:
        mp.setattr(index_module, "_make_index", broken)
        with pytest.raises(RuntimeError, match="killed"):
            build_index(served.model, data, target, kind="hnsw", overwrite=True, progress=False)
    assert VectorIndex.load(target).kind == "flat"  # the old index is intact
    assert build_index(served.model, data, target, kind="hnsw", overwrite=True, progress=False).kind == "hnsw"
    assert not [p.name for p in served.root.iterdir() if p.name.startswith(".")]  # no staged leftovers


def test_an_index_refuses_a_bundle_that_changed(served):
    other = served.root / "bundle-edited"
    shutil.copytree(served.bundle, other)
    (other / "bundle.json").write_text((other / "bundle.json").read_text() + "\n")
    with pytest.raises(VectorIndexError, match="rebuild the index"):
        search_index(served.index, text="red", bundle=other)


# ---- the HTTP API ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(served):
    from fastapi.testclient import TestClient

    from anybind.serve.app import create_app

    app = create_app(served.model, served.index, max_upload_bytes=4000, labels=COLOURS)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _png(colour=(200, 30, 30), size=16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_routes_answer(served, client):
    model, idx = served.model, served.index
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["dim"] == model.dim and h["index"]["count"] == 60 and h["default_labels"] == COLOURS
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="gallery"' in page.text and "http" not in page.text.split("<script>")[1]  # no CDN, no remote URL
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/docs").status_code == 200
    assert {"/embed", "/classify", "/search", "/health"} <= set(client.get("/openapi.json").json()["paths"])

    r = client.post("/embed", json={"texts": ["a red square", "something blue"]}).json()
    assert r["modality"] == "text" and np.asarray(r["embeddings"]).shape == (2, model.dim)
    np.testing.assert_allclose(r["embeddings"], model.encode_text(["a red square", "something blue"]).numpy(), atol=1e-6)
    jpg = Path(idx.paths[3])
    r = client.post("/embed", files={"file": ("x.jpg", jpg.read_bytes(), "image/jpeg")}).json()
    np.testing.assert_allclose(r["embeddings"], model.encode_image([jpg]).numpy(), atol=1e-6)  # same as the file

    r = client.post("/classify", files={"file": ("r.png", _png(), "image/png")},
                    data={"labels": json.dumps(["blue", "red", "green", "car"])}).json()
    probs = [x["probability"] for x in r["labels"]]
    assert sorted(x["label"] for x in r["labels"]) == ["blue", "car", "green", "red"]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    r = client.post("/classify", files={"file": ("r.png", _png(), "image/png")}, data={"labels": "cat\ndog"}).json()
    assert {x["label"] for x in r["labels"]} == {"cat", "dog"}
    r = client.post("/classify", files={"file": ("r.png", _png(), "image/png")}).json()  # the default labels
    assert {x["label"] for x in r["labels"]} == set(COLOURS)

    r = client.get("/search", params={"q": "a red square", "k": 5}).json()
    assert [x["rank"] for x in r["results"]] == [1, 2, 3, 4, 5]
    assert r["results"][0]["item_id"] == search_index(idx, text="a red square", k=1, bundle=model).ids[0][0]
    assert "path" not in r["results"][0]  # the server's file paths stay on the server
    img = client.get(r["results"][0]["image_url"].replace("http://testserver", ""))
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert img.content == Path(idx.reference(r["results"][0]["item_id"])).read_bytes()


@pytest.mark.parametrize("method,url,kwargs,status,words", [
    ("get", "/search", {"params": {"q": ""}}, 400, "empty"),
    ("get", "/search", {"params": {"q": "   "}}, 400, "empty"),
    ("get", "/search", {"params": {"q": "red", "k": "0"}}, 400, "k must be"),
    ("get", "/search", {"params": {"q": "red", "k": "ten"}}, 400, "k must be"),
    ("get", "/search", {"params": {"q": "red", "k": "100000"}}, 400, "k must be"),
    ("post", "/embed", {"json": {"texts": []}}, 400, "non-empty list"),
    ("post", "/embed", {"json": {"texts": ["ok", ""]}}, 400, "texts[1] is empty"),
    ("post", "/embed", {"json": {"words": ["x"]}}, 400, "texts"),
    ("post", "/embed", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("post", "/embed", {"content": b"[" * 33 + b"]" * 33, "headers": {"content-type": "application/json"}}, 400,
     "33 levels deep"),
    ("post", "/embed", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
    ("post", "/embed", {"files": {"file": ("a.png", b"hello, I am text", "image/png")}}, 415, "not an image"),
    ("post", "/embed", {"files": {"file": ("big.png", b"\x89PNG" + bytes(5000), "image/png")}}, 413, "too large"),
    ("post", "/embed", {"files": {"file": ("empty.png", b"", "image/png")}}, 400, "empty"),
    ("post", "/classify", {"files": {"file": ("a.txt", b"plain text", "text/plain")}}, 415, "not an image"),
    ("post", "/classify", {"data": {"labels": "red"}, "files": {"other": ("a.png", _png(), "image/png")}}, 400, "no image"),
    ("post", "/classify", {"json": {"labels": ["red"]}}, 415, "multipart"),
    ("post", "/classify", {"files": {"file": ("a.png", _png(), "image/png")}, "data": {"labels": "[1, 2"}}, 400, "JSON"),
    ("get", "/images/..%2F..%2F..%2Fetc%2Fpasswd", {}, 404, "no indexed image"),
    ("get", "/images/%2Fetc%2Fpasswd", {}, 404, "no indexed image"),
    ("get", "/images//etc/passwd", {}, 404, "no indexed image"),
    ("get", "/images/1000/../../../../etc/passwd", {}, 404, None),
    ("get", "/images/nope", {}, 404, "no indexed image"),
])
def test_bad_requests_get_a_clear_4xx_json_error_and_the_server_stays_up(client, method, url, kwargs, status, words):
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert "error" in body and (words is None or words in body["error"]), body
    assert b"root:" not in r.content
    assert client.get("/health").json()["status"] == "ok"


def test_without_an_index_or_labels(served):
    from fastapi.testclient import TestClient

    from anybind.serve.app import create_app

    with TestClient(create_app(served.bundle)) as c:  # a bundle path, no index, no default classes
        r = c.get("/search", params={"q": "red"})
        assert r.status_code == 404 and "--index" in r.json()["error"]
        assert c.get("/images/1000").status_code == 404
        r = c.post("/classify", files={"file": ("a.png", _png(), "image/png")})
        assert r.status_code == 400 and "labels" in r.json()["error"]
        assert c.get("/health").json()["index"] is None


# ---- the web page in a real browser ------------------------------------------------------------------
@pytest.fixture()
def live_server(served):
    """uvicorn on a free loopback port, in a thread; stopped after the test."""
    from anybind.serve.app import create_app

    with live(create_app(served.model, served.index, labels=COLOURS)) as base:
        yield base


def test_a_json_body_nested_100k_deep_gets_a_400_and_the_server_answers_the_next_request(served, live_server):
    """Against real uvicorn: json.loads would recurse 100k levels (a 500 and a dropped connection);
    the depth is counted on the raw bytes first, for the /embed body and the /classify labels."""
    import httpx

    deep = b'{"texts": ' + b"[" * 100_000 + b'"x"' + b"]" * 100_000 + b"}"
    with httpx.Client(base_url=live_server, timeout=60) as http:
        r = http.post("embed", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "nests 100001 levels deep; at most 32" in r.json()["error"]
        r = http.post("classify", files={"file": ("r.png", _png(), "image/png")},
                      data={"labels": "[" * 50_000 + "]" * 50_000})
        assert r.status_code == 400 and "labels" in r.json()["error"] and "levels deep" in r.json()["error"]
        # the same server, the same connection pool: still answering, and right
        assert http.get("health").json()["status"] == "ok"
        r = http.post("embed", json={"texts": ["a [[[{ red square"]})  # brackets inside a string are text
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["embeddings"], served.model.encode_text(["a [[[{ red square"]).numpy(),
                                   atol=1e-6)


@pytest.mark.skipif(not HAS_CHROMIUM, reason=NO_CHROMIUM)
def test_the_page_searches_and_classifies_in_headless_chromium(served, live_server, tmp_path):
    pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(tmp_path / "profile")
    try:
        driver.get(live_server)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "60 image items" in d.find_element(By.ID, "info").text)
        box = driver.find_element(By.ID, "q")
        box.send_keys("a red square")
        box.submit()
        loaded = ("return Array.from(document.querySelectorAll('#gallery img'))"
                  ".filter(i => i.complete && i.naturalWidth > 0).length")
        wait.until(lambda d: d.execute_script(loaded) >= 10)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 20  # the page asks for k=20
        assert "results for" in driver.find_element(By.ID, "search-status").text
        # an image through the file input: its zero-shot labels over the editable label set
        assert driver.find_element(By.ID, "label-set").get_attribute("value").split("\n") == COLOURS
        driver.find_element(By.ID, "file").send_keys(served.index.paths[0])
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#labels li")) == 3)
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape[1] >= 800 and pixels.var() > 100  # not a blank page


def test_the_api_docs_come_from_the_server_not_a_cdn(client):
    for page, assets in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
        html = client.get(page).text
        assert "cdn." not in html and "fonts.googleapis" not in html and "http://" not in html, page
        for name in assets:
            assert f'"/docs-assets/{name}"' in html, (page, name)
            r = client.get(f"/docs-assets/{name}")
            assert r.status_code == 200 and len(r.content) > 100_000, name
    assert client.get("/docs-assets/../app.py").status_code == 404  # only the packaged assets


def test_without_the_packaged_docs_assets_the_server_says_what_to_install(served, monkeypatch):
    import importlib.util

    from anybind.errors import MissingDependencyError
    from anybind.serve.app import create_app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi_offline" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="fastapi-offline"):
        create_app(served.model, served.index)


@pytest.mark.skipif(not HAS_CHROMIUM, reason=NO_CHROMIUM)
def test_the_api_docs_render_in_headless_chromium_with_no_network(live_server, tmp_path):
    pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(tmp_path / "profile")
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(live_server + "docs")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock")) >= 4)
        paths = {e.text for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/embed", "/classify", "/health"} <= paths
        driver.get(live_server + "redoc")
        wait.until(lambda d: "/embed" in d.find_element(By.TAG_NAME, "body").text)
        assert "anybind" in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()


# ---- open_clip / CLIP_benchmark compatibility --------------------------------------------------------
@pytest.mark.parametrize("name", ["create_model_and_transforms", "create_model_from_pretrained", "get_tokenizer"])
def test_the_shim_takes_open_clips_arguments_in_open_clips_order(name):
    import inspect

    open_clip = pytest.importorskip("open_clip", reason="pip install open_clip_torch")
    from anybind.serve import compat

    theirs = list(inspect.signature(getattr(open_clip, name)).parameters.values())
    ours = list(inspect.signature(getattr(compat, name)).parameters.values())
    positional = [p.name for p in ours if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == [p.name for p in theirs[: len(positional)]]  # positional calls line up
    assert ours[-1].kind is ours[-1].VAR_KEYWORD  # and every other open_clip keyword is accepted
    defaults = {t.name: t.default for t in theirs}
    for p in ours[1:-1]:  # every named option is open_clip's, with open_clip's default
        assert p.name in defaults and p.default == defaults[p.name], p.name


def test_clip_benchmarks_own_zero_shot_evaluation_runs_through_the_shim(served):
    from PIL import Image

    zeroshot = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification",
                                   reason="pip install clip-benchmark --no-deps")
    from anybind.serve.compat import create_model_and_transforms, get_tokenizer

    model, _, preprocess = create_model_and_transforms(served.bundle, pretrained="ignored", device="cpu")
    paths, templates = served.index.paths[:24], ["a photo of {c}.", "a {c} thing."]
    # the targets are anybind's own zero-shot predictions with the same templates, so CLIP_benchmark's
    # evaluation through the shim must score 100% (and it scores the real labels it is given)
    own = anybind.load(served.bundle).classify(paths, COLOURS, templates=templates).argmax(dim=1)

    class Folder(torch.utils.data.Dataset):  # a small local image folder, yielded as ImageFolder does
        classes = COLOURS

        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return preprocess(Image.open(paths[i])), int(own[i])

    loader = torch.utils.data.DataLoader(Folder(), batch_size=8)
    # clip_benchmark's own classifier and classification loop (its `evaluate` wraps these, then
    # formats metrics with float() of a 1-element array, which NumPy >= 2.4 refuses: not ours)
    classifier = zeroshot.zero_shot_classifier(model, get_tokenizer(served.bundle), COLOURS, templates, "cpu", amp=False)
    logits, target = zeroshot.run_classification(model, classifier, loader, "cpu", amp=False)
    assert logits.shape == (24, 3) and torch.equal(target, own)
    assert torch.equal(logits.argmax(dim=1), own)  # 100% against anybind's own predictions
    assert len(set(own.tolist())) >= 2  # not one class for every image


def test_a_clip_benchmark_style_zero_shot_loop_through_the_shim_matches_classify(served):
    from PIL import Image

    from anybind.evaluate.zeroshot import load_templates
    from anybind.serve.compat import create_model_and_transforms, get_tokenizer

    model, preprocess_train, preprocess = create_model_and_transforms(served.bundle, pretrained="ignored")
    assert preprocess_train is preprocess  # no training augmentation: the encoder's own transform
    tokenizer = get_tokenizer(served.bundle)
    model = model.eval().to("cpu")
    templates = load_templates(served.model.card.get("templates") or "default")
    with torch.no_grad():  # as CLIP_benchmark's zeroshot_classifier + run_classification do
        weights = []
        for name in COLOURS:
            texts = tokenizer([t.replace("{c}", name) for t in templates]).to("cpu")
            emb = torch.nn.functional.normalize(model.encode_text(texts), dim=-1).mean(dim=0)
            weights.append(emb / emb.norm())
        weights = torch.stack(weights, dim=1)
        paths = served.index.paths[::4]
        images = torch.stack([preprocess(Image.open(p)) for p in paths]).to("cpu")
        feats = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        pred = (100.0 * feats @ weights).argmax(dim=1)
    bundle = anybind.load(served.bundle)
    assert torch.equal(pred, bundle.classify(paths, COLOURS).argmax(dim=1))
    torch.testing.assert_close(feats, bundle.encode_image(paths), atol=1e-6, rtol=0)
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
