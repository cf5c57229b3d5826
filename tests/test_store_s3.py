"""Feature stores on an object store: s3:// against a real S3-compatible server (moto, in server
mode, on the loopback), never a mock of the client. Extraction writes there, training reads back."""

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("moto.server", reason="the `scale` extra (moto[server]) runs the S3 server")
boto3 = pytest.importorskip("boto3")

from anybind.errors import StoreError  # noqa: E402
from anybind.features import (  # noqa: E402
    FeatureStore,
    extract,
    list_stores,
    storage,  # noqa: E402
)
from anybind.features.lock import StoreLock  # noqa: E402
from anybind.features.safetensors_io import RemoteTensor  # noqa: E402
from anybind.features.store import stores_dir, verify_store  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _toy import replicas, toy_text_index  # noqa: E402

BUCKET = "anybind-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """`python -m moto.server` on a free loopback port, once per session, with the test bucket."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "ANYBIND_S3_ENDPOINT"]}
    os.environ.update(S3_ENV | {"ANYBIND_S3_ENDPOINT": endpoint})
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):  # the server takes a moment to listen
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        else:
            pytest.fail("the moto S3 server did not start")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture()
def s3_cache(s3_server, tmp_path, monkeypatch):
    """A fresh s3:// cache root per test; the local side caches in tmp_path."""
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}/cache"
    monkeypatch.setenv("ANYBIND_CACHE", url)
    monkeypatch.setenv("ANYBIND_LOCAL_CACHE", str(tmp_path / "local"))
    return url


def _extract(index, cache, **kw):
    kw = {"layers": "all", "shard_size": 16, "batch_size": 5, "progress": False, "cache": cache, "dtype": "fp32"} | kw
    return extract("random:text", index, **kw)


def _same_vectors(a: FeatureStore, b: FeatureStore) -> None:
    assert a.layers == b.layers and a.item_ids == b.item_ids
    assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]
    for layer in a.layers:
        assert np.array_equal(a[layer].read(), b[layer].read())  # bit for bit


def test_extract_into_s3_lists_and_reads_back_as_local(s3_cache, tmp_path):
    index = toy_text_index()
    store = _extract(index, s3_cache)
    assert str(store.path).startswith(s3_cache + "/stores/") and not store.report["hit"]
    local = _extract(index, tmp_path / "local-cache")
    _same_vectors(store, local)
    assert not (Path.cwd() / "s3:").exists()  # the URL never became a local folder
    # listed, verified (every shard's sha256 read back), reopened by URL, a cache hit the second time
    [row] = list_stores(s3_cache)
    assert row["status"] == "done" and row["rows"] == len(local) and row["path"] == str(store.path)
    assert verify_store(str(store.path)) == "ok"
    again = FeatureStore.open(str(store.path))
    _same_vectors(again, local)
    assert _extract(index, s3_cache).report["hit"]
    # the side caches (dataset listings, precision memo) stayed local
    assert not any(p.name == "datasets" for p in storage.as_path(s3_cache).iterdir())


def test_remote_rows_are_read_in_ranges_as_the_memory_map_reads_them(s3_cache, tmp_path):
    index = toy_text_index(200)
    remote, local = _extract(index, s3_cache, shard_size=64), _extract(index, tmp_path / "c", shard_size=64)
    part = remote["final"].parts[1]
    assert isinstance(part, RemoteTensor)
    rows = np.array([5, 3, 3, 60, -1, 0])
    np.testing.assert_array_equal(part[rows], local["final"].parts[1][rows])
    np.testing.assert_array_equal(part[7], local["final"].parts[1][7])
    pick = np.random.default_rng(0).choice(len(local), 50)
    np.testing.assert_array_equal(remote["layer.2"][pick], local["layer.2"][pick])
    with pytest.raises(IndexError):
        part[np.array([len(part)])]
    sent = pickle.loads(pickle.dumps(part))  # to a worker process: it reopens the object itself
    np.testing.assert_array_equal(sent[rows], local["final"].parts[1][rows])


def test_a_read_cache_copies_each_shard_once_and_maps_it(s3_cache, tmp_path, monkeypatch):
    index = toy_text_index()
    remote, local = _extract(index, s3_cache), _extract(index, tmp_path / "c")
    monkeypatch.setenv("ANYBIND_S3_READ_CACHE", str(tmp_path / "read-cache"))
    cached = FeatureStore.open(str(remote.path))
    assert all(isinstance(p, np.memmap) for p in cached["final"].parts)
    _same_vectors(cached, local)
    copies = sorted((tmp_path / "read-cache").iterdir())
    assert len(copies) == len(remote.manifest["shards"])
    stamps = [c.stat().st_mtime_ns for c in copies]
    FeatureStore.open(str(remote.path))["final"].read()
    assert [c.stat().st_mtime_ns for c in sorted((tmp_path / "read-cache").iterdir())] == stamps  # not fetched again


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from _toy import toy_text_index
    import torch
    from anybind.features import extract, storage

    torch.set_num_threads(1)  # as the test process computes: the thread count changes fp32 sums' last bits

    put = storage.ObjectPath.write_with
    shards = []

    def put_then_die(self, write):
        if self.name.startswith("shard-"):
            shards.append(self.name)
            if len(shards) == 3:  # killed between shard writes: two are stored, the third never is
                os.kill(os.getpid(), signal.SIGKILL)
        return put(self, write)

    storage.ObjectPath.write_with = put_then_die
    extract("random:text", toy_text_index(), layers="all", shard_size=16, batch_size=5, progress=False,
            dtype="fp32", num_workers=0)
""")


@pytest.mark.slow
def test_killed_writer_leaves_no_finished_store_and_a_resume_recomputes_only_the_rest(s3_cache, tmp_path,
                                                                                       monkeypatch):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed writer computes (another test may have changed it, too)
    try:
        _killed_then_resumed(s3_cache, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _killed_then_resumed(s3_cache, tmp_path, monkeypatch):
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script], env=os.environ.copy(), capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    [row] = list_stores(s3_cache)
    assert row["status"].startswith("partial 2/"), row
    folder = storage.as_path(row["path"])
    assert (folder / ".lock").exists()  # the dead writer's lock is still there
    with pytest.raises(StoreError, match="manifest"):
        FeatureStore.open(folder)  # no manifest: nothing reads it as complete
    written = []
    put = storage.ObjectPath.write_with
    monkeypatch.setattr(storage.ObjectPath, "write_with", lambda self, write: (written.append(self.name), put(self, write))[1])
    store = _extract(toy_text_index(), s3_cache, num_workers=0)  # takes over the dead writer's lock
    shards = sorted(n for n in written if n.startswith("shard-"))
    assert shards == [f"shard-{i:05d}.safetensors" for i in range(2, len(store.manifest["shards"]))]
    assert written[-1] == "manifest.json"  # the commit, last
    assert not (folder / ".lock").exists()
    _same_vectors(store, _extract(toy_text_index(), tmp_path / "local-cache"))


def test_a_second_writer_waits_for_the_lock_and_a_stale_one_is_taken_over(s3_cache, monkeypatch):
    folder = stores_dir(s3_cache) / "some-store"
    with StoreLock(folder) as held:
        assert type(held).__name__ == "ObjectStoreLock" and (folder / ".lock").exists()
        with pytest.raises(StoreError, match="gave up waiting for the lock"):
            StoreLock(folder, poll_s=0.1, timeout_s=0.5).acquire()
    assert not (folder / ".lock").exists()
    # a holder on another machine that stopped its heartbeat: taken over once the lock is stale
    (folder / ".lock").write_text(json.dumps({"pid": 12345, "host": "elsewhere", "since": "then"}))
    monkeypatch.setenv("ANYBIND_S3_LOCK_STALE_S", "1")
    with pytest.raises(StoreError, match="heartbeat"):
        StoreLock(folder, poll_s=0.1, timeout_s=0.3).acquire()  # not stale yet: waits, then says how it ends
    time.sleep(1.2)
    lock = StoreLock(folder, poll_s=0.1, timeout_s=5).acquire()
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.slow
def test_train_reads_two_s3_stores(s3_cache, tmp_path):
    from anybind.cli import main

    karpathy, *_ = replicas(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--store", f"image=random:image+karpathy:{karpathy}",
                 "--store", f"text=random:text+karpathy:{karpathy}", "--cache", s3_cache, "--out", str(run),
                 "--set", "train.max_steps=4", "--set", "train.val_every=2", "--set", "train.batch_size=16",
                 "-q"]) == 0
    stores = json.loads((run / "stores.json").read_text())
    assert all(v.startswith(s3_cache) for v in _strings(stores)), stores
    assert len([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]) >= 2
    image = FeatureStore.open(next(v for v in _strings(stores) if "image" in v))
    assert len(image) == 60 and image.modality == "image"


def _strings(obj) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_store_urls_given_directly_on_the_command_line(s3_cache, tmp_path, capsys):
    """`extract --out s3://...`, `train --store side=s3://...` and `cache verify s3://...`, with a local cache."""
    from anybind.cli import main

    karpathy, *_ = replicas(tmp_path)
    local = tmp_path / "cache"
    stores = {side: f"{s3_cache}/mine/{side}" for side in ("image", "text")}
    for side, url in stores.items():
        assert main(["extract", "--encoder", f"random:{side}", "--data", f"karpathy:{karpathy}", "--cache", str(local),
                     "--out", url, "-q"]) == 0
        assert FeatureStore.open(url).modality == side
    assert main(["cache", "verify", stores["image"], stores["text"], "--cache", str(local)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--store", f"image={stores['image']}", "--store", f"text={stores['text']}",
                 "--cache", str(local), "--out", str(run), "--set", "train.max_steps=2", "--set", "train.val_every=2",
                 "--set", "train.batch_size=16", "-q"]) == 0
    assert set(_strings(json.loads((run / "stores.json").read_text()))) >= set(stores.values())
