"""Hugging Face `datasets` folders (save_to_disk) and Parquet files of encoded images (img2dataset,
the Hub) list without reading their images and extract exactly like the same JPEGs as plain files."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from anybind.cli import main
from anybind.data import load_dataset
from anybind.data.images import load_image
from anybind.errors import DataError
from anybind.features import FeatureStore, extract

datasets = pytest.importorskip("datasets")  # the `scale` extra (in `dev`)

CLASSES = ("red", "green", "blue")
N = 21  # images: 7 per class


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A plain folder dataset of N JPEGs (root/<class>/<i>.jpg) and, per image, its id, bytes, caption."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        label = CLASSES[i % 3]
        (root / label).mkdir(exist_ok=True)
        pixels = rng.integers(0, 255, (24 + i, 40 - i, 3), dtype=np.uint8)  # sizes differ, content differs
        path = root / label / f"{i:02d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        rows.append({"id": f"{label}/{i:02d}.jpg", "path": str(path), "bytes": path.read_bytes(),
                     "caption": f"a noisy {label} picture number {i}", "label": label})
    return root, rows


def _hf_features():
    return datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                              "caption": datasets.Value("string"),
                              "label": datasets.ClassLabel(names=list(CLASSES))})


def _hf_dataset(rows, embed=True):
    images = [{"bytes": r["bytes"], "path": None} if embed or k % 2 else {"bytes": None, "path": r["path"]}
              for k, r in enumerate(rows)]
    return datasets.Dataset.from_dict({"id": [r["id"] for r in rows], "image": images,
                                       "caption": [r["caption"] for r in rows],
                                       "label": [CLASSES.index(r["label"]) for r in rows]}, features=_hf_features())


@pytest.fixture(scope="module")
def hf_dict(photos, tmp_path_factory):
    """A DatasetDict (train / validation / test) saved with save_to_disk; validation half by path only."""
    _, rows = photos
    out = tmp_path_factory.mktemp("hf") / "photos-hf"
    parts = {"train": rows[:13], "validation": rows[13:17], "test": rows[17:]}
    datasets.DatasetDict({k: _hf_dataset(v, embed=k != "validation") for k, v in parts.items()}).save_to_disk(
        str(out), max_shard_size="2KB")  # several Arrow files per split
    return out


@pytest.fixture(scope="module")
def img2dataset_parquet(photos, tmp_path_factory):
    """img2dataset's output_format=parquet: key, txt, url, status, error_message, jpg (None where the download
    failed: one such row per shard); 2 shards, small row groups (img2dataset writes 100 rows at a time)."""
    _, rows = photos
    out = tmp_path_factory.mktemp("i2d")
    for shard, part in enumerate((rows[:11], rows[11:])):
        failed = {"id": f"{shard}-gone", "caption": None, "bytes": None}
        part = [*part[:3], failed, *part[3:]]
        table = pa.table({"key": [r["id"] for r in part], "txt": [r["caption"] for r in part],
                          "url": [f"http://example.com/{r['id']}" for r in part],
                          "status": ["failed_to_download" if r is failed else "success" for r in part],
                          "error_message": ["HTTP 404" if r is failed else None for r in part],
                          "jpg": pa.array([r["bytes"] for r in part], pa.binary())})
        pq.write_table(table, out / f"{shard:05d}.parquet", row_group_size=4)
    return out


def _store(cache, encoder, spec, **kw):
    return extract(encoder, load_dataset(spec, cache=cache), layers="final", dtype="fp32", precision="fp32",
                   shard_size=8, batch_size=3, cache=cache, progress=False, **kw)


def _by_id(store):
    return dict(zip(store.item_ids, store["final"].read(), strict=True))


def test_a_datasetdict_lists_its_splits_labels_and_ids_without_images(hf_dict, photos, cache):
    index = load_dataset(f"hf:{hf_dict}", cache=cache)
    _, rows = photos
    assert index.fields == {"image": "image", "caption": "text"}
    assert sorted(index.item_ids) == sorted(r["id"] for r in rows)
    by_id = {r["item_id"]: r for r in index.table.to_pylist()}
    assert [by_id[r["id"]]["split"] for r in rows] == ["train"] * 13 + ["val"] * 4 + ["test"] * 4
    assert all(by_id[r["id"]]["label"] == r["label"] and by_id[r["id"]]["caption"] == [r["caption"]] for r in rows)
    assert all(ref.startswith("arrow://") for ref in index.column("image"))
    assert len({ref.split("#")[0] for ref in index.column("image")}) > 3  # several Arrow files, each referenced
    assert load_dataset(str(hf_dict), cache=cache).item_ids == index.item_ids  # a bare path is detected


def test_hf_datasets_and_image_parquet_extract_as_the_plain_folder(photos, hf_dict, img2dataset_parquet, cache):
    """random:image over the same JPEGs: a folder, an HF DatasetDict (bytes and paths), img2dataset Parquet."""
    root, rows = photos
    plain = _by_id(_store(cache, "random:image", f"folder:{root}", num_workers=0))
    assert len(plain) == N
    for spec in (f"hf:{hf_dict}", f"parquet:{img2dataset_parquet}"):
        got = _by_id(_store(cache, "random:image", spec, num_workers=2))  # decoded in 2 worker processes
        assert sorted(got) == sorted(plain)
        for item_id, vector in got.items():
            np.testing.assert_array_equal(vector, plain[item_id])


def test_the_cli_extracts_a_parquet_path(img2dataset_parquet, photos, cache, tmp_path):
    one = img2dataset_parquet / "00001.parquet"
    assert load_dataset(str(one), cache=cache).name == "00001"  # a bare image Parquet is not a table of paths
    assert len(load_dataset(str(img2dataset_parquet), cache=cache)) == N  # nor is a folder of them
    out = tmp_path / "store"
    assert main(["extract", "-e", "random:image", "-d", str(one), "--precision", "fp32", "--dtype", "fp32",
                 "--workers", "1", "-o", str(out), "-q"]) == 0
    store = FeatureStore.open(out)
    _, rows = photos
    assert store.item_ids == [r["id"] for r in rows[11:]]
    assert store.skipped == [] and np.isfinite(store["final"].read()).all()


def test_hub_parquet_files_keep_their_splits_and_class_names(photos, tmp_path, cache):
    """The Hub's layout: data/{train,validation,test}-0000N-of-0000M.parquet, written by `datasets`."""
    _, rows = photos
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    for split, part in (("train", rows[:15]), ("validation", rows[15:18]), ("test", rows[18:])):
        _hf_dataset(part).to_parquet(str(data / f"{split}-00000-of-00001.parquet"))
    index = load_dataset(f"hf:{tmp_path / 'hub'}", cache=cache)  # a folder of Parquet files
    table = {r["item_id"]: r for r in index.table.to_pylist()}
    assert [table[r["id"]]["split"] for r in rows] == ["train"] * 15 + ["val"] * 3 + ["test"] * 3
    assert [table[r["id"]]["label"] for r in rows] == [r["label"] for r in rows]
    assert load_image(table[rows[16]["id"]]["image"]).size == Image.open(rows[16]["path"]).size


def test_one_dataset_without_ids_or_a_val_split(photos, tmp_path, cache):
    """A single saved Dataset: ids are row numbers; its own 'train' split is split by hash (a val split must exist)."""
    _, rows = photos
    ds = _hf_dataset(rows).remove_columns("id")
    ds._split = datasets.NamedSplit("train")
    ds.save_to_disk(str(tmp_path / "one"))
    assert json.loads((tmp_path / "one" / "state.json").read_text())["_split"] == "train"
    index = load_dataset(f"hf:{tmp_path / 'one'}", cache=cache)
    assert index.item_ids == [str(i) for i in range(N)]
    assert {"train", "val"} <= set(index.column("split"))


def test_a_row_without_an_image_is_a_reported_skip(photos, tmp_path, cache):
    _, rows = photos
    table = pa.table({"key": ["a", "b"], "caption": ["x", "y"], "jpg": pa.array([rows[0]["bytes"], None], pa.binary())})
    pq.write_table(table, tmp_path / "holes.parquet")
    store = _store(cache, "random:image", f"parquet:{tmp_path / 'holes.parquet'}", num_workers=0)
    assert store.item_ids == ["a"]
    assert [s["item_id"] for s in store.skipped] == ["b"] and "holds no image" in store.skipped[0]["reason"]


def test_bad_parquet_and_references_are_clear(tmp_path, cache, img2dataset_parquet):
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "caption": ["a"]}), tmp_path / "meta.parquet")
    with pytest.raises(DataError, match="no column of encoded images.*use wds:"):
        load_dataset(f"parquet:{tmp_path / 'meta.parquet'}", cache=cache)
    audio = pa.table({"audio": [{"bytes": b"RIFF", "path": None}], "caption": ["a"]}).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": {"audio": {"_type": "Audio"}}}})})
    pq.write_table(audio, tmp_path / "speech.parquet")  # HF Audio: bytes too, but no image
    with pytest.raises(DataError, match="no column of encoded images"):
        load_dataset(f"parquet:{tmp_path / 'speech.parquet'}", cache=cache)
    with pytest.raises(DataError, match="no Parquet files found"):
        load_dataset(f"parquet:{tmp_path / 'none'}", cache=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a save_to_disk folder"):
        load_dataset(f"hf:{tmp_path / 'empty'}", cache=cache)
    shard = img2dataset_parquet / "00000.parquet"
    with pytest.raises(DataError, match="has 12 rows; row 12 does not exist"):
        load_image(f"parquet://{shard}#jpg/12")
    with pytest.raises(DataError, match="row holds no image"):  # the failed download, never listed
        load_image(f"parquet://{shard}#jpg/3")
    with pytest.raises(DataError, match=r"expected parquet://<file>#<column>/<row>"):
        load_image(f"parquet://{shard}")
    with pytest.raises(DataError, match="has no column 'png': it has key, txt, url, status, error_message, jpg"):
        load_image(f"parquet://{shard}#png/0")


LISTING_MEMORY = """
import sys
import pyarrow as pa
from anybind.data import load_dataset
index = load_dataset(sys.argv[1], cache=sys.argv[2])
print(len(index), pa.default_memory_pool().max_memory())
"""


def test_listing_never_reads_the_images(tmp_path):
    """80 MB of image bytes list with a few MB of Arrow memory: only the caption and id columns are read."""
    rng = np.random.default_rng(1)
    blobs = [rng.bytes(2_000_000) for _ in range(40)]  # incompressible, like JPEGs
    table = pa.table({"key": [f"k{i}" for i in range(40)], "caption": [f"c{i}" for i in range(40)],
                      "jpg": pa.array(blobs, pa.binary())})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=20)
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs], "caption": table["caption"].to_pylist()},
                               features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
                               ).save_to_disk(str(tmp_path / "big-hf"))
    del blobs, table
    for spec in (f"parquet:{tmp_path / 'big.parquet'}", f"hf:{tmp_path / 'big-hf'}"):
        done = subprocess.run([sys.executable, "-c", LISTING_MEMORY, spec, str(tmp_path / "cache")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        items, peak = map(int, done.stdout.split())
        assert items == 40 and peak < 8_000_000, (spec, peak)  # 80 MB of images never entered memory


@pytest.mark.slow
def test_a_packaged_encoder_sees_the_same_pixels(photos, hf_dict, cache):
    """efficientnet-lite0 (a real CNN) on the 21 JPEGs: the HF folder and the plain folder store the same features."""
    from anybind.encoders import create_encoder

    root, _ = photos
    encoder = create_encoder("efficientnet-lite0")  # loaded once for both
    plain = _by_id(_store(cache, encoder, f"folder:{root}", num_workers=0))
    got = _by_id(_store(cache, encoder, f"hf:{hf_dict}", num_workers=0))
    assert sorted(got) == sorted(plain)
    for item_id, vector in got.items():
        np.testing.assert_array_equal(vector, plain[item_id])
