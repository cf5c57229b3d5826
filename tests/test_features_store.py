"""Feature store v1 and extraction: layout, cache hits, refusals, dtypes, atomic writes, resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from anybind.encoders import create_encoder
from anybind.errors import StoreError
from anybind.features import FeatureStore, extract, list_stores, remove_store, safetensors_io

sys.path.insert(0, str(Path(__file__).parent))
from _toy import toy_text_index  # noqa: E402


def _extract(index, cache, **kw):
    kw = {"layers": "all", "shard_size": 16, "batch_size": 5, "progress": False, "cache": cache} | kw
    return extract("random:text", index, **kw)


def test_store_layout_rows_and_skips(cache):
    index = toy_text_index()
    store = _extract(index, cache)
    files = {p.name for p in store.path.iterdir()}
    assert {"manifest.json", "request.json", "rows.parquet", "skipped.jsonl"} <= files
    n_rows = 2 * len(index)
    empty = [i for i in range(len(index)) if i % 11 == 3]
    assert len(store) == n_rows - len(empty)
    assert store.manifest["skipped"] == len(empty)
    assert {s["reason"] for s in store.skipped} == {"empty caption"}
    assert [s["item_id"] for s in store.skipped] == [f"item{i:04d}" for i in empty]
    # several captions per item = several rows with the same item id, caption_index 0/1
    ids, caps = store.item_ids, store.caption_index
    assert ids[:2] == ["item0000", "item0000"] and list(caps[:2]) == [0, 1]
    # the index's split decision is carried per row
    split_of = dict(zip(index.item_ids, index.column("split")))
    assert store.splits == [split_of[i] for i in ids]
    assert store.rows.column("fold").to_pylist()[0] == index.column("fold")[0]
    assert list(store.layers) == ["layer.0", "layer.1", "layer.2", "layer.3", "final"]
    # stored vectors equal a direct forward pass over the same captions (fp16 storage tolerance)
    enc = create_encoder("random:text")
    direct = enc.embed(["a drawing of thing number 0", "item 0 in words"], layers="final")["final"].numpy()
    np.testing.assert_allclose(store["final"][:2], direct, atol=2e-2)
    assert store["final"].read().dtype == np.float32


def test_memory_mapped_read(cache):
    store = _extract(toy_text_index(), cache, dtype="fp32")
    parts = store["layer.2"].parts
    assert all(isinstance(p, np.memmap) for p in parts)
    assert len(parts) == store.manifest["rows"] // 16 + (1 if store.manifest["rows"] % 16 else 0) or len(parts) == len(store.manifest["shards"])
    arr = store["layer.2"]
    idx = np.array([0, 17, 33, len(store) - 1])
    np.testing.assert_array_equal(arr[idx], np.stack([arr.read()[i] for i in idx]))


@pytest.mark.parametrize("dtype,np_dtype", [("fp16", np.float16), ("bf16", np.uint16), ("fp32", np.float32)])
def test_stored_dtypes(cache, dtype, np_dtype):
    store = _extract(toy_text_index(20), cache, dtype=dtype, layers="final")
    assert store["final"].parts[0].dtype == np_dtype
    ref = _extract(toy_text_index(20), cache, dtype="fp32", layers="final", out=cache / "ref32")
    np.testing.assert_allclose(store["final"].read(), ref["final"].read(), atol=1e-2)


def test_cache_hit_and_layer_superset(cache):
    index = toy_text_index()
    first = _extract(index, cache, layers="1,final")
    again = _extract(index, cache, layers="final")  # fewer layers: a hit on the same store
    assert again.report["hit"] and again.path == first.path
    more = _extract(index, cache, layers="all")  # more layers: a new store
    assert not more.report["hit"] and more.path != first.path
    assert _extract(index, cache, layers="2").path == more.path


def test_editing_captions_never_touches_image_key(cache):
    a, b = toy_text_index(), toy_text_index()
    b.table = b.table.set_column(b.table.column_names.index("caption"), "caption",
                                 [[[c + " edited" for c in caps] for caps in b.column("caption")]])
    assert a.field_fingerprint("caption") != b.field_fingerprint("caption")
    s1, s2 = _extract(a, cache), _extract(b, cache)
    assert s1.path != s2.path and not s2.report["hit"]


def test_a_hit_takes_the_index_s_current_grouping(cache):
    # the same captions regrouped (say, by a better near-duplicate rule): the store is found by
    # content, and its rows must carry the new groups and folds, not the ones from extraction time
    from anybind.data.index import DatasetIndex

    first = toy_text_index()
    store = _extract(first, cache)
    recs = [{"item_id": i, "caption": c, "group": f"merged{int(i[4:]) % 3}"}
            for i, c in zip(first.item_ids, first.column("caption"))]
    regrouped = DatasetIndex.from_records("toy", recs, {"caption": "text"})
    assert regrouped.field_fingerprint("caption") == first.field_fingerprint("caption")
    again = _extract(regrouped, cache)
    assert again.report["hit"] and again.path == store.path
    want = dict(zip(regrouped.item_ids, zip(regrouped.column("group"), regrouped.column("fold"), regrouped.column("split"))))
    reopened = FeatureStore.open(store.path)
    got = zip(reopened.item_ids, reopened.rows.column("group").to_pylist(), reopened.rows.column("fold").to_pylist(),
              reopened.splits)
    assert all(want[i] == (g, f, s) for i, g, f, s in got)
    assert {g for g in reopened.rows.column("group").to_pylist()} == {"merged0", "merged1", "merged2"}
    assert np.array_equal(reopened.numpy("final"), store.numpy("final"))  # the vectors are untouched


def test_out_dir_mismatch_is_refused(cache, tmp_path):
    out = tmp_path / "mystore"
    _extract(toy_text_index(), cache, out=out, layers="final")
    with pytest.raises(StoreError, match="does not match") as e:
        extract("random:text@1", toy_text_index(), out=out, layers="final", progress=False, cache=cache)
    assert "weights" in str(e.value)  # says why
    with pytest.raises(StoreError, match="lacks layer.1"):
        _extract(toy_text_index(), cache, out=out, layers="1")


def test_unfinished_store_with_other_request_is_refused(cache, tmp_path):
    out = tmp_path / "partial"
    out.mkdir()
    (out / "request.json").write_text(json.dumps({"format": 1, "dtype": "float32"}))
    with pytest.raises(StoreError, match="unfinished store for a different request"):
        _extract(toy_text_index(), cache, out=out)
    with pytest.raises(StoreError, match="unfinished"):
        FeatureStore.open(out)


def test_full_disk_leaves_no_half_shard(cache, monkeypatch):
    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def failing(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            real(tensors, filename, metadata=metadata)  # a partial file exists when the error hits
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(StoreError, match="disk full"):
        _extract(toy_text_index(), cache)
    [folder] = [Path(r["path"]) for r in list_stores(cache)]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(("shard", "."))) == [
        "shard-00000.safetensors", "shard-00001.safetensors"]
    monkeypatch.setattr(st, "save_file", real)
    store = _extract(toy_text_index(), cache)  # resumes after space is freed
    assert store.path == folder and len(store.manifest["shards"]) == 8


SLOW_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from _toy import toy_text_index
    from anybind.encoders.random import RandomEncoder, create
    from anybind.encoders.spec import parse_spec
    from anybind.features import extract

    class Slow(RandomEncoder):
        def encode(self, batch, layers, pooling=None):
            time.sleep({delay})
            return super().encode(batch, layers, pooling)

    enc = create(parse_spec("random:text"))
    enc.__class__ = Slow
    store = extract(enc, toy_text_index(200), layers="all", shard_size=32, batch_size=8,
                    progress=False, out={out!r}, precision="bf16")
    print("DONE", len(store) if store is not None else "rank>0")
""")


def _run(out, delay, **popen):
    code = SLOW_SCRIPT.format(tests=str(Path(__file__).parent), delay=delay, out=str(out))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _store_bytes(path: Path) -> dict:
    out = {p.name: p.read_bytes() for p in path.glob("shard-*.safetensors")}
    out["rows"] = pq.read_table(path / "rows.parquet").to_pydict()
    out["skipped"] = (path / "skipped.jsonl").read_text()
    return out


def test_sigkill_and_resume_is_bit_identical(cache, tmp_path):
    ref = _run(tmp_path / "ref", 0.0)
    assert ref.wait(120) == 0, ref.stderr.read().decode()
    victim = _run(tmp_path / "killed", 0.03)
    deadline = time.time() + 60
    while not list((tmp_path / "killed").glob("shard-00004.safetensors")) and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    shards_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed").glob("shard-*")}
    # killed mid-run: shards 0-4 are on disk, the last (12 of 13) and the manifest are not
    assert 5 <= len(shards_before) < 13 and not (tmp_path / "killed" / "manifest.json").exists()
    resumed = _run(tmp_path / "killed", 0.0)
    assert resumed.wait(120) == 0, resumed.stderr.read().decode()
    assert "DONE" in resumed.stdout.read().decode()
    # finished shards were not recomputed, and the result equals the uninterrupted run byte for byte
    for name, mtime in shards_before.items():
        assert (tmp_path / "killed" / name).stat().st_mtime_ns == mtime
    assert _store_bytes(tmp_path / "killed") == _store_bytes(tmp_path / "ref")
    assert not list((tmp_path / "killed").glob(".*.tmp"))


def test_two_ranks_merge_into_one_store(cache, tmp_path):
    """RANK/WORLD_SIZE (as torchrun sets them): each process writes its shards, rank 0 merges."""
    procs = [_run(tmp_path / "dist", 0.0, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"}) for r in (1, 0)]
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read().decode()
    ref = _run(tmp_path / "single", 0.0)
    assert ref.wait(120) == 0
    assert _store_bytes(tmp_path / "dist") == _store_bytes(tmp_path / "single")


def test_cache_ls_and_rm(cache):
    store = _extract(toy_text_index(), cache, layers="final")
    rows = list_stores(cache)
    assert len(rows) == 1 and rows[0]["status"] == "done" and rows[0]["rows"] == len(store)
    with pytest.raises(StoreError, match="not a feature store"):
        remove_store(cache)
    remove_store(store.path)
    assert list_stores(cache) == []


def test_bad_dims_from_an_adapter_is_a_clear_error(cache):
    enc = create_encoder("random:text")
    real = enc.encode
    enc.encode = lambda b, layers, pooling=None: {k: torch.cat([v, v], 1) for k, v in real(b, layers, pooling).items()}
    with pytest.raises(StoreError, match="layer dims are wrong"):
        extract(enc, toy_text_index(), layers="final", progress=False, cache=cache)


def test_safetensors_header_reader_roundtrip(tmp_path):
    t = {"a": torch.randn(5, 3), "_row": torch.arange(5)}
    safetensors_io.write_shard(tmp_path / "s.safetensors", t, {"k": "v"})
    header, _ = safetensors_io.read_header(tmp_path / "s.safetensors")
    assert header["__metadata__"] == {"k": "v"}
    np.testing.assert_array_equal(safetensors_io.map_tensor(tmp_path / "s.safetensors", "a"), t["a"].numpy())


def test_non_finite_or_overflowing_features_are_reported_skips(cache):
    """NaN from an encoder, or a value beyond fp16's range, skips that item with a reason."""
    enc = create_encoder("random:text")
    real = enc.encode

    def poisoned(batch, layers, pooling=None):
        out = real(batch, layers, pooling)
        out["final"][0, 0] = float("nan")  # first item of every batch
        if len(out["final"]) > 1:
            out["final"][1, 0] = 1e6  # finite in fp32, inf in fp16
        return out

    enc.encode = poisoned
    store = extract(enc, toy_text_index(20), layers="final", batch_size=5, shard_size=10, progress=False,
                    cache=cache, precision="fp32")
    reasons = [s["reason"] for s in store.skipped if s["reason"] != "empty caption"]
    assert len(reasons) == 2 * (40 // 5) and all("non-finite" in r for r in reasons)
    assert np.isfinite(store["final"].read()).all()
    assert len(store) + store.manifest["skipped"] == 40


def test_layers_auto_reads_the_assessment_and_names_are_canonical(cache, tmp_path):
    rec = {"recommendation": {"encoders": {"random:text": {"layers": ["layer.2"], "score": 0.5}}}}
    (tmp_path / "assessment.json").write_text(json.dumps(rec))
    store = _extract(toy_text_index(), cache, layers="auto", assessment=tmp_path / "assessment.json")
    assert store.report["layers"] == ["layer.2"]
    again = _extract(toy_text_index(), cache, layers="2")  # '2' is 'layer.2': the same store, a hit
    assert again.report["hit"] and again.path == store.path


def test_whole_file_writes_leave_no_temporary_files(cache):
    store = _extract(toy_text_index(), cache)
    assert not [p.name for p in store.path.iterdir() if p.name.startswith(".")]
    assert (store.path / "manifest.json").read_text().endswith("}\n")  # written by anybind.atomic
