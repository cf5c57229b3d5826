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
from anybind.errors import AnybindError, StoreError
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


# ---- issue 13: every failure named, the same request gives the same bytes, one writer per store ----
SCRIPT_PRELUDE = textwrap.dedent("""
    import json, logging, os, resource, signal, sys, time
    sys.path.insert(0, {tests!r})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from _toy import toy_text_index
    from anybind.encoders.random import RandomEncoder, create
    from anybind.encoders.spec import parse_spec
    from anybind.errors import AnybindError
    from anybind.features import extract
    ARGS = json.loads(sys.argv[1])
""")


def _script(body: str, args: dict, **popen) -> subprocess.Popen:
    """A Python subprocess running SCRIPT_PRELUDE + `body`, with `args` as ARGS (JSON)."""
    code = SCRIPT_PRELUDE.format(tests=str(Path(__file__).parent)) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_batch_size_zero_is_refused_not_replaced(cache):
    for bad in (0, -5):
        with pytest.raises(AnybindError, match="batch size must be at least 1"):
            _extract(toy_text_index(10), cache, batch_size=bad)
    with pytest.raises(AnybindError, match="shard size must be at least 1"):
        _extract(toy_text_index(10), cache, shard_size=0)


def test_a_run_where_every_item_is_skipped_is_an_error_naming_the_reasons(cache, tmp_path):
    from anybind.data.index import DatasetIndex

    paths = [tmp_path / f"img{i:02d}.png" for i in range(60)]
    for p in paths[:2]:
        p.write_bytes(b"this is not a png")
    index = DatasetIndex.from_records("broken", [{"item_id": f"it{i:02d}", "image": str(p)} for i, p in enumerate(paths)],
                                      {"image": "image"})
    with pytest.raises(StoreError) as e:
        extract("random:image", index, shard_size=16, progress=False, cache=cache, precision="fp32", num_workers=0)
    msg = str(e.value)
    assert msg.startswith("all 60 items were skipped: 58 file not found, 2 not an image"), msg
    assert "it00" in msg and "nothing was stored" in msg
    assert [r for r in list_stores(cache) if r["status"] == "done"] == []
    # no empty store is left to be found: once the files are there, the same command extracts them
    from PIL import Image

    for i, p in enumerate(paths):
        Image.new("RGB", (40, 40), (4 * i, 100, 200)).save(p, format="PNG")
    store = extract("random:image", index, shard_size=16, progress=False, cache=cache, precision="fp32", num_workers=0)
    assert len(store) == 60 and not store.report["hit"]


FILL_SCRIPT = """
    class Filling(RandomEncoder):  # the disk "fills up" (RLIMIT_FSIZE) after `fill_at` forward passes
        calls = 0

        def encode(self, batch, layers, pooling=None):
            Filling.calls += 1
            if Filling.calls == ARGS.get("fill_at"):
                resource.setrlimit(resource.RLIMIT_FSIZE, (ARGS["limit"], resource.RLIM_INFINITY))
            return super().encode(batch, layers, pooling)

    # ignored (Python's default), a write past the limit fails with EFBIG; the system default kills
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL if ARGS.get("killed_by_sigxfsz") else signal.SIG_IGN)
    enc = create(parse_spec("random:text"))
    enc.__class__ = Filling
    if ARGS.get("fill_at") == 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, (ARGS["limit"], resource.RLIM_INFINITY))
    try:
        store = extract(enc, toy_text_index(60), layers="all", shard_size=16, batch_size=5, progress=False,
                        out=ARGS["out"], precision="fp32")
    except AnybindError as e:
        print("ERROR", e)
        sys.exit(2)
    print("DONE", store.report["hit"], Filling.calls)
"""


def test_a_full_disk_is_named_keeps_finished_shards_and_resume_cleans_up(cache, tmp_path):
    """Real write failures (RLIMIT_FSIZE): killed by SIGXFSZ, then EFBIG; a normal run resumes."""
    folder = tmp_path / "store"
    # 1. killed (SIGXFSZ) while writing request.json: a temporary file and the lock are left behind
    rc, out, err = _finish(_script(FILL_SCRIPT, {"out": str(folder), "fill_at": 0, "limit": 400, "killed_by_sigxfsz": True}))
    assert rc == -signal.SIGXFSZ, (rc, out, err)
    assert any(p.name.startswith(".request.json.") and p.name.endswith(".tmp") for p in folder.iterdir())
    assert (folder / ".lock").exists()
    # 2. the disk fills up during shard 2: a message that says what ran out and where, no traceback
    rc, out, err = _finish(_script(FILL_SCRIPT, {"out": str(folder), "fill_at": 9, "limit": 1000}))
    assert rc == 2 and "Traceback" not in err, err
    assert f"could not write {folder / 'shard-00002.safetensors'}" in out, out
    assert "ulimit -f" in out and "Finished shards are kept" in out
    assert "taking over the lock" in err  # the killed run's lock
    shards = sorted(p.name for p in folder.glob("shard-*"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # its tmp, the stale tmp, the lock
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    # 3. space again: the same command resumes, keeps the finished shards, leaves no temporary file
    rc, out, err = _finish(_script(FILL_SCRIPT, {"out": str(folder)}))
    assert rc == 0 and out.startswith("DONE False"), (out, err)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-0000[01]*")} == mtimes
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    ref = _extract(toy_text_index(60), cache, out=tmp_path / "ref", precision="fp32")
    assert _store_bytes(folder) == _store_bytes(ref.path)


WRITE_SHARD_SCRIPT = """
    import torch
    from anybind.features.safetensors_io import write_shard

    g = torch.Generator().manual_seed(0)
    tensors = {"final": torch.randn(7, 5, generator=g).half(), "layer.1": torch.randn(7, 3, generator=g).bfloat16(),
               "wide": torch.randn(7, 2, generator=g), "_row": torch.arange(7)}
    meta = {f"key{i}": f"value {i}" for i in (5, 2, 7, 0, 3, 6, 1, 4)}
    write_shard(__import__("pathlib").Path(ARGS["path"]), tensors, meta)
"""


def test_shards_are_byte_reproducible_across_processes_and_safetensors_reads_them(tmp_path):
    """Two processes write the same tensors with several metadata keys: the same bytes."""
    procs = [_script(WRITE_SHARD_SCRIPT, {"path": str(tmp_path / f"{i}.safetensors")}) for i in range(2)]
    for p in procs:
        rc, out, err = _finish(p)
        assert rc == 0, err
    a, b = (tmp_path / "0.safetensors").read_bytes(), (tmp_path / "1.safetensors").read_bytes()
    assert a == b
    n = int.from_bytes(a[:8], "little")
    assert n % 8 == 0 and b'"__metadata__":{"key0":"value 0","key1"' in a[8:8 + n]  # sorted keys, fixed separators
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "0.safetensors"))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(tensors["final"], torch.randn(7, 5, generator=g).half())
    assert tensors["layer.1"].dtype == torch.bfloat16 and tensors["_row"].tolist() == list(range(7))
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == {f"key{i}": f"value {i}" for i in range(8)}
    np.testing.assert_array_equal(safetensors_io.map_tensor(tmp_path / "1.safetensors", "wide"), tensors["wide"].numpy())


PRECISION_SCRIPT = """
    import hashlib, random
    from pathlib import Path
    from PIL import Image
    from anybind.data.index import DatasetIndex

    class ConvNet(RandomEncoder):  # a convolutional image encoder whose bf16 is faithful but slower
        channels_last = True

        def encode(self, batch, layers, pooling=None):
            if torch.is_autocast_enabled("cpu"):
                time.sleep(0.3 + random.random() * 0.2)  # slower, and noisy: the decision must not care
            return super().encode(batch, layers, pooling)

    class FastBf16Text(RandomEncoder):  # a text encoder whose bf16 is faster: still fp32 on a CPU
        def encode(self, batch, layers, pooling=None):
            if not torch.is_autocast_enabled("cpu"):
                time.sleep(0.3)
            return super().encode(batch, layers, pooling)

    import torch
    folder = Path(ARGS["images"])
    recs = [{"item_id": p.stem, "image": str(p), "caption": "a picture " + p.stem} for p in sorted(folder.glob("*.png"))]
    index = DatasetIndex.from_records("pics", recs, {"image": "image", "caption": "text"})
    out = {}
    for cls, spec in ((ConvNet, "random:image"), (FastBf16Text, "random:text")):
        enc = create(parse_spec(spec))
        enc.__class__ = cls
        store = extract(enc, index, layers="final", progress=False, num_workers=0)
        shards = sorted(store.path.glob("shard-*"))
        out[spec] = {"precision": store.report["precision"], "folder": store.path.name,
                     "sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in shards]}
    print(json.dumps(out))
"""


def test_precision_auto_decides_the_same_in_fresh_caches_and_processes(tmp_path):
    """The decision is a rule (device type, encoder kind, fidelity on a fixed batch), not a timing."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(12):
        Image.new("RGB", (48, 40), (20 * i, 255 - 20 * i, 90)).save(tmp_path / "images" / f"p{i:02d}.png")
    runs = []
    for k in range(2):  # two fresh caches, two processes
        env = {**os.environ, "ANYBIND_CACHE": str(tmp_path / f"cache{k}")}
        rc, out, err = _finish(_script(PRECISION_SCRIPT, {"images": str(tmp_path / "images")}, env=env))
        assert rc == 0, err
        runs.append(json.loads(out.splitlines()[-1]))
    assert runs[0] == runs[1]  # the same precision, the same store folder, the same shard bytes
    assert runs[0]["random:image"]["precision"] == "bf16"  # faithful + convolutional, though slower here
    assert runs[0]["random:text"]["precision"] == "fp32"  # faster in bf16 here, but the CPU rule is fp32
    memo = json.loads((tmp_path / "cache0" / "precision.json").read_text())
    [entry] = memo.values()
    assert entry["precision"] == "bf16" and entry["min_cosine"] >= 0.995 and "seconds_bf16" not in entry


def test_precision_auto_refuses_bf16_that_is_not_faithful(cache):
    from anybind.features.precision import calibration_items, choose_precision

    enc = create_encoder("random:image")
    enc.channels_last = True
    real = enc.encode

    def lossy(batch, layers, pooling=None):
        out = real(batch, layers, pooling)
        if torch.is_autocast_enabled("cpu"):
            out = {k: v + 0.3 * torch.randn_like(v.float()) for k, v in out.items()}
        return out

    enc.encode = lossy
    assert choose_precision(enc, "mean", torch.device("cpu"), cache) == "fp32"
    # the calibration batch is fixed: the same items on every call, whatever the dataset
    a, b = calibration_items(enc), calibration_items(enc)
    assert len(a) == 32 and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert calibration_items(create_encoder("random:text")) == calibration_items(create_encoder("random:text"))


LOCK_SCRIPT = """
    class Slow(RandomEncoder):
        calls = 0

        def encode(self, batch, layers, pooling=None):
            Slow.calls += 1
            time.sleep(ARGS["delay"])
            return super().encode(batch, layers, pooling)

    enc = create(parse_spec("random:text"))
    enc.__class__ = Slow
    if ARGS.get("go"):  # start together: both are ready (imports done) before either extracts
        print("READY", flush=True)
        while not os.path.exists(ARGS["go"]):
            time.sleep(0.01)
    store = extract(enc, toy_text_index(100), layers="all", shard_size=32, batch_size=8, progress=False,
                    precision="fp32")
    print("DONE", store.report["hit"], Slow.calls, store.path)
"""


def test_two_identical_extracts_started_together_work_once(cache, tmp_path):
    env = {**os.environ, "ANYBIND_CACHE": str(cache)}
    procs = [_script(LOCK_SCRIPT, {"delay": 0.1, "go": str(tmp_path / "go")}, env=env) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["READY", "READY"]
    (tmp_path / "go").touch()
    results = [_finish(p) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), results
    done = {p.pid: out.splitlines()[-1].split() for p, (_, out, _) in zip(procs, results)}
    workers = [pid for pid, d in done.items() if d[1] == "False"]
    assert len(workers) == 1, done  # one extracted, the other waited and found the store done
    [waiter] = [pid for pid in done if pid != workers[0]]
    assert done[waiter][1:3] == ["True", "0"] and int(done[workers[0]][2]) > 0
    assert done[waiter][3] == done[workers[0]][3]
    waiter_err = results[[p.pid for p in procs].index(waiter)][2]
    assert f"is being written by another anybind process (pid {workers[0]} on " in waiter_err
    assert ", since " in waiter_err
    assert not (Path(done[waiter][3]) / ".lock").exists()


def test_the_lock_of_a_killed_extract_is_taken_over(cache, caplog):
    env = {**os.environ, "ANYBIND_CACHE": str(cache)}
    victim = _script(LOCK_SCRIPT, {"delay": 0.05}, env=env)
    deadline = time.time() + 60
    while not list(cache.glob("stores/*/shard-00001.safetensors")) and time.time() < deadline:
        time.sleep(0.02)
    [lock] = cache.glob("stores/*/.lock")
    assert json.loads(lock.read_text())["pid"] == victim.pid
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert lock.exists()  # SIGKILL left it
    with caplog.at_level("WARNING", logger="anybind.extract"):
        store = _extract(toy_text_index(100), cache, shard_size=32, batch_size=8, precision="fp32")
    assert f"taking over the lock of pid {victim.pid} on " in caplog.text
    assert not store.report["hit"] and store.path == lock.parent and not lock.exists()


def test_store_lock_waits_for_the_living_and_names_them(tmp_path):
    import socket

    from anybind.atomic import proc_start_ticks
    from anybind.features.lock import StoreLock

    lock_file = tmp_path / "store" / ".lock"
    lock_file.parent.mkdir()
    # a live process of this host that is not the holder any more (a recycled pid): taken over
    ppid = os.getppid()
    lock_file.write_text(json.dumps({"pid": ppid, "host": socket.gethostname(), "since": "then",
                                     "proc_start": (proc_start_ticks(ppid) or 0) + 12345}))
    with StoreLock(tmp_path / "store", timeout_s=5) as held:
        assert held.holder().pid == os.getpid()
        # while held, another waiter gives up after its timeout, naming the holder
        with pytest.raises(StoreError, match=rf"held by pid {os.getpid()} on .*, since "):
            StoreLock(tmp_path / "store", timeout_s=0.3, poll_s=0.05).acquire()
    assert not lock_file.exists()
    # a holder on another machine cannot be checked from here: wait, and say which file to remove
    lock_file.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "since": "then", "proc_start": None}))
    with pytest.raises(StoreError, match=r"pid 4242 on elsewhere, since then \(if that process is gone, remove .*\.lock\)"):
        StoreLock(tmp_path / "store", timeout_s=0.3, poll_s=0.05).acquire()


def test_precision_auto_does_not_depend_on_the_layers_asked_for(cache, tmp_path):
    """One decision per encoder and device type: a store with more layers stays a hit for fewer."""
    from PIL import Image

    from anybind.data.index import DatasetIndex

    recs = []
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
        recs.append({"item_id": f"p{i}", "image": str(tmp_path / f"{i}.png")})
    index = DatasetIndex.from_records("pics", recs, {"image": "image"})
    enc = create_encoder("random:image")
    enc.channels_last = True  # a convolutional encoder: bf16 on a CPU where faithful
    every = extract(enc, index, layers="all", progress=False, cache=cache, num_workers=0)
    final = extract(enc, index, layers="final", progress=False, cache=cache, num_workers=0)
    assert every.report["precision"] == final.report["precision"] == "bf16"
    assert final.report["hit"] and final.path == every.path


def test_sync_splits_takes_the_index_split_fold_and_group_and_counts_rows_changed(tmp_path):
    # a cache hit's sync, in Arrow: every row's split, fold and group from the index, a null fold
    # equal only to a null, rows in the store's order (not the index's), vectors untouched
    from anybind.data.index import DatasetIndex
    from anybind.features.extract import sync_splits
    from anybind.features.store import write_store

    ids = [f"i{k}" for k in range(6)]
    write_store(tmp_path / "s", {"final": np.arange(12, dtype=np.float32).reshape(6, 2)}, ids, modality="image",
                field="image", dataset="d", splits=["train"] * 4 + ["val", "test"], folds=[0, 0, 1, 1, None, 2],
                groups=ids)
    records = [{"item_id": i, "image": f"{i}.png", "group": "g" if i in ("i0", "i1") else i} for i in reversed(ids)]
    index = DatasetIndex.from_records("d", records, {"image": "image"})
    want = {i: (s, f, g) for i, s, f, g in zip(index.item_ids, index.column("split"), index.column("fold"),
                                              index.column("group"), strict=True)}
    store = FeatureStore.open(tmp_path / "s")
    before = list(zip(*(store.rows.column(c).to_pylist() for c in ("split", "fold", "group")), strict=True))
    expected = sum(b != want[i] for i, b in zip(ids, before, strict=True))
    assert expected > 0
    assert sync_splits(store, index) == expected
    store = FeatureStore.open(tmp_path / "s")
    after = list(zip(*(store.rows.column(c).to_pylist() for c in ("split", "fold", "group")), strict=True))
    assert after == [want[i] for i in ids] and store.rows.column("item_id").to_pylist() == ids
    np.testing.assert_array_equal(store["final"].read(), np.arange(12, dtype=np.float32).reshape(6, 2))
    assert sync_splits(store, index) == 0  # in step now
    other = DatasetIndex.from_records("d", records[1:], {"image": "image"})  # lacks a store item: not its index
    assert sync_splits(store, other) == 0
    # the usual hit: the store holds the index's items in the index's order (compared, not joined)
    regrouped = [{"item_id": i, "image": f"{i}.png", "group": "h" if i in ("i2", "i3", "i4") else i} for i in ids]
    same_order = DatasetIndex.from_records("d", regrouped, {"image": "image"})
    want = list(zip(*(same_order.column(c) for c in ("split", "fold", "group")), strict=True))
    assert sync_splits(store, same_order) == sum(a != b for a, b in zip(after, want, strict=True)) > 0
    store = FeatureStore.open(tmp_path / "s")
    assert list(zip(*(store.rows.column(c).to_pylist() for c in ("split", "fold", "group")), strict=True)) == want


@pytest.mark.parametrize("shard_size", [1, 7, 64, None])
def test_reads_across_many_shards_in_any_order_give_the_written_rows(tmp_path, shard_size):
    # rows are grouped by shard with one sort (a slice each when they come sorted), not a pass
    # over the rows per shard: 10M rows of 1,024-row shards read whole made 10^11 comparisons
    from anybind.features.store import write_store

    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    write_store(tmp_path / "s", {"final": x}, [f"i{k}" for k in range(300)], modality="image", field="image",
                dataset="d", splits=["train"] * 300, shard_size=shard_size)
    arr = FeatureStore.open(tmp_path / "s")["final"]
    for rows in (None, rng.permutation(300), np.sort(rng.integers(0, 300, 50)), rng.integers(0, 300, 50),
                 [299, 0, 0, 150], slice(3, 200, 9), np.array([], dtype=np.int64)):
        want = x if rows is None else x[rows] if isinstance(rows, slice) else x[np.asarray(rows, dtype=np.int64)]
        np.testing.assert_array_equal(arr.read(rows), want)
