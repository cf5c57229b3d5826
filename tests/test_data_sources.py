"""Labelled folders, WebDataset shards (brace notation), Fashion-MNIST IDX files, skimage photos."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from anybind.data import load_dataset
from anybind.data.fashion_mnist import FASHION_CLASSES
from anybind.data.folders import list_folder
from anybind.data.idx import read_idx, write_idx
from anybind.data.images import load_image
from anybind.data.webdataset import expand_braces, list_webdataset
from anybind.errors import DataError


# ---- folders --------------------------------------------------------------------------------------
def _img(path, colour=(10, 20, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), colour).save(path, fmt)


def test_labelled_folder(tmp_path):
    _img(tmp_path / "golden_retriever" / "1.jpg")
    _img(tmp_path / "golden_retriever" / "sub" / "2.png")
    _img(tmp_path / "tabby-cat" / "3.png", (200, 0, 0))
    (tmp_path / "tabby-cat" / "notes.txt").write_text("not an image")
    idx = list_folder(tmp_path)
    assert sorted(idx.item_ids) == [
        "golden_retriever/1.jpg",
        "golden_retriever/sub/2.png",
        "tabby-cat/3.png",
    ]
    rows = dict(
        zip(idx.item_ids, zip(idx.column("label"), idx.column("caption"), strict=True), strict=True)
    )
    assert rows["golden_retriever/sub/2.png"] == ("golden_retriever", ["golden retriever"])
    assert rows["tabby-cat/3.png"] == ("tabby-cat", ["tabby cat"])
    ids, _, refs = idx.field_rows("image")
    assert load_image(refs[ids.index("tabby-cat/3.png")]).getpixel((0, 0)) == (200, 0, 0)


def test_folder_with_split_folders_on_top(tmp_path):
    _img(tmp_path / "train" / "dog" / "a.png")
    _img(tmp_path / "val" / "cat" / "b.png")
    idx = list_folder(tmp_path)
    assert sorted(idx.column("label")) == ["cat", "dog"]
    assert "train/dog/a.png" in idx.item_ids
    assert idx.meta["split_folders"] is True


def test_folder_without_classes(tmp_path):
    _img(tmp_path / "loose.png")
    with pytest.raises(DataError, match="class subfolders"):
        list_folder(tmp_path)


# ---- webdataset -------------------------------------------------------------------------------------
def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _shards(root, n_shards=3, per_shard=4):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for k in range(per_shard):
                key = f"{s:05d}{k:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (4, 4), (s * 40, k * 40, 0)).save(buf, "JPEG" if k % 2 else "PNG")
                _add(tf, f"{key}.{'jpg' if k % 2 else 'png'}", buf.getvalue())
                _add(tf, f"{key}.txt", f"sample {s} {k}".encode())
                _add(
                    tf,
                    f"{key}.json",
                    json.dumps({"key": key, "caption": f"json caption {s} {k}"}).encode(),
                )
            _add(tf, "orphan.txt", b"a caption without an image")


def test_expand_braces():
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{8..10}.tar") == ["8.tar", "9.tar", "10.tar"]


def test_webdataset_shards_with_brace_notation(tmp_path):
    _shards(tmp_path / "shards")
    idx = list_webdataset(f"{tmp_path}/shards/{{00000..00001}}.tar")
    assert len(idx) == 8  # two of the three shards, the orphan caption skipped
    rows = dict(zip(idx.item_ids, idx.column("caption"), strict=True))
    assert rows["00001/000010002"] == ["sample 1 2", "json caption 1 2"]
    refs = dict(zip(idx.item_ids, idx.column("image"), strict=True))
    assert refs["00001/000010003"].startswith("tar://") and refs["00001/000010003"].endswith(
        "#000010003.jpg"
    )
    assert load_image(refs["00001/000010002"]).getpixel((0, 0)) == (40, 80, 0)
    assert load_image(refs["00001/000010003"]).size == (4, 4)
    assert load_image(refs["00001/000010003"], min_side=2).size == (2, 2)  # JPEG draft: 1/2 scale


def test_webdataset_dir_glob_and_missing(tmp_path):
    _shards(tmp_path / "shards")
    assert len(list_webdataset(tmp_path / "shards")) == 12
    assert len(list_webdataset(f"{tmp_path}/shards/0000[12].tar")) == 8
    assert len(list_webdataset(tmp_path / "shards" / "00002.tar")) == 4
    with pytest.raises(DataError, match="does not exist"):
        list_webdataset(f"{tmp_path}/shards/{{00000..00009}}.tar")
    with pytest.raises(DataError, match="no tar shards"):
        list_webdataset(tmp_path / "nothing")


def test_webdataset_via_load_dataset(tmp_path, cache):
    _shards(tmp_path / "shards", n_shards=2)
    assert len(load_dataset(f"wds:{tmp_path}/shards/{{00000..00001}}.tar")) == 8
    assert len(load_dataset(str(tmp_path / "shards"))) == 8  # a directory of .tar: auto-detected


# ---- fashion-mnist ----------------------------------------------------------------------------------
def _tiny_idx(root, n_train=30, n_test=10):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            root / f"{split}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return root


def test_idx_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    write_idx(tmp_path / "x.idx", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), arr)
    (tmp_path / "bad.idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(DataError, match="IDX header says"):
        read_idx(tmp_path / "bad.idx")


def test_fashion_mnist_on_tiny_idx_files(tmp_path, cache):
    root = _tiny_idx(tmp_path / "fm")
    idx = load_dataset(f"fashion-mnist:{root}")
    assert len(idx) == 40
    assert idx.item_ids[0] == "train-0" and idx.item_ids[-1] == "test-9"
    rows = dict(
        zip(idx.item_ids, zip(idx.column("label"), idx.column("caption"), strict=True), strict=True)
    )
    assert rows["train-9"] == ("Ankle boot", ["Ankle boot"])
    assert rows["test-0"] == (FASHION_CLASSES[0], [FASHION_CLASSES[0]])
    assert idx.meta["official_splits"] == {"train": 30, "test": 10}
    assert set(idx.column("split")) <= {
        "train",
        "val",
        "test",
    }  # from the group hash, not the official split
    ref = idx.column("image")[idx.item_ids.index("test-3")]
    expected = read_idx(root / "t10k-images-idx3-ubyte.gz")[3]
    assert np.asarray(load_image(ref))[..., 0].tolist() == expected.tolist()


def test_fashion_mnist_missing(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no IDX image/label pairs"):
        load_dataset(f"fashion-mnist:{tmp_path / 'empty'}")


# ---- skimage photos ----------------------------------------------------------------------------------
def test_skimage_photos(cache):
    pytest.importorskip("skimage")
    idx = load_dataset("skimage-photos")
    assert len(idx) >= 15
    caps = dict(zip(idx.item_ids, idx.column("caption"), strict=True))
    assert "cat" in caps["chelsea"][0] and "espresso" in caps["coffee"][0]
    assert len({c[0] for c in caps.values()}) == len(caps)  # one distinct caption per photo
    im = load_image(idx.column("image")[idx.item_ids.index("stereo_motorcycle-0")], min_side=64)
    assert im.mode == "RGB"
