"""A damaged store names what is wrong, is never a cache hit, is repaired by extraction, and the
cache tools clean and verify their own cache (issue 13, case 4). Real stores from `random:`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from anybind.cli import main
from anybind.errors import StoreError
from anybind.features import FeatureStore, extract, list_stores, write_store
from anybind.features.store import check_hit, file_sha256, verify_store

sys.path.insert(0, str(Path(__file__).parent))
from _toy import toy_text_index  # noqa: E402

ANYBIND = str(Path(sys.executable).parent / "anybind")


def _extract(cache, **kw):
    kw = {"layers": "final", "shard_size": 16, "batch_size": 5, "progress": False, "cache": cache,
          "precision": "fp32"} | kw
    return extract("random:text", toy_text_index(), **kw)


def _mtimes(path: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in path.glob("shard-*.safetensors")}


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def test_manifest_records_each_shards_size_and_sha256(cache):
    store = _extract(cache)
    assert len(store.manifest["shards"]) == 8
    for s in store.manifest["shards"]:
        f = store.path / s["file"]
        assert s["bytes"] == f.stat().st_size and s["sha256"] == file_sha256(f) and len(s["sha256"]) == 64
    assert store.problems() == [] and store.verify() == [] and store.hashed


def test_truncated_manifest_is_named_and_the_cache_tools_clean_it(cache, capsys):
    store = _extract(cache)
    _truncate(store.path / "manifest.json")
    with pytest.raises(StoreError) as e:
        FeatureStore.open(store.path)
    msg = str(e.value)
    assert str(store.path) in msg and "manifest.json is unreadable" in msg and "anybind cache rm" in msg
    assert "Traceback" not in msg
    # `train --store` on it: one message line, exit 2 (was a JSONDecodeError traceback)
    run = subprocess.run([ANYBIND, "train", "--store", f"text={store.path}", "--store", f"image={store.path}", "-q"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "manifest.json is unreadable" in run.stderr and "Traceback" not in run.stderr
    [row] = list_stores(cache)
    assert row["status"].startswith("damaged: manifest.json is unreadable") and row["path"] == str(store.path)
    assert main(["cache", "ls"]) == 0 and "damaged" in capsys.readouterr().out
    assert main(["cache", "rm", "--partial"]) == 0
    assert f"removed {store.path}" in capsys.readouterr().out
    assert not store.path.exists() and list_stores(cache) == []


def test_cache_rm_of_a_named_damaged_store(cache, capsys):
    store = _extract(cache)
    (store.path / "manifest.json").write_text('{"format": 1, "key": ')
    assert main(["cache", "rm", str(store.path)]) == 0
    assert not store.path.exists()


def test_unfinished_store_with_a_garbled_request_is_listed_and_cleaned(cache, capsys):
    folder = cache / "stores" / "half"
    folder.mkdir(parents=True)
    (folder / "request.json").write_text('{"format": 1, "ke')
    assert list_stores(cache) == [{"status": "damaged: request.json is unreadable (JSONDecodeError)", "path": str(folder)}]
    assert main(["cache", "rm", "--partial"]) == 0 and not folder.exists()


def test_truncated_manifest_is_rebuilt_by_the_same_extract(cache):
    store = _extract(cache)
    before = _mtimes(store.path)
    _truncate(store.path / "manifest.json")
    again = _extract(cache)
    assert not again.report["hit"] and again.path == store.path
    assert _mtimes(store.path) == before  # every shard was whole: none recomputed, only the manifest rewritten
    assert again.manifest["shards"] == store.manifest["shards"] and again.verify() == []


def test_deleted_shard_is_not_a_hit_and_extract_repairs_it(cache, capsys):
    store = _extract(cache)
    lost = store.path / "shard-00003.safetensors"
    original = lost.read_bytes()
    lost.unlink()
    others = _mtimes(store.path)
    [row] = list_stores(cache)
    assert row["status"] == "damaged: shard-00003.safetensors missing"
    assert main(["cache", "ls"]) == 0 and "damaged: shard-00003.safetensors missing" in capsys.readouterr().out
    with pytest.raises(StoreError, match="shard-00003.safetensors missing.*Run the same `anybind extract` again"):
        FeatureStore.open(store.path)
    repaired = _extract(cache)
    assert not repaired.report["hit"] and repaired.path == store.path
    assert lost.read_bytes() == original  # recomputed byte for byte
    assert {k: v for k, v in _mtimes(store.path).items() if k != lost.name} == others  # only the lost shard
    assert repaired.manifest["shards"] == store.manifest["shards"] and repaired.verify() == []
    assert list_stores(cache)[0]["status"] == "done"
    assert _extract(cache).report["hit"]


def test_short_shard_and_missing_rows_at_out_are_repaired(cache, tmp_path):
    out = tmp_path / "mine"
    store = _extract(cache, out=out)
    short = out / "shard-00001.safetensors"
    original = short.read_bytes()
    _truncate(short, 0.9)
    (out / "rows.parquet").unlink()
    problems = FeatureStore.open(out, check=False).problems()
    assert problems == [f"shard-00001.safetensors is {int(len(original) * 0.9)} bytes, the manifest says {len(original)}",
                        "rows.parquet missing"]
    repaired = _extract(cache, out=out)
    assert not repaired.report["hit"] and short.read_bytes() == original
    assert repaired.item_ids == store.item_ids and repaired.problems() == []


def test_flipped_byte_is_found_by_cache_verify(cache, capsys):
    good = _extract(cache)
    bad = _extract(cache, layers="0")
    flipped = bad.path / "shard-00002.safetensors"
    original = flipped.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0x40  # inside the vectors: the size is unchanged, so only the hash can tell
    flipped.write_bytes(bytes(data))
    assert list_stores(cache)[1]["status"] == "done"  # the cheap check cannot see it
    run = subprocess.run([ANYBIND, "cache", "verify"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert f"ok          {good.path}" in run.stdout
    assert f"damaged     {bad.path}" in run.stdout
    assert "shard-00002.safetensors has other content than the sha256 the manifest records" in run.stdout
    assert "2 store(s) checked, 1 damaged" in run.stdout
    assert main(["cache", "verify", str(good.path)]) == 0
    # --repair reopens it; the same extract then recomputes that shard alone, byte for byte
    assert main(["cache", "verify", "--repair", str(bad.path)]) == 1
    assert "reopened" in capsys.readouterr().out
    repaired = _extract(cache, layers="0")
    assert not repaired.report["hit"] and flipped.read_bytes() == original
    assert main(["cache", "verify"]) == 0


def test_stores_from_before_recorded_sizes_are_checked_by_their_headers(cache):
    store = _extract(cache)
    mf = store.path / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["shards"] = [{"file": s["file"], "rows": s["rows"]} for s in manifest["shards"]]
    mf.write_text(json.dumps(manifest))
    assert verify_store(store.path) == "ok (sizes checked: this store's manifest records no hashes)"
    _truncate(store.path / "shard-00005.safetensors", 0.8)
    [problem] = FeatureStore.open(store.path, check=False).problems()
    assert problem.startswith("shard-00005.safetensors is ") and "its header says" in problem


def test_a_damaged_store_no_extraction_wrote_is_named_not_recomputed(tmp_path):
    import numpy as np

    path = tmp_path / "byo"
    write_store(path, {"final": np.ones((4, 3), np.float32)}, ["a", "b", "c", "d"], modality="text",
                field="caption", dataset="mine")
    (path / "shard-00000.safetensors").unlink()
    with pytest.raises(StoreError, match="shard-00000.safetensors missing.*Remove it with `anybind cache rm"):
        FeatureStore.open(path)
    with pytest.raises(StoreError, match="cannot be recomputed"):
        check_hit(path)
    assert (path / "manifest.json").exists()  # refused: nothing was taken apart
