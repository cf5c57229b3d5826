"""Micro-batching of the server's model calls, and readiness (/ready) while the bundle loads.

The batcher on its own (real asyncio, a real threadpool, a model function that records its
batches), then a real uvicorn server on a loopback port: concurrent clients get the answers a lone
request gets, in fewer model calls; /ready is 503 until the bundle and index are loaded.
"""

import asyncio
import threading
import time

import numpy as np
import pytest

from _serving import free_port, live, tiny_bundle
from anybind.cli import main
from anybind.errors import AnybindError

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'anybind[serve]'")
pytest.importorskip("faiss", reason="the serve extra is not installed: pip install 'anybind[serve]'")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from anybind.serve.app import create_app, serve  # noqa: E402
from anybind.serve.batching import MicroBatcher  # noqa: E402


class Recorder:
    """A model function: each item's row is [item, 2 x item]; every batch it ran is kept; "bad" fails."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[tuple[str, list]] = []
        self.delay = delay

    def __call__(self, kind: str, items: list):
        self.batches.append((kind, list(items)))
        if "bad" in items:
            raise ValueError("a bad item")
        time.sleep(self.delay)  # a model call takes a while: requests queue behind it
        return np.array([[x, 2 * x] for x in items], dtype=float)


def _gather(batcher: MicroBatcher, requests: list[tuple[str, list]]) -> list:
    async def go():
        return await asyncio.gather(*(batcher.submit(k, items) for k, items in requests), return_exceptions=True)

    return asyncio.run(go())


# ---- the batcher -------------------------------------------------------------------------------------
def test_concurrent_requests_share_batches_and_each_gets_its_own_rows():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=200)
    answers = _gather(batcher, [("text", [i]) for i in range(20)])
    for i, rows in enumerate(answers):
        np.testing.assert_array_equal(rows, [[i, 2 * i]])
    sizes = [len(items) for _, items in model.batches]
    assert sizes == [8, 8, 4]  # all 20 arrive at once: full batches, in arrival order
    assert [x for _, items in model.batches for x in items] == list(range(20))
    assert batcher.stats["text"][:2] == [3, 20]


def test_a_request_never_splits_and_a_large_one_runs_alone():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=4, max_wait_ms=100)
    answers = _gather(batcher, [("text", [0, 1, 2]), ("text", [3, 4]), ("text", list(range(10, 20))), ("text", [5])])
    assert [a.tolist() for a in answers[2]] == [[x, 2 * x] for x in range(10, 20)]
    assert answers[1].tolist() == [[3, 6], [4, 8]]
    # [0,1,2] + [5] fill 4; [3,4] waits for the next batch; the 10 items go alone
    assert [items for _, items in model.batches] == [[0, 1, 2, 5], [3, 4], list(range(10, 20))]


def test_kinds_are_never_mixed_in_one_batch():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=100)
    answers = _gather(batcher, [("text", [1]), ("image", [2]), ("text", [3]), ("image", [4])])
    assert [a.tolist() for a in answers] == [[[1, 2]], [[2, 4]], [[3, 6]], [[4, 8]]]
    assert model.batches == [("text", [1, 3]), ("image", [2, 4])]


def test_a_bad_item_fails_only_the_request_that_sent_it():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=100)
    answers = _gather(batcher, [("text", [1]), ("text", ["bad"]), ("text", [3])])
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "a bad item"
    assert answers[0].tolist() == [[1, 2]] and answers[2].tolist() == [[3, 6]]
    # the batch failed, then each request ran alone
    assert [items for _, items in model.batches] == [[1, "bad", 3], [1], ["bad"], [3]]
    assert batcher.stats["text"][:2] == [2, 2]  # only the batches that answered count


def test_under_load_batches_fill_while_the_model_works_and_a_lone_request_waits_at_most_the_wait():
    model = Recorder(delay=0.05)
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=0)

    async def go():
        first = asyncio.ensure_future(batcher.submit("text", [0]))
        await asyncio.sleep(0.01)  # the first batch (one item: no wait) is in the model now
        rest = [batcher.submit("text", [i]) for i in range(1, 11)]
        return [await first, *await asyncio.gather(*rest)]

    answers = asyncio.run(go())
    assert [a.tolist() for a in answers] == [[[i, 2 * i]] for i in range(11)]
    assert [items for _, items in model.batches] == [[0], list(range(1, 11))]
    lone = MicroBatcher(Recorder(), max_batch=32, max_wait_ms=30)
    t0 = time.perf_counter()
    assert _gather(lone, [("text", [7])])[0].tolist() == [[7, 14]]
    assert 0.03 <= time.perf_counter() - t0 < 1.0


def test_a_cancelled_request_is_not_computed():
    model = Recorder(delay=0.05)
    batcher = MicroBatcher(model, max_batch=32, max_wait_ms=0)

    async def go():
        first = asyncio.ensure_future(batcher.submit("text", [0]))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit("text", [1]))
        kept = asyncio.ensure_future(batcher.submit("text", [2]))
        await asyncio.sleep(0)
        gone.cancel()  # the client went away while its request queued
        return await first, await kept

    first, kept = asyncio.run(go())
    assert first.tolist() == [[0, 0]] and kept.tolist() == [[2, 4]]
    assert [items for _, items in model.batches] == [[0], [2]]


@pytest.mark.parametrize("options, message", [({"max_batch": 0}, "--max-batch"), ({"max_wait_ms": -1}, "--batch-wait-ms"),
                                              ({"max_wait_ms": 5000}, "--batch-wait-ms")])
def test_bad_batching_options_are_refused(options, message):
    with pytest.raises(AnybindError, match=message):
        MicroBatcher(Recorder(), **options)


# ---- over HTTP ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny bundle (random encoders on the Karpathy replica) and a flat index over its 60 images."""
    return tiny_bundle(tmp_path_factory.mktemp("batching"), steps=5, index=True)


QUERIES = [f"a {c} square number {i}" for c in ("red", "green", "blue") for i in range(6)]


def _search_all(base: str, clients: int) -> list[dict]:
    answers: list = [None] * len(QUERIES)

    def client(offset: int):
        with httpx.Client(base_url=base, timeout=60) as c:
            for i in range(offset, len(QUERIES), clients):
                answers[i] = c.get("search", params={"q": QUERIES[i], "k": 5}).json()

    threads = [threading.Thread(target=client, args=(j,)) for j in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_concurrent_searches_are_batched_and_answer_as_a_lone_request_does(served):
    alone = create_app(served.bundle, served.index, max_batch=1)
    batched = create_app(served.bundle, served.index, max_batch=32, batch_wait_ms=50)
    with live(alone) as base:
        want = _search_all(base, 1)
    with live(batched) as base:
        got = _search_all(base, len(QUERIES))
        done = httpx.get(base + "health").json()["batching"]["done"]["text"]
    assert done["items"] == len(QUERIES) and done["batches"] < len(QUERIES) / 2  # 18 queries in a few calls
    for w, g in zip(want, got, strict=True):
        assert [r["item_id"] for r in g["results"]] == [r["item_id"] for r in w["results"]]
        np.testing.assert_allclose([r["score"] for r in g["results"]], [r["score"] for r in w["results"]], atol=1e-5)
    assert alone.state.served.batcher.stats["text"][0] == len(QUERIES)  # max_batch 1: one call per request


def test_embed_batches_texts_of_several_requests_and_keeps_each_requests_rows(served):
    app = create_app(served.bundle, max_batch=16, batch_wait_ms=50)
    model = app.state.bundle
    bodies = [QUERIES[i:i + 3] for i in range(0, 12, 3)]
    results: list = [None] * len(bodies)

    def client(i: int):
        results[i] = httpx.post(base + "embed", json={"texts": bodies[i]}, timeout=60).json()

    with live(app) as base:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for body, r in zip(bodies, results, strict=True):
        assert r["dim"] == model.dim and len(r["embeddings"]) == len(body)
        np.testing.assert_allclose(r["embeddings"], model.encode_text(body).numpy(), atol=1e-5)
    assert app.state.served.batcher.stats["text"][1] == 12


def test_ready_is_503_until_the_bundle_and_index_are_loaded(served):
    app = create_app(served.bundle, served.index, load=False)
    with live(app) as base, httpx.Client(base_url=base, timeout=60) as c:
        r = c.get("ready")
        assert r.status_code == 503 and r.json() == {"ready": False, "loading": True}
        assert r.headers["retry-after"] == "1"
        h = c.get("health")
        assert h.status_code == 200 and h.json()["ready"] is False and h.json()["index"] is None
        for r in (c.get("search", params={"q": "red"}), c.post("embed", json={"texts": ["red"]}),
                  c.get("images/1000.jpg")):
            assert r.status_code == 503 and "not ready" in r.json()["error"] and r.headers["retry-after"] == "1"
        app.state.served.load()
        assert c.get("ready").json() == {"ready": True}
        assert c.get("health").json()["index"]["count"] == 60
        assert c.get("search", params={"q": "red"}).status_code == 200


def test_serve_stops_and_raises_when_loading_fails(served, tmp_path):
    from anybind.serve.index import VectorIndexError

    broken = tmp_path / "index"
    broken.mkdir()
    (broken / "index.json").write_text("{ not json")
    t0 = time.monotonic()
    with pytest.raises(VectorIndexError):
        serve(served.bundle, broken, port=free_port(), log_level="warning", warmup=False)
    assert time.monotonic() - t0 < 30


def test_the_serve_command_refuses_a_folder_that_is_not_a_bundle_before_listening(tmp_path, capsys):
    assert main(["serve", "--bundle", str(tmp_path), "--port", str(free_port())]) != 0
    assert "not an anybind bundle" in capsys.readouterr().err


def test_a_new_event_loop_gets_a_new_worker():
    """A test client may run each request in an event loop of its own: the batcher follows it."""
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=0)
    for i in range(3):  # three loops, one after the other
        assert _gather(batcher, [("text", [i])])[0].tolist() == [[i, 2 * i]]
    assert [items for _, items in model.batches] == [[0], [1], [2]]
